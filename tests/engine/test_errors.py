"""One error family: every exception LoRA Lab defines is a LoRALabError (and still the builtin error it was), and
the CLI reports one as one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.exception_classes import exception_classes

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = REPO_ROOT / ".cache" / "comfyui"
BUILTIN_ERRORS = {"ValueError", "RuntimeError"}


def assert_lora_lab_errors(classes: dict[str, list[str]]) -> None:
    assert classes
    for name, mro in classes.items():
        if not name.endswith(".LoRALabError"):
            assert "LoRALabError" in mro, f"{name} is not a LoRALabError: {mro}"
            assert BUILTIN_ERRORS & set(mro), f"{name} is neither a ValueError nor a RuntimeError: {mro}"


def test_every_exception_of_lora_core_is_a_lora_lab_error() -> None:
    classes = exception_classes("lora_core")
    assert {"lora_core.errors.LoRALabError", "lora_core.training.config.TrainingError",
            "lora_core.training.distributed.StoppedByLauncher"} <= set(classes)
    assert_lora_lab_errors(classes)


def test_every_exception_of_the_nodes_is_a_lora_lab_error() -> None:
    if not COMFY_DIR.exists():
        pytest.skip("no ComfyUI in .cache: run scripts/setup_comfyui.sh")
    probe = REPO_ROOT / "tests" / "support" / "exception_classes.py"
    done = subprocess.run([sys.executable, str(probe), str(COMFY_DIR)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    classes = json.loads(done.stdout.strip().splitlines()[-1])
    assert "comfyui_lora_lab.nodes.paths.PathError" in classes
    assert_lora_lab_errors(classes)


def test_the_cli_reports_a_bad_data_folder_in_one_line(tmp_path) -> None:
    missing = tmp_path / "no_such_folder"
    done = subprocess.run(
        [sys.executable, "-m", "lora_core", "train", "--base", str(REPO_ROOT / "lora_core" / "demo" / "base"),
         "--data", str(missing), "--out", str(tmp_path / "lora.safetensors"), "--steps", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: Dataset folder {missing} does not exist; check the path."
    assert not (tmp_path / "lora.safetensors").exists()
