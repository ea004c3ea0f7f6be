"""The memory plan the loop makes before the first step: it counts what is loaded, it refuses with the fewest changes
that would fit, and its totals are within 15 % of the peaks measured on an H200 (bench/results: the plan rebuilt from
each run's sizes with today's constants, against `torch.cuda.max_memory_allocated` of LoRA Lab's run)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support.tiny_flow_models import build_tiny_flux, concept_images

from lora_core import (
    DatasetConfig,
    ImageFolderDataset,
    LoRANetwork,
    TrainingConfig,
    train,
)
from lora_core.families.flux import FLUX, FluxBackend
from lora_core.families.hunyuan_video import HUNYUAN_VIDEO
from lora_core.families.qwen_image import QWEN_IMAGE
from lora_core.families.sd1 import SD1
from lora_core.families.sdxl import SDXL
from lora_core.families.wan import WAN
from lora_core.training.memory_plan import GIB, MemoryPlan

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results"


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in [*module.parameters(), *module.buffers()])


def test_the_plan_counts_what_is_loaded_and_the_runs_shapes(tmp_path) -> None:
    """Tiny Flux at 64 px: weights are the transformer's bytes, the other models the VAE's and text encoders', the
    LoRA its values with gradients and AdamW's two moments (16 bytes each), the tokens the 2×2-packed latent's and the
    caption's; the plan is the result's too."""
    pipeline = build_tiny_flux(seed=0)
    backend = FluxBackend(pipeline)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4)
    dataset = ImageFolderDataset(concept_images(tmp_path, 2), DatasetConfig(resolution=64))
    plans = []
    result = train(backend, network, dataset, TrainingConfig(steps=1, validation_every=0, batch_size=2),
                   memory_plan=plans.append)
    (plan,) = plans
    others = [pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2]
    assert plan.weights == tensor_bytes(pipeline.transformer)
    assert plan.other_models == sum(tensor_bytes(module) for module in others)
    assert plan.adapters == 16 * sum(parameter.numel() for parameter in network.parameters())
    context = backend.encode_text(["a photo of sks, red circle"])["context"].shape[1]
    assert plan.tokens == 2 * ((64 // 8) ** 2 // 4 + context)
    assert (plan.width, plan.blocks) == (pipeline.transformer.config.num_attention_heads
                                         * pipeline.transformer.config.attention_head_dim, 2)
    assert plan.activations == int((2 * FLUX.saved_activations + 24) * plan.tokens * plan.width * 4)
    assert result.memory_plan == plan.describe() and "planned, not measured" in plan.describe()


def flux_dev_like(checkpointing: bool, other_models: float = 9.8) -> MemoryPlan:
    """Flux.1-dev in bf16 at 1024 px with T5 and CLIP on the device."""
    return MemoryPlan(int(22.2 * GIB), int(11.9e9), int(other_models * GIB), 300 * 2**20, 4096 + 512, 3072, 57, 2,
                      checkpointing, FLUX.saved_activations)


def test_a_run_that_will_not_fit_is_refused_with_the_fewest_changes_that_fit() -> None:
    plan = flux_dev_like(checkpointing=False)
    assert plan.refusal(int(plan.total) + 1) is None
    only_checkpointing = plan.refusal(40 * GIB)
    assert "it would fit with gradient_checkpointing on (≈" in only_checkpointing
    assert "text encoders" not in only_checkpointing and "fp8" not in only_checkpointing
    all_three = plan.refusal(24 * GIB)
    assert ("gradient_checkpointing on and the text encoders and VAE off this device (latents and captions cached) and "
            "the denoiser's weights in fp8") in all_three
    assert "at most" not in all_three
    fewer_tokens = flux_dev_like(checkpointing=True, other_models=0).refusal(int(11.6 * GIB))
    assert "weights in fp8" in fewer_tokens and "tokens a batch (now 4,608" in fewer_tokens
    assert "whatever these settings" in plan.refusal(6 * GIB)


# The measured runs: file, residual width, blocks, text tokens of the benchmark's synthetic captions, the family
MEASURED = [
    ("h200_wan_1.3b_480x832x33.json", 1536, 30, 512, WAN),
    ("h200_wan_14b_480x832x33.json", 5120, 40, 512, WAN),
    ("h200_hunyuan_video_544x960x33.json", 3072, 60, 128, HUNYUAN_VIDEO),
    ("h200_qwen_image_bf16_checkpointing.json", 3072, 60, 128, QWEN_IMAGE),
    ("h200_plan_flux_1024_checkpointing.json", 3072, 57, 512, FLUX),
    ("h200_plan_flux_512_no_checkpointing.json", 3072, 57, 512, FLUX),
    ("h200_flux_block_cudnn_off.json", 3072, 3, 512, FLUX),
    ("h200_plan_wan_1.3b_480x832x33_no_checkpointing.json", 1536, 30, 512, WAN),  # Wan's constant is fitted here
]


@pytest.mark.parametrize(("name", "width", "blocks", "text_tokens", "family"), MEASURED,
                         ids=[name.removesuffix(".json") for name, *_ in MEASURED])
def test_the_plan_is_within_15_percent_of_the_peak_measured_on_a_gpu(name, width, blocks, text_tokens,
                                                                     family) -> None:
    report = json.loads((RESULTS / name).read_text())
    resolution = report.get("resolution")
    latent_tokens = report.get("tokens") or (resolution // 16) ** 2
    lora = report["lora_parameters"]["lora_lab"]
    plan = MemoryPlan(report["weight_bytes_each"], report["denoiser_parameters"], 0, 16 * lora,
                      latent_tokens + text_tokens, width, blocks, 2, bool(report["gradient_checkpointing"]),
                      family.saved_activations)
    alone = "reference" not in report["peak_memory_bytes"]  # one copy of the denoiser: the absolute peak is its own
    measured = (report["peak_memory_total_bytes"]["lora_lab"] if alone
                else report["weight_bytes_each"] + report["peak_memory_bytes"]["lora_lab"])
    print(f"{name}: planned {plan.total / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB")
    assert abs(plan.total / measured - 1) <= 0.15, (plan.total / GIB, measured / GIB)


# The UNet runs on the H200 (bf16, no checkpointing, beside the reference): file, family; its first level is 320 wide
MEASURED_UNETS = [("h200_full_bf16.json", SD1), ("h200_sdxl_bf16.json", SDXL)]


@pytest.mark.parametrize(("name", "family"), MEASURED_UNETS, ids=[name.removesuffix(".json") for name, _ in
                                                                  MEASURED_UNETS])
def test_a_unets_plan_is_within_15_percent_of_the_peak_measured_on_a_gpu(name, family) -> None:
    """The UNets' constants were fitted on this CPU's peak RSS at 512 px (test_memory_plan_rss.py); these runs are
    the GPU's check of them."""
    report = json.loads((RESULTS / name).read_text())
    parameters = report.get("denoiser_parameters") or report["unet_parameters"]
    weights = report.get("weight_bytes_each") or 2 * parameters  # bf16
    positions = (report["resolution"] // 8) ** 2
    plan = MemoryPlan(weights, parameters, 0, 16 * report["lora_parameters"]["lora_lab"], positions, 320, 0, 2,
                      False, 0.0, unet_values=family.unet_activations)
    measured = weights + report["peak_memory_bytes"]["lora_lab"]
    print(f"{name}: planned {plan.total / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB")
    assert abs(plan.total / measured - 1) <= 0.15, (plan.total / GIB, measured / GIB)
    assert abs(plan.activations / (measured - weights - plan.adapters) - 1) <= 0.15


def test_a_unets_plan_counts_its_activations_from_the_latents_area(pipeline, concept_dir) -> None:
    """The tiny SD1 UNet at 64 px, batch 2: its latent positions, its first level's width and SD1's constant."""
    from support.training_runs import make

    backend, dataset, network = make(pipeline, concept_dir)
    plans = []
    train(backend, network, dataset, TrainingConfig(steps=1, validation_every=0, batch_size=2),
          memory_plan=plans.append)
    (plan,) = plans
    assert plan.tokens == 2 * (64 // 8) ** 2 and plan.width == pipeline.unet.config.block_out_channels[0]
    assert plan.activations == int(SD1.unet_activations[0] * plan.tokens * plan.width * 4) > 0
    assert "latent positions" in plan.describe() and "not planned" not in plan.describe()


def test_cpu_offload_checkpointing_is_planned_and_offered_where_it_makes_the_run_fit() -> None:
    """With the blocks' inputs in host memory the plan keeps 3 of them instead of all 57; a run that fits only so is
    told to turn it on."""
    plan = flux_dev_like(checkpointing=True, other_models=0)
    plan = replace(plan, weights=plan.weight_values)  # fp8 already
    offloaded = replace(plan, offloaded=True)
    assert offloaded.activations == int((3 + FLUX.saved_activations + 24) * plan.tokens * plan.width * 2)
    assert "its inputs in host memory" in offloaded.describe()
    refusal = plan.refusal((offloaded.total + plan.total) // 2)
    assert "it would fit with cpu_offload_checkpointing on (≈" in refusal


def test_the_plan_counts_the_host_memory_of_what_is_off_the_device() -> None:
    """Planned for a GPU with every model still in host memory: the device gets no weights, the host all of them,
    the swapped blocks once, and with cpu_offload_checkpointing each block's input; a CPU run has no separate host."""
    from lora_core.training.memory_plan import plan_memory

    pipeline = build_tiny_flux(seed=0)
    backend = FluxBackend(pipeline)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4)
    frozen, blocks = backend.frozen_modules(), backend.checkpoint_blocks()
    for module in frozen:
        module.requires_grad_(False)  # as the loop freezes them
    everything = sum(tensor_bytes(module) for module in frozen)

    def planned(device: str, swapped: int = 0, offloaded: bool = False) -> MemoryPlan:
        return plan_memory(frozen, blocks, network, torch.device(device), 64, 77, 1, 4, True, "adamw",
                           FLUX.saved_activations, swapped, offloaded=offloaded)

    plan = planned("cuda")
    assert plan.weights == plan.other_models == 0 and plan.host == everything
    assert f"≈ {plan.host / 2**20:.0f} MiB in host memory (the models off the device)" in plan.describe()
    swapped = planned("cuda", swapped=1)
    assert swapped.host == everything and swapped.swapped_in == 2 * tensor_bytes(blocks[-1])
    assert "the swapped blocks" in swapped.describe()
    offloaded = planned("cuda", offloaded=True)
    assert offloaded.host == everything + len(blocks) * plan.tokens * plan.width * 4
    assert planned("cpu").host_weights is None and "host memory" not in planned("cpu").describe()
