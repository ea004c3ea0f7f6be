#!/usr/bin/env bash
# What tests/comfyui/test_browser.py needs: Debian's Chromium and the Playwright Python package, which drives
# /usr/bin/chromium (Playwright's own browser download cannot work here and is never run). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PLAYWRIGHT_VERSION=1.65.2

if [ ! -x /usr/bin/chromium ]; then
  echo "setup_browser: installing Debian's chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '$PLAYWRIGHT_VERSION')" 2>/dev/null; then
  echo "setup_browser: installing playwright==$PLAYWRIGHT_VERSION into .venv"
  .venv/bin/python -m pip install --quiet "playwright==$PLAYWRIGHT_VERSION"
fi
