"""The demo, fully offline: a random tiny SD1.x pipeline learns a synthetic concept ("sks", a red circle) as a LoRA.

It writes the base pipeline, the dataset, the LoRA file, images from one seed at strengths 0, 0.5 and 1, their
grid, the loss curve and `report.json` with the numbers that show the LoRA learned.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from .dataset import DatasetConfig, ImageFolderDataset
from .diffusers_backend import DiffusersBackend, generate
from .config import lora_metadata
from .files import load_lora, save_lora
from .network import LoRANetwork
from .plots import image_grid, loss_curve
from .tiny_model import build_tiny_pipeline
from .training import StepReport, TrainingConfig, train

PROMPT = "a photo of sks"
STRENGTHS = (0.0, 0.5, 1.0)


def make_concept_images(directory: Path, count: int = 8, resolution: int = 64, seed: int = 0) -> Path:
    """Red circles of varying size and place on white; half captioned, half left to the default caption."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (resolution, resolution), (245, 245, 240))
        radius = resolution * rng.uniform(0.22, 0.32)
        x, y = (resolution / 2 + rng.uniform(-0.1, 0.1) * resolution for _ in range(2))
        ImageDraw.Draw(image).ellipse((x - radius, y - radius, x + radius, y + radius), fill=(210, 30, 40))
        image.save(directory / f"circle_{index:02d}.png")
        if index % 2 == 0:
            (directory / f"circle_{index:02d}.txt").write_text("a photo of {token}, red circle")
    return directory


@torch.no_grad()
def training_latents(pipeline, dataset: ImageFolderDataset) -> torch.Tensor:
    """The VAE means of the training images, scaled as the UNet sees them."""
    return torch.stack([
        pipeline.vae.encode(dataset.image_pixels(i)[None]).latent_dist.mean[0] * pipeline.vae.config.scaling_factor
        for i in range(dataset.num_images)
    ])


@torch.no_grad()
def concept_distance(pipeline, network: LoRANetwork, references: torch.Tensor, strength: float, seeds: range) -> float:
    """Mean RMS distance from latents generated at `strength` to the nearest training latent."""
    distances = []
    for seed in seeds:
        latent = generate(pipeline, network, PROMPT, strength, seed, steps=20, output_type="latent")
        distances.append(((references - latent[None]) ** 2).mean(dim=(1, 2, 3)).sqrt().min().item())
    return sum(distances) / len(distances)


def run_demo(out: Path, steps: int = 200, seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Build, train, save, reload and generate; returns the report that is also written to `out/report.json`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another --out folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    resolution = 64

    pipeline = build_tiny_pipeline(seed, resolution)
    pipeline.save_pretrained(out / "base")
    dataset = ImageFolderDataset(
        make_concept_images(out / "dataset", resolution=resolution, seed=seed),
        DatasetConfig(resolution=resolution, flip=True),
    )
    backend = DiffusersBackend(pipeline, name="tiny-sd1x-random")
    network = LoRANetwork.create(backend.adapter_targets("transformer", text_encoder=False), rank=8, seed=seed)
    config = TrainingConfig(
        steps=steps, learning_rate=2e-3, batch_size=2, gradient_accumulation=1, lr_scheduler="cosine",
        lr_warmup_steps=min(10, steps - 1), seed=seed, validation_every=max(1, steps // 10),
    )

    with tqdm(total=steps, desc="training", unit="step", disable=not progress) as bar:
        def show(report: StepReport) -> None:
            if report.validation_loss is not None:
                bar.set_postfix(loss=f"{report.smoothed_loss:.4f}", val=f"{report.validation_loss:.4f}")
            bar.update(1)

        result = train(backend, network, dataset, config, callback=show)

    metadata = lora_metadata(network, config, backend, dataset, result.steps, title="LoRA Lab demo: sks red circle")
    lora_path = save_lora(out / "lora.safetensors", network, metadata, dtype="float32", overwrite=overwrite)

    loaded, _ = load_lora(lora_path, backend.loadable_modules())
    images = []
    for strength in STRENGTHS:
        image = generate(pipeline, loaded, PROMPT, strength, seed, steps=20)
        image.save(out / f"strength_{strength:g}.png")
        images.append(image)
    image_grid([image.resize((192, 192), Image.NEAREST) for image in images], [f"strength {s:g}" for s in STRENGTHS]).save(out / "grid.png")
    loss_curve(result.losses, result.validation).save(out / "loss.png")

    references = training_latents(pipeline, dataset)
    report = {
        "steps": result.steps,
        "first_loss": result.losses[0],
        "final_loss": result.losses[-1],
        "validation": [{"step": step, "loss": loss} for step, loss in result.validation],
        "validation_held_out": result.validation_held_out,
        "best_validation_loss": result.best_loss,
        "best_step": result.best_step,
        "seconds_per_step": result.seconds_per_step,
        "file_bytes": lora_path.stat().st_size,
        "lora_modules": len(loaded.adapters),
        "concept_distance": {
            f"{strength:g}": concept_distance(pipeline, loaded, references, strength, range(4)) for strength in STRENGTHS
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
