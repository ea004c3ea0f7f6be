"""Train-step benchmark: LoRA Lab against the diffusers + PEFT reference loop on the same SD1.5- or SDXL-architecture
UNet.

The reference is the loop of diffusers' `train_text_to_image_lora.py`: PEFT LoRA on to_q/to_k/to_v/to_out.0,
trainable parameters cast to fp32, autocast in the base dtype, AdamW, gradient clipping. LoRA Lab trains the same
targets through `lora_core.train` (fp32 adapters, no autocast). Both run in one process, in alternating blocks
after warm-up, with random weights, latents and text embeddings (no download). Prints JSON with median seconds per
optimizer step, peak memory above the resident weights, and the ratios LoRA Lab / reference.

    python bench/train_step.py --size small                       # the routine CPU check, well under a minute
    python bench/train_step.py --size full --device cuda --dtype bf16   # full-size SD1.5 UNet at 512 px
    python bench/train_step.py --size sdxl --device cuda --dtype bf16   # full-size SDXL UNet at 1024 px
    python bench/train_step.py --size sdxl-block --resolution 256       # SDXL's widths, 2 of its 10 deepest layers
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, train  # noqa: E402
from lora_core.backend import TrainingBackend  # noqa: E402
from lora_core.targets import UNET_PREFIX, find_targets, named_for_kohya  # noqa: E402

SDXL = dict(  # SDXL 1.0's UNet configuration (2.6 B parameters)
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
UNETS = {
    "full": dict(  # Stable Diffusion 1.5's UNet configuration (860 M parameters)
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "small": dict(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sdxl": SDXL,
    # SDXL's widths and blocks with 2 of the 10 transformer layers of its deepest level (0.9 B parameters): the
    # reference's copy and LoRA Lab's model fit a 24 GB CPU machine in fp32
    "sdxl-block": {**SDXL, "transformer_layers_per_block": (1, 2, 2)},
    "sdxl-small": {**SDXL, "block_out_channels": (32, 64, 64), "transformer_layers_per_block": (1, 1, 1),
                   "attention_head_dim": (2, 4, 4), "cross_attention_dim": 32, "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": 16 + 6 * 8, "sample_size": 8, "layers_per_block": 1},
}
DEFAULT_RESOLUTION = {"full": 512, "sdxl": 1024, "sdxl-block": 1024}  # 64 px for the small variants
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RANK = 8


class SyntheticBackend(TrainingBackend):
    """The UNet with fixed random latents and text embeddings standing in for the VAE and CLIP."""

    def __init__(self, unet, scheduler, latent_size: int, device: torch.device) -> None:
        self.unet, self.scheduler, self.device = unet, scheduler, device
        generator = torch.Generator().manual_seed(0)
        self.latent = torch.randn(4, latent_size, latent_size, generator=generator).to(device)
        self.embedding = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to(device, unet.dtype)
        self.added = None  # SDXL's pooled text embedding and size/crop numbers
        if unet.config.addition_embed_type == "text_time":
            pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            self.added = {"text_embeds": torch.randn(1, pooled_width, generator=generator).to(device, unet.dtype),
                          "time_ids": torch.tensor([[8.0 * latent_size] * 2 + [0.0] * 2 + [8.0 * latent_size] * 2],
                                                   device=device, dtype=unet.dtype)}

    def alphas_cumprod(self):
        return self.scheduler.alphas_cumprod

    def encode_images(self, pixels, generator):
        return self.latent.expand(pixels.shape[0], -1, -1, -1)

    def encode_text(self, captions):
        return {"context": self.embedding.expand(len(captions), -1, -1)}

    def predict(self, noisy_latents, timesteps, conditioning):
        context, batch = conditioning["context"], noisy_latents.shape[0]
        added = None if self.added is None else {key: value.expand(batch, -1) for key, value in self.added.items()}
        return self.unet(noisy_latents.to(self.unet.dtype), timesteps, encoder_hidden_states=context,
                         added_cond_kwargs=added).sample

    def adapter_targets(self, preset, text_encoder):
        return named_for_kohya(UNET_PREFIX, find_targets(self.unet, preset))

    def loadable_modules(self):
        return self.adapter_targets("full", False)

    def frozen_modules(self):
        return [self.unet]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_baseline(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_above(device: torch.device, baseline: int) -> int:
    return torch.cuda.max_memory_allocated() - baseline if device.type == "cuda" else 0


def lora_lab_block(backend, dataset, network, steps: int, precision: str) -> tuple[list[float], int, list[float]]:
    """`steps` optimizer steps through lora_core.train; per-step seconds, peak memory, losses."""
    baseline = memory_baseline(backend.device)
    stamps: list[float] = []

    def record(report) -> None:
        synchronize(backend.device)
        stamps.append(time.perf_counter())

    config = TrainingConfig(steps=steps, gradient_accumulation=1, mixed_precision=precision)
    result = train(backend, network, dataset, config, callback=record)
    return list(np.diff(stamps)), peak_above(backend.device, baseline), result.losses


def reference_block(unet, scheduler, backend, steps: int, dtype: torch.dtype) -> tuple[list[float], int, list[float]]:
    """The diffusers LoRA script's inner loop on a PEFT-adapted UNet."""
    device = backend.device
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    latents = backend.latent[None]
    baseline = memory_baseline(device)
    stamps, losses = [], []
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(noisy, timesteps, backend.embedding, added_cond_kwargs=backend.added).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        synchronize(device)
        stamps.append(time.perf_counter())
    return list(np.diff(stamps)), peak_above(device, baseline), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(UNETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: 512 (full), 1024 (sdxl, sdxl-block), 64 (small, sdxl-small)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per block (after 2 warm-up steps)")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks of each trainer")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                        help="LoRA Lab's autocast setting (the reference always autocasts to --dtype)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of "
                        "one block of each trainer to stderr")
    args = parser.parse_args()

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    resolution = args.resolution or DEFAULT_RESOLUTION.get(args.size, 64)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNETS[args.size]).to(device, dtype)
    reference_unet = copy.deepcopy(unet)
    unet.requires_grad_(False)
    reference_unet.requires_grad_(False)
    reference_unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                          target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for parameter in reference_unet.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()

    backend = SyntheticBackend(unet, scheduler, resolution // 8, device)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=RANK).to(device)
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for index in range(4):
            Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(f"{folder}/{index}.png")
        dataset = ImageFolderDataset(folder, DatasetConfig(resolution=resolution))

    before = {k: v.clone() for k, v in network.state_dict().items()}
    ours, reference = {"seconds": [], "memory": [], "losses": []}, {"seconds": [], "memory": [], "losses": []}
    for _ in range(args.blocks):
        for name, results, block in (
            ("reference", reference, lambda: reference_block(reference_unet, scheduler, backend, args.steps + 2, dtype)),
            ("lora_lab", ours, lambda: lora_lab_block(backend, dataset, network, args.steps + 2, args.mixed_precision)),
        ):
            seconds, memory, losses = block()
            results["seconds"] += seconds[1:]  # the first interval still warms up
            results["memory"].append(memory)
            results["losses"] += losses

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        for name, block in (("reference", lambda: reference_block(reference_unet, scheduler, backend, 3, dtype)),
                            ("lora_lab", lambda: lora_lab_block(backend, dataset, network, 3, args.mixed_precision))):
            with profile(activities=activities) as profiler:
                block()
            print(f"== {name}\n{profiler.key_averages().table(sort_by=sort, row_limit=18)}", file=sys.stderr)

    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "unet": args.size, "dtype": args.dtype, "lora_lab_mixed_precision": args.mixed_precision,
        "resolution": resolution, "rank": RANK,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "lora_parameters": {"lora_lab": sum(p.numel() for p in network.parameters()),
                            "reference": sum(p.numel() for p in reference_unet.parameters() if p.requires_grad)},
        "median_step_seconds": {"lora_lab": statistics.median(ours["seconds"]),
                                "reference": statistics.median(reference["seconds"])},
        "peak_memory_bytes": {"lora_lab": max(ours["memory"]), "reference": max(reference["memory"])},
        "lora_lab_parameter_dtypes": sorted({str(p.dtype) for p in network.parameters()}),
        "losses_finite": bool(np.isfinite(ours["losses"]).all() and np.isfinite(reference["losses"]).all()),
        "lora_lab_weights_changed": any(not torch.equal(v, before[k]) for k, v in network.state_dict().items()),
    }
    report["step_ratio"] = report["median_step_seconds"]["lora_lab"] / report["median_step_seconds"]["reference"]
    if device.type == "cuda":
        report["memory_ratio"] = report["peak_memory_bytes"]["lora_lab"] / report["peak_memory_bytes"]["reference"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
