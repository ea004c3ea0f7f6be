#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_comfyui.sh  # a real ComfyUI and a test checkpoint for tests/comfyui
bash scripts/setup_browser.sh  # Debian's Chromium and Playwright for tests/comfyui/test_browser.py
exec .venv/bin/python -m pytest -q -c tests/pytest.ini "$@"
