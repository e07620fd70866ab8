#!/usr/bin/env bash
# configurable-http-proxy for the JupyterHub tests (tests/hubfixture.py):
# JupyterHub routes /user/<name>/ through it. Idempotent: does nothing when
# the binary is already there. Installs into .tools/chp, never globally.
set -euo pipefail
cd "$(dirname "$0")/../.."

prefix=.tools/chp
binary=$prefix/node_modules/.bin/configurable-http-proxy
if [ -x "$binary" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: npm is missing; install Node.js (Debian: nodejs npm) for configurable-http-proxy" >&2
  exit 1
fi
echo "setup: npm install configurable-http-proxy@5 into $prefix"
mkdir -p "$prefix"
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error 'configurable-http-proxy@5' >/dev/null
"$binary" --version >/dev/null
