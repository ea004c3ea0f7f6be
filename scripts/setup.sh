#!/usr/bin/env bash
# Creates .venv (idempotent) with torch and everything the demo and the tests need, installs lora_core into it
# (editable: `python -m lora_core` runs from any folder), and puts the oldest libraries requirements.txt admits
# into .cache/oldest-supported for tests/test_oldest_supported.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
# torch 2.14.1 + torchvision 0.29.1: the pair ComfyUI needs (torchvision is imported at its start-up)
.venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 -r requirements-dev.txt
ROOT="$(pwd)"
if ! (cd / && "$ROOT/.venv/bin/python" -c 'import lora_core, sys; sys.exit(lora_core.__file__ != sys.argv[1])' \
      "$ROOT/lora_core/__init__.py" 2>/dev/null); then
  .venv/bin/pip install --quiet --no-deps -e .
fi

OLDEST=.cache/oldest-supported
if ! cmp -s requirements-oldest.txt "$OLDEST/requirements-oldest.txt"; then
  rm -rf "$OLDEST"
  .venv/bin/pip install --quiet --no-deps --target "$OLDEST" -r requirements-oldest.txt
  cp requirements-oldest.txt "$OLDEST/"
fi
