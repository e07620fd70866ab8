#!/usr/bin/env bash
# promtool and the prometheus binary for the monitoring tests:
# tests/deploy/test_alerts.py (`promtool check rules` / `promtool test rules`
# on the chart's PrometheusRule with synthetic series) and
# tests/deploy/test_prometheus_live.py (a real Prometheus scraping a broker).
#
# Idempotent and only when missing: does nothing when both are on PATH or
# already in .tools/prometheus/. Otherwise it takes Debian's `prometheus`
# package with `apt-get download` (no root, no service started) and unpacks
# just its two binaries into .tools/prometheus/, never globally.
set -euo pipefail
cd "$(dirname "$0")/../.."

DEST=.tools/prometheus
if { command -v promtool && command -v prometheus; } >/dev/null 2>&1; then
  exit 0
fi
if [ -x "$DEST/promtool" ] && [ -x "$DEST/prometheus" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: promtool/prometheus are missing and apt-get is not available; install Prometheus's promtool" \
       "(Debian/Ubuntu package: prometheus) or put it in $DEST/" >&2
  exit 1
fi
echo "setup: unpacking promtool from the Debian package prometheus into $DEST"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download prometheus >/dev/null 2>&1) || {
  echo "setup: apt-get download prometheus failed (run apt-get update?)" >&2; exit 1; }
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
mkdir -p "$DEST"
install -m 0755 "$work/root/usr/bin/promtool" "$work/root/usr/bin/prometheus" "$DEST/"
"$DEST/promtool" --version | head -1
