#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_comfyui.sh  # a real ComfyUI and a test checkpoint for tests/comfyui
bash scripts/setup_browser.sh  # Debian's Chromium and Playwright for tests/comfyui/test_browser.py
if [ "$#" -gt 0 ]; then  # the tests named
  exec .venv/bin/python -m pytest -q -c tests/pytest.ini "$@"
fi
.venv/bin/python -m pytest -q -c tests/pytest.ini -m "not real_size"
# its own step: a full-size SDXL (10 GiB in fp32 in ComfyUI) and a full-width Flux with T5-XXL in fp8, one server
exec .venv/bin/python -m pytest -q -c tests/pytest.ini -m real_size
