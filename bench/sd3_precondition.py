"""SD3's two flow-matching losses compared on the tiny SD3 of the tests: the plain velocity loss ‖v̂ − v‖² and the
x0-preconditioned one (σ²·‖v̂ − v‖², diffusers' `--precondition_outputs 1` and kohya's SD3 trainer). Each seed trains
one LoRA per loss on the same images with the same settings; both are then judged on one common yardstick, the
x0 error ‖x̂0 − x0‖² (what a sampler's denoised estimate gets wrong) and the velocity error, on fixed noise at 8
stratified σ of held-out images of the same concept (other circles, never trained on). Prints JSON.

    python bench/sd3_precondition.py --seeds 5 --steps 100   # bench/results/cpu_sd3_precondition.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_flow_models import build_tiny_sd3, concept_images  # noqa: E402

from lora_core.data.config import DatasetConfig  # noqa: E402
from lora_core.data.dataset import ImageFolderDataset  # noqa: E402
from lora_core.families.sd3 import SD3Backend  # noqa: E402
from lora_core.network import LoRANetwork  # noqa: E402
from lora_core.training.config import TrainingConfig  # noqa: E402
from lora_core.training.loop import train  # noqa: E402
from lora_core.training.objectives import stratified_sigmas  # noqa: E402


@torch.no_grad()
def errors(backend: SD3Backend, network: LoRANetwork, dataset: ImageFolderDataset) -> dict[str, float]:
    """Mean x0 and velocity squared errors over every image at 8 stratified σ, with fixed noise."""
    pixels = torch.stack([dataset.image_pixels(image) for image in range(dataset.num_images)])
    latents = backend.encode_images(pixels, torch.Generator().manual_seed(0))
    conditioning = backend.encode_text([dataset.examples[image].caption for image in range(dataset.num_images)])
    x0_error, velocity_error = [], []
    with network.applied(1.0):
        for sigma in stratified_sigmas(8).tolist():
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(int(sigma * 1e6)))
            noisy = (1 - sigma) * latents + sigma * noise
            velocity = backend.predict(noisy, torch.full((len(latents),), sigma * 1000), conditioning).float()
            velocity_error.append((velocity - (noise - latents)).square().mean().item())
            x0_error.append((noisy - sigma * velocity - latents).square().mean().item())
    return {"x0": sum(x0_error) / len(x0_error), "velocity": sum(velocity_error) / len(velocity_error)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        images = concept_images(Path(folder) / "concept", 4)
        held_out = ImageFolderDataset(concept_images(Path(folder) / "held_out", 4, seed=1),
                                      DatasetConfig(resolution=64))
        for seed in range(args.seeds):
            pipeline = build_tiny_sd3(seed=seed)
            backend = SD3Backend(pipeline)
            dataset = ImageFolderDataset(images, DatasetConfig(resolution=64))
            row = {"seed": seed}
            for precondition in (False, True):
                network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4, seed=seed)
                row["base"] = errors(backend, network, held_out) if "base" not in row else row["base"]
                train(backend, network, dataset, TrainingConfig(
                    steps=args.steps, learning_rate=1e-2, seed=seed, precondition_outputs=precondition))
                row["preconditioned" if precondition else "plain"] = errors(backend, network, held_out)
            results.append(row)
    mean = {loss: {metric: sum(row[loss][metric] for row in results) / len(results) for metric in ("x0", "velocity")}
            for loss in ("base", "plain", "preconditioned")}
    print(json.dumps({"steps": args.steps, "per_seed": results, "mean": mean}, indent=1))


if __name__ == "__main__":
    main()
