#!/usr/bin/env bash
# Installs what the test suite needs beyond Python packages. Idempotent and
# quiet when everything is already there; says what it installs otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# The live page's test (tests/page) drives the system's Chromium through playwright.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# The image's PID 1; tests/deploy/test_dockerfile.py runs the installed broker under it.
command -v tini >/dev/null 2>&1 || need_apt+=(tini)
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]} (Debian packages)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # The Debian package may start a system Redis; the tests never use it.
fi

# Node clients the tests drive (@jupyterlab/services, ...).
for dir in tests/js; do
  if [ -f "$dir/package.json" ]; then
    if [ ! -d "$dir/node_modules" ] || [ "$dir/package.json" -nt "$dir/node_modules/.installed" ]; then
      echo "setup: npm install in $dir"
      (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error 2>/dev/null || npm install --no-audit --no-fund --loglevel=error)
      touch "$dir/node_modules/.installed"
    fi
  fi
done

# Further tools (configurable-http-proxy, helm, ...) are installed by scripts
# in scripts/setup.d/, each idempotent, into .tools/.
if [ -d scripts/setup.d ]; then
  for step in scripts/setup.d/*.sh; do
    [ -e "$step" ] && bash "$step"
  done
fi
exit 0
