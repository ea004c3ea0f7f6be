#!/usr/bin/env bash
# Creates .venv (idempotent) with torch and everything the demo and the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
# torch 2.14.1 + torchvision 0.29.1: the pair ComfyUI needs (torchvision is imported at its start-up)
.venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 -r requirements-dev.txt
