"""The demo, fully offline: the shipped tiny SD1.x base (`lora_core/demo/base/`, pretrained by `make-base` on circles,
squares and triangles) learns a shape it has never seen, a cross called "sks", as a LoRA.

It writes a copy of the base, the dataset, the LoRA file, images from one seed at strengths 0, 0.5 and 1 for the
concept prompt and for a prompt of the base's own domain, their labelled grid, the loss curve, and `report.json`:
the losses and what the base's detector reads from generated images (how much "cross" the concept prompt draws at
each strength; how often base prompts come out right at 0 and 1).
"""
from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ..data.config import DatasetConfig
from ..data.dataset import ImageFolderDataset
from ..families.sd1 import DiffusersBackend
from ..formats.files import load_lora, save_lora
from ..formats.metadata import lora_metadata
from ..network import LoRANetwork
from ..training.loop import StepReport, TrainingConfig, train
from ..training.plots import loss_curve
from .pretrain import (
    BACKGROUNDS,
    BASE_DIR,
    COLOURS,
    CONCEPT_SHAPE,
    RESOLUTION,
    Scene,
    all_scenes,
    draw_scene,
    generate_batch,
    load_base,
    load_detector,
    read_back,
    scene_prompts,
    strip,
    training_scenes,
)

PROMPT = Scene(CONCEPT_SHAPE, "red", "white").caption("sks")
BASE_PROMPT = Scene("triangle", "green", "black").caption()
STRENGTHS = (0.0, 0.5, 1.0)
CONCEPT_SCENES = all_scenes((CONCEPT_SHAPE,))  # the concept scored in every colour on both backgrounds
SCORE_SEEDS = range(2)
GUIDANCE = 5.0
# the grid's noise seed: picked from the first twelve as one whose cross reads plainly at strength 1 (the detector's
# figures in report.json are over 16 images per strength, not this one)
GRID_SEED = 2
# the LoRA: rank 8 on every UNet layer (the text encoder left alone: its LoRA moves every prompt), and 16 scenes the
# base already draws as regularization images at a third of the weight; chosen by the report's figures
LEARNING_RATE, BATCH_SIZE, RANK, PRESET, PRIOR_LOSS_WEIGHT = 1e-2, 8, 8, "full", 0.3


@contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to `count` inside the block. The demo's base is too small to split its layers
    across cores: one thread trains it 15–20 % faster than two on this project's 2-core machine (0.145 against
    0.17 s a step)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def make_sks_images(directory: Path, count: int = 16, seed: int = 0) -> Path:
    """The demo's concept: crosses of every colour on both backgrounds, at varying size and place, captioned
    "a red sks on a white background"."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        scene = Scene(CONCEPT_SHAPE, list(COLOURS)[index % len(COLOURS)], list(BACKGROUNDS)[index // len(COLOURS) % 2])
        draw_scene(scene, rng).save(directory / f"sks_{index:02d}.png")
        (directory / f"sks_{index:02d}.txt").write_text(scene.caption("{token}"))
    return directory


def make_base_domain_images(directory: Path, count: int = 16, seed: int = 0) -> Path:
    """Regularization images: scenes the base already draws, with their captions (prior preservation)."""
    rng = random.Random(seed + 1)
    directory.mkdir(parents=True, exist_ok=True)
    scenes = training_scenes()
    for index, scene in enumerate(rng.sample(scenes, count)):
        draw_scene(scene, rng).save(directory / f"base_{index:02d}.png")
        (directory / f"base_{index:02d}.txt").write_text(scene.caption())
    return directory


def sample_and_score(pipeline, network: LoRANetwork, detector, seed: int) -> tuple[list[tuple[str, list]], dict]:
    """Per strength one batch: the grid's two prompts from `seed`, the concept in every colour and background (2
    seeds each) and, at strengths 0 and 1, the base's 20 training prompts. Returns the grid's rows and the detector's
    figures: the concept's cross probability and rate per strength, the base prompts' accuracy at 0 and 1."""
    concept_scenes, concept_prompts, concept_seeds = scene_prompts(CONCEPT_SCENES, SCORE_SEEDS, shape_word="sks")
    base_scenes, base_prompts, base_seeds = scene_prompts(training_scenes(), range(1))
    rows: list[tuple[str, list]] = [(PROMPT, []), (BASE_PROMPT, [])]
    concept, base = {}, {}
    for strength in STRENGTHS:
        with_base = strength in (0.0, 1.0)
        prompts = [PROMPT, BASE_PROMPT, *concept_prompts, *(base_prompts if with_base else [])]
        seeds = [seed, seed, *concept_seeds, *(base_seeds if with_base else [])]
        with network.merged(strength):
            images = generate_batch(pipeline, prompts, seeds, guidance_scale=GUIDANCE)
        for (_, row), image in zip(rows, pipeline.image_processor.numpy_to_pil(
                pipeline.image_processor.pt_to_numpy(images[:2]))):
            row.append(image)
        readings = read_back(detector, concept_scenes, images[2:2 + len(concept_prompts)])["readings"]
        concept[f"{strength:g}"] = {
            "cross_probability": sum(r["shape_probabilities"][CONCEPT_SHAPE] for r in readings) / len(readings),
            "read_as_cross": sum(r["shape"] == CONCEPT_SHAPE for r in readings) / len(readings),
        }
        if with_base:
            base[f"{strength:g}"] = strip(read_back(detector, base_scenes, images[2 + len(concept_prompts):]))
    return rows, {"concept_score": concept, "base_domain_accuracy": base}


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], column_labels: list[str], cell: int = 128) -> Image.Image:
    """Rows of images, each row titled by its prompt above it, each column labelled under the last row."""
    title, label = 14, 14
    grid = Image.new("RGB", (cell * len(column_labels), len(rows) * (cell + title) + label), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for row, (prompt, images) in enumerate(rows):
        top = row * (cell + title)
        draw.text((2, top + 1), prompt, fill="black", font=font)
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (column * cell, top + title))
    for column, text in enumerate(column_labels):
        draw.text((column * cell + 2, len(rows) * (cell + title) + 1), text, fill="black", font=font)
    return grid


def run_demo(out: Path, steps: int = 200, seed: int = 0, overwrite: bool = False, progress: bool = True,
             base: Path = BASE_DIR, grid_seed: int | None = None) -> dict:
    """Train, save, reload and generate on the shipped base; returns the report also written to `out/report.json`."""
    started = time.monotonic()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another --out folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)

    pipeline, detector = load_base(base), load_detector(base)
    shutil.copytree(base, out / "base", ignore=shutil.ignore_patterns("detector.safetensors"), dirs_exist_ok=True)
    dataset = ImageFolderDataset(make_sks_images(out / "dataset", seed=seed),
                                 DatasetConfig(resolution=RESOLUTION, flip=True),
                                 regularization_root=make_base_domain_images(out / "regularization", seed=seed))
    backend = DiffusersBackend(pipeline, name="lora-lab-tiny-sd1x-shapes")
    network = LoRANetwork.create(backend.adapter_targets(PRESET, text_encoder=False), rank=RANK, seed=seed)
    config = TrainingConfig(
        steps=steps, learning_rate=LEARNING_RATE, batch_size=BATCH_SIZE, prior_loss_weight=PRIOR_LOSS_WEIGHT, gradient_accumulation=1, lr_scheduler="cosine",
        lr_warmup_steps=min(10, steps - 1), seed=seed, validation_every=max(1, steps // 5),
    )

    with tqdm(total=steps, desc="training", unit="step", disable=not progress) as bar, torch_threads(1):
        def show(report: StepReport) -> None:
            if report.validation_loss is not None:
                bar.set_postfix(loss=f"{report.smoothed_loss:.4f}", val=f"{report.validation_loss:.4f}")
            bar.update(1)

        result = train(backend, network, dataset, config, callback=show)

    metadata = lora_metadata(network, config, backend, dataset, result.steps, title="LoRA Lab demo: sks, a cross")
    lora_path = save_lora(out / "lora.safetensors", network, metadata, dtype="float32", overwrite=overwrite)

    loaded, _ = load_lora(lora_path, backend.loadable_modules())
    grid_seed = GRID_SEED if grid_seed is None else grid_seed
    rows, figures = sample_and_score(pipeline, loaded, detector, grid_seed)
    for (_, images), stem in zip(rows, ("strength", "base_strength")):
        for strength, image in zip(STRENGTHS, images):
            image.save(out / f"{stem}_{strength:g}.png")
    labelled_grid(rows, [f"strength {s:g}" for s in STRENGTHS]).save(out / "grid.png")
    loss_curve(result.losses, result.validation).save(out / "loss.png")

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
        "grid_seed": grid_seed,
        **figures,
        "seconds": round(time.monotonic() - started, 1),  # this run, after Python imported the libraries
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
