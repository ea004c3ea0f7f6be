"""A target preset adapts the same base weights in lora_core (CLI, Python) and in the ComfyUI nodes, for every family:
`presets_probe.py` maps lora_core's diffusers layers to ComfyUI's weights and rows through ComfyUI's own maps."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .harness import CURRENT_COMFY_DIR, VENV_PYTHON

PROBE = Path(__file__).with_name("presets_probe.py")
FAMILIES = ("sd1", "sdxl", "sd3", "flux", "qwen_image", "chroma", "lumina2", "hidream", "wan", "hunyuan_video")


@pytest.fixture(scope="module")
def adapted() -> dict:
    if not (CURRENT_COMFY_DIR / "main.py").exists():
        message = f"{CURRENT_COMFY_DIR} is missing: run scripts/setup_comfyui.sh"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    done = subprocess.run([str(VENV_PYTHON), str(PROBE), str(CURRENT_COMFY_DIR)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["attention", "transformer", "full"])
def test_a_preset_adapts_the_same_weights_in_both_backends(adapted, family, preset) -> None:
    outcome = adapted[family][preset]
    assert outcome["lora_core_only"] == [] and outcome["nodes_only"] == [], outcome
    assert outcome["values"][0] == outcome["values"][1] > 0
