"""Checks every diffusers family's tests run the same way on its tiny pipeline: training lowers the validation loss
and strength 0 samples the base exactly; gradient checkpointing recomputes the same losses; the CLI trains a saved
base and writes the family's file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from lora_core import load_file
from lora_core.data.config import DatasetConfig
from lora_core.data.dataset import ImageFolderDataset
from lora_core.families.sd1 import generate
from lora_core.network import LoRANetwork
from lora_core.training.config import TrainingConfig
from lora_core.training.loop import train
from support.tiny_flow_models import concept_images

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a photo of sks"


def check_training_lowers_the_validation_loss_and_strength_zero_is_the_base(
        backend, pipeline, tmp_path: Path, preset: str, text_encoder: bool = False, guidance_scale: float | None = None,
        fall: float = 0.9) -> None:
    """30 steps at lr 1e-2 on 4 concept images take the validation loss below `fall` × the untrained one; an image
    at strength 0 is the base's pixel for pixel, at strength 1 not."""
    dataset = ImageFolderDataset(concept_images(tmp_path / "concept", 4), DatasetConfig(resolution=64))
    network = LoRANetwork.create(backend.adapter_targets(preset, text_encoder), "lora", 4, 4)
    result = train(backend, network, dataset, TrainingConfig(
        steps=30, learning_rate=1e-2, gradient_accumulation=1, validation_every=30, validation_timesteps=4))
    (_, before), (_, after) = result.validation
    print(f"{backend.family} validation loss {before:.4f} -> {after:.4f}, {result.steps / result.seconds:.1f} steps/s")
    assert after < fall * before
    images = {strength: np.asarray(generate(pipeline, network, PROMPT, strength, seed=3, steps=2, size=64,
                                            guidance_scale=guidance_scale)) for strength in (0.0, 1.0)}
    base = np.asarray(generate(pipeline, None, PROMPT, seed=3, steps=2, size=64, guidance_scale=guidance_scale))
    assert np.array_equal(images[0.0], base) and not np.array_equal(images[1.0], base)


def check_gradient_checkpointing_recomputes_the_same_training(backend, tmp_path: Path, text_encoder: bool = False
                                                              ) -> None:
    """Checkpointing the denoiser's blocks changes memory, not the losses of 2 steps of the `full` preset."""
    dataset = ImageFolderDataset(concept_images(tmp_path / "concept", 2), DatasetConfig(resolution=64))
    losses = []
    for checkpointing in (False, True):
        network = LoRANetwork.create(backend.adapter_targets("full", text_encoder), "lora", 4, 4)
        losses.append(train(backend, network, dataset, TrainingConfig(
            steps=2, learning_rate=1e-2, gradient_accumulation=1, validation_every=0,
            gradient_checkpointing=checkpointing)).losses)
    assert losses[0] == losses[1]


def cli_trains(pipeline, tmp_path: Path, *arguments: str) -> tuple[dict, dict]:
    """`python -m lora_core train` on `pipeline` saved to tmp_path/base (20 steps at 64 px, rank 4, lr 1e-2, and
    `arguments`): it succeeds, the validation loss falls (the best step is the last), and the file's tensors and
    metadata are returned."""
    pipeline.save_pretrained(tmp_path / "base")
    data = concept_images(tmp_path / "concept", 4)
    out = tmp_path / "lora.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "lora_core", "train", "--base", str(tmp_path / "base"), "--data", str(data), "--out",
         str(out), "--steps", "20", "--resolution", "64", "--rank", "4", "--lr", "1e-2", "--gradient-accumulation",
         "1", "--validation-every", "20", *arguments],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["best_step"] == 20, "the validation loss must fall"
    return load_file(out)
