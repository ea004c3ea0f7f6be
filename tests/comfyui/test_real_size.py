"""Real-size models through a real ComfyUI server, as users run them: a full-size SDXL checkpoint by
CheckpointLoaderSimple, and a full-width Flux.1-dev transformer in fp8 by Load Diffusion Model with a full-size
T5-XXL in fp8 and CLIP-L by DualCLIPLoader. Each trains a few steps at 64 px (Training Options: gradient
checkpointing; Flux also with blocks_to_swap), Save LoRA writes the file, and ComfyUI's core loader reads every key
(no "lora key not loaded"), giving the image Apply LoRA gives and not the base's.

The models (random weights, ~13 GiB on disk) are written by tests/comfyui/make_real_size_models.py the first time.
These tests run in their own step of scripts/test.sh (`-m real_size`), on the 0.3.64 server only: ComfyUI holds the
SDXL UNet in fp32 on a CPU (10 GiB), more than the main step's servers leave free, and the March 2024 ComfyUI has
neither Load Diffusion Model's text-encoder folders nor Flux."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from lora_core.demo.demo import make_concept_images

from .harness import ComfyServer
from .make_real_size_models import (
    CLIP_L,
    FLUX_BLOCKS,
    FLUX_TRANSFORMER,
    FLUX_VAE,
    SDXL_CHECKPOINT,
    T5XXL,
)
from .test_lora_lab_nodes import pixels, sampling_nodes, saved_name

pytestmark = pytest.mark.real_size
SERVERS = ("0.3.64",)  # conftest parametrizes `comfy` with these only
DATASET = "lora_lab_real_size"
MAKER = "make_real_size_models.py"
# SDXL's transformer blocks: 2 × 2 and 2 × 10 down, 10 in the middle, 3 × 2 and 3 × 10 up; attn1 and attn2's
# q, k, v, out each
SDXL_ATTENTION_MODULES = (2 * 2 + 2 * 10 + 10 + 3 * 2 + 3 * 10) * 8
# Flux's `attention` preset: both streams' qkv and proj in a double block, linear1 and linear2 in a single one
FLUX_ATTENTION_MODULES = FLUX_BLOCKS * 4 + FLUX_BLOCKS * 2


@pytest.fixture(scope="module")
def models(comfy: ComfyServer) -> None:
    completed = subprocess.run([str(comfy.python), MAKER, "--comfy-dir", str(comfy.comfy_dir)],
                               cwd=Path(__file__).parent, capture_output=True, text=True, timeout=1800, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    print(completed.stdout)


@pytest.fixture(scope="module")
def dataset(comfy: ComfyServer) -> str:
    make_concept_images(comfy.input_dir / DATASET, count=2, resolution=64)
    return DATASET


def options_node(comfy: ComfyServer, **settings) -> dict:
    """Training Options with its defaults, but for `settings`."""
    info = comfy.get_json("/object_info/LoraLab_TrainingOptions2")["LoraLab_TrainingOptions2"]["input"]
    defaults = {name: spec[1]["default"] for section in info.values() for name, spec in section.items()
                if isinstance(spec, list) and len(spec) > 1 and "default" in spec[1]}
    return {"class_type": "LoraLab_TrainingOptions2", "inputs": {**defaults, **settings}}


def training_nodes(model: list, clip: list, vae: list, dataset: str, prefix: str, options: dict) -> dict:
    """Load Dataset → Inject LoRA (attention, rank 8) → Train LoRA (2 steps, batch 1) → Save LoRA, ids "2" to "6"."""
    return {
        "2": {"class_type": "LoraLab_LoadDataset", "inputs": {
            "folder": dataset, "resolution": 64, "caption_extension": ".txt", "default_caption": "a photo of {token}",
            "token": "sks", "repeats": 1, "flip": False}},
        "3": {"class_type": "LoraLab_InjectLoRA", "inputs": {
            "model": model, "clip": clip, "algorithm": "lora", "rank": 8, "alpha": 8.0, "target": "attention",
            "train_text_encoder": False}},
        "4": options,
        "5": {"class_type": "LoraLab_Train", "inputs": {
            "network": ["3", 0], "dataset": ["2", 0], "vae": vae, "steps": 2, "learning_rate": 1e-3, "batch_size": 1,
            "optimizer": "AdamW", "seed": 3, "sample_every": 0, "sample_prompts": "a photo of sks",
            "options": ["4", 0]}},
        "6": {"class_type": "LoraLab_SaveLoRA", "inputs": {"lora": ["5", 0], "filename_prefix": prefix,
                                                            "precision": "float32"}},
    }


def check_core_loader(comfy: ComfyServer, loader: dict, outputs: tuple[list, list, list], name: str,
                      model_only: bool, flux: bool) -> dict:
    """One graph: the base, core LoraLoader at 1.0 and Apply LoRA at 1.0 sampled alike; returns the three images'
    pixels and the log lines ComfyUI wrote meanwhile."""
    model, clip, vae = outputs
    if model_only:
        core = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": name,
                                                                "strength_model": 1.0}}
    else:
        core = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": name,
                                                       "strength_model": 1.0, "strength_clip": 1.0}}
    graph = {**loader, "2": core,
             "3": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": name}},
             "4": {"class_type": "LoraLab_ApplyLoRA", "inputs": {"model": model, "clip": clip, "lora": ["3", 0],
                                                                 "strength_model": 1.0, "strength_clip": 1.0}}}
    for first, sampled_model in ((10, model), (20, ["2", 0]), (30, ["4", 0])):
        nodes = sampling_nodes(first, sampled_model, clip, vae, seed=5, prefix=f"real_size_{first}")
        if flux:  # cfg 1 as Flux samples: the negative prompt is not used, so one encode serves both
            nodes[str(first + 3)]["inputs"].update(cfg=1.0, steps=2, negative=[str(first), 0])
            del nodes[str(first + 1)]
        else:
            nodes[str(first + 3)]["inputs"].update(steps=2)
        graph.update(nodes)
    log_before = len(comfy.log_text())
    entry = comfy.run(graph, timeout=1800)
    return {"base": pixels(comfy, entry, "15"), "core": pixels(comfy, entry, "25"),
            "apply": pixels(comfy, entry, "35"), "log": comfy.log_text()[log_before:]}


def test_full_size_sdxl_trains_and_comfys_core_loader_reads_every_key(comfy: ComfyServer, models, dataset) -> None:
    loader = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CHECKPOINT}}}
    outputs = (["1", 0], ["1", 1], ["1", 2])
    graph = {**loader, **training_nodes(*outputs, dataset, "lora_lab_real_sdxl",
                                        options_node(comfy, gradient_checkpointing=True, validation_every=0))}
    entry = comfy.run(graph, timeout=3600)
    name = saved_name(entry, "6")
    tensors = load_file(comfy.loras_dir / name)
    modules = {key.partition(".")[0] for key in tensors}
    assert len(modules) == SDXL_ATTENTION_MODULES and len(tensors) == 3 * len(modules)
    assert all(re.fullmatch(r"lora_unet_(input|middle|output)_blocks?_\d*_?\d+_transformer_blocks_\d+_attn[12]_"
                            r"to_(q|k|v|out_0)", module) for module in modules), sorted(modules)[:5]
    images = check_core_loader(comfy, loader, outputs, name, model_only=False, flux=False)
    assert "lora key not loaded" not in images["log"].lower()
    assert np.array_equal(images["core"], images["apply"])
    assert not np.array_equal(images["core"], images["base"]), "the LoRA must change the image"
    comfy.free_models()


def test_full_width_flux_in_fp8_trains_with_swap_and_comfys_core_loader_reads_every_key(
        comfy: ComfyServer, models, dataset) -> None:
    loader = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_TRANSFORMER, "weight_dtype": "fp8_e4m3fn"}},
        "7": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": CLIP_L, "clip_name2": T5XXL, "type": "flux"}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_VAE}},
    }
    log_before = len(comfy.log_text())
    graph = {**loader, **training_nodes(["1", 0], ["7", 0], ["8", 0], dataset, "lora_lab_real_flux",
                                        options_node(comfy, gradient_checkpointing=True, blocks_to_swap=1,
                                                     validation_every=0))}
    entry = comfy.run(graph, timeout=3600)
    log = comfy.log_text()[log_before:]
    assert "model weight dtype torch.float8_e4m3fn" in log, log[-3000:]
    swapped = re.search(r"blocks_to_swap 1: ComfyUI left ([\d.]+) GiB", log)
    assert swapped and float(swapped.group(1)) > 0.1, log[-3000:]  # the last block (a single one): 0.13 GiB in fp8
    name = saved_name(entry, "6")
    tensors = load_file(comfy.loras_dir / name)
    modules = {key.partition(".")[0] for key in tensors}
    assert len(modules) == FLUX_ATTENTION_MODULES and len(tensors) == 3 * len(modules), sorted(modules)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * 3072, 8)
    images = check_core_loader(comfy, loader, (["1", 0], ["7", 0], ["8", 0]), name, model_only=True, flux=True)
    assert "lora key not loaded" not in images["log"].lower()
    assert not np.array_equal(images["core"], images["base"]), "the LoRA must change the image"
    difference = np.abs(images["core"].astype(float) - images["apply"].astype(float)).mean()
    effect = np.abs(images["core"].astype(float) - images["base"].astype(float)).mean()
    print(f"Flux fp8: core loader against Apply LoRA {difference:.3f}, against the base {effect:.3f} (mean |Δ| of 0-255)")
    assert difference <= 0.1 * effect
    comfy.free_models()
