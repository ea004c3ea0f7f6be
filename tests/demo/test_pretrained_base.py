"""The demo's shipped base (`lora_core/demo/base/`): it draws what its prompts say, and `make-base` still builds it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from lora_core.demo.pretrain import (
    BASE_DIR,
    Settings,
    detector_accuracy,
    held_out_scenes,
    load_base,
    load_detector,
    make_base,
    prompt_accuracy,
    training_scenes,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(images_per_scene=2, vae_steps=2, detector_steps=2, unet_steps=3, batch_size=4, checkpoint_every=2)


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as file:
        return file.metadata()


def test_shipped_base_is_small_safetensors_with_its_recipe() -> None:
    files = [path for path in BASE_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 25e6
    weights = [path for path in files if path.suffix == ".safetensors"]
    assert len(weights) == 4 and not [path for path in files if path.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    for path in weights:
        settings = json.loads(metadata(path)["lora_lab.make_base.settings"])
        assert settings == json.loads(metadata(weights[0])["lora_lab.make_base.settings"]), path
        assert json.loads(metadata(path)["lora_lab.make_base.data"])["held_out"]


def test_the_detector_reads_scenes_through_the_vae() -> None:
    """Measured 0.96 on the shipped base (seed 0); chance is 1/32."""
    assert detector_accuracy(load_detector(), load_base().vae, seed=1) >= 0.85


def test_the_shipped_base_draws_its_prompts_far_above_chance() -> None:
    """Shape, colour and background all read back right (chance: 1/4 · 1/4 · 1/2 = 1/32 by the detector's classes).
    Measured on the shipped base with these seeds (as make-base measured it): 0.825 on the 20 training combinations,
    0.60 on the 4 held-out ones."""
    pipeline, detector = load_base(), load_detector()
    seen = prompt_accuracy(pipeline, detector, training_scenes(), range(0, 2))
    unseen = prompt_accuracy(pipeline, detector, held_out_scenes(), range(0, 5))
    assert seen["all"] >= 0.7, seen
    assert unseen["all"] >= 0.4, unseen


def test_make_base_runs_and_is_reproducible(tmp_path) -> None:
    arguments = [f"--{name.replace('_', '-')}={value}" for name, value in TINY.items()]
    result = subprocess.run([sys.executable, "-m", "lora_core", "make-base", "--out", str(tmp_path / "cli"), *arguments],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout[result.stdout.index("\n{\n"):])
    assert set(measured) >= {"pretraining_seconds", "prompt_accuracy_held_out_scenes", "detector_on_vae_scenes"}
    unet = tmp_path / "cli" / "unet" / "diffusion_pytorch_model.safetensors"
    recorded = metadata(unet)
    assert json.loads(recorded["lora_lab.make_base.settings"]) == {**vars(Settings()), **TINY}
    assert json.loads(recorded["lora_lab.make_base.measured"])["unet_steps_done"] == 3
    pipeline = load_base(tmp_path / "cli")
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == 32
    again = make_base(tmp_path / "again", Settings(**TINY))
    assert again.keys() == measured.keys()
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "detector.safetensors"):
        with safe_open(tmp_path / "cli" / name, "pt") as first, safe_open(tmp_path / "again" / name, "pt") as second:
            for key in first.keys():
                assert torch.equal(first.get_tensor(key), second.get_tensor(key)), (name, key)
