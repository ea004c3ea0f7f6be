"""Check LoRA in the engine (lora_core.formats.check, `python -m lora_core check`): the family a file is for, the
modules lora_core's loader applies or ignores by block, and ‖ΔW‖/‖W‖ against the factors' product by hand."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.random_loras import random_lora

from lora_core.families.sd1 import DiffusersBackend
from lora_core.formats.check import block_of, check_modules, file_families, file_layout
from lora_core.formats.files import LoRAWeights, save_file

ROOT = Path(__file__).resolve().parents[3]
DEMO_BASE = ROOT / "lora_core" / "demo" / "base"


def lora_module(name: str, out_features: int, in_features: int, rank: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {f"{name}.lora_down.weight": torch.randn(rank, in_features, generator=generator),
            f"{name}.lora_up.weight": torch.randn(out_features, rank, generator=generator),
            f"{name}.alpha": torch.tensor(2.0)}


# Real files' module names and factor shapes, one module each (SDXL: kohya's, with its 2048-wide context and
# second text encoder; the others in the layouts their trainers write)
FAMILY_FILES = {
    "SDXL": {**lora_module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048),
             **lora_module("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)},
    "SD1.x": lora_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 768),
    "SD2.x": lora_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 1024),
    "Wan": {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 4)},
    "HiDream-I1": lora_module("lora_unet_double_stream_blocks_0_block_attn1_to_q", 64, 64),
    "Chroma": {**lora_module("lora_unet_double_blocks_0_img_attn_qkv", 192, 64),
               **lora_module("lora_unet_distilled_guidance_layer_in_proj", 64, 64)},
}


@pytest.mark.parametrize("family", sorted(FAMILY_FILES))
def test_a_file_without_metadata_is_told_by_its_module_names(family: str) -> None:
    families, told_by = file_families(FAMILY_FILES[family], {})
    assert [each.name for each in families] == [family] and told_by == "its module names"


def test_metadata_tells_first_and_names_that_several_families_share_say_so() -> None:
    sdxl_named = FAMILY_FILES["SDXL"]
    assert [f.name for f in file_families(sdxl_named, {"ss_base_model_version": "flux1"})[0]] == ["Flux.1"]
    assert [f.name for f in file_families(sdxl_named, {"modelspec.architecture": "stable-diffusion-v1/lora"})[0]] \
        == ["SD1.x"]
    bfl_blocks = {**lora_module("lora_unet_double_blocks_0_img_attn_qkv", 192, 64),
                  **lora_module("lora_unet_single_blocks_0_linear1", 64, 64)}
    assert {f.name for f in file_families(bfl_blocks, {})[0]} == {"Flux.1", "Chroma", "HunyuanVideo"}
    assert file_families(lora_module("lora_unet_not_a_model_layer", 8, 8), {})[0] == ()


def test_layout_names_the_naming_and_algorithms() -> None:
    assert file_layout(FAMILY_FILES["SDXL"]) == "kohya names; LoRA"
    dora = {**FAMILY_FILES["Wan"], "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(64, 1)}
    assert file_layout(dora) == "ComfyUI/diffusion-pipe names; DoRA"
    assert block_of("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k") == "input_blocks_4"
    assert block_of("diffusion_model.double_blocks.12.img_attn.qkv") == "double_blocks_12"
    assert block_of("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") == "text encoder 2"
    assert block_of("lora_unet_final_layer_linear") == "final_layer"


def test_check_reports_a_fake_module_a_misshapen_one_and_each_blocks_change_by_hand(pipeline) -> None:
    backend = DiffusersBackend(pipeline)
    weights = random_lora(backend, seed=3)
    layers = backend.loadable_modules()
    name = next(name for name in layers if name.startswith("lora_unet_down_blocks_0"))
    width = layers[name].weight.shape[1]
    tensors = {**weights.tensors, **lora_module("lora_unet_not_a_layer", 8, 8),
               **{key.replace(name, "lora_unet_up_blocks_1_attentions_0_proj_in"): value  # replaced: one input too many
                  for key, value in lora_module(name, layers[name].weight.shape[0], width + 1).items()}}
    checks = {check.name: check for check in check_modules(tensors, layers)}
    assert checks["lora_unet_not_a_layer"].problem == "no layer of this model has this name"
    assert "shape" in checks["lora_unet_up_blocks_1_attentions_0_proj_in"].problem
    applied = [check for check in checks.values() if not check.problem]
    assert len(applied) == len(checks) - 2 == len({key.partition(".")[0] for key in weights.tensors}) - 1
    down, up = weights.tensors[f"{name}.lora_down.weight"], weights.tensors[f"{name}.lora_up.weight"]
    by_hand = (up.flatten(1) @ down.flatten(1)) * float(weights.tensors[f"{name}.alpha"]) / down.shape[0]
    weight = layers[name].weight.detach().flatten(1)
    assert checks[name].delta_square == pytest.approx(float(by_hand.square().sum()), rel=1e-5)
    assert checks[name].weight_square == pytest.approx(float(weight.square().sum()), rel=1e-6)


def run_check(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "lora_core", "check", *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cli_checks_a_file_against_a_base_and_names_what_it_ignores(tmp_path) -> None:
    from lora_core.cli import load_pipeline

    backend = DiffusersBackend(load_pipeline(DEMO_BASE, "cpu"))
    weights = random_lora(backend, seed=4)
    path = save_file(tmp_path / "fake.safetensors", {**weights.tensors, **lora_module("lora_unet_not_a_layer", 8, 8)},
                     {"ss_base_model_version": "sd_v1"})
    report = run_check("--lora", str(path), "--base", str(DEMO_BASE))
    modules = len({key.partition(".")[0] for key in weights.tensors})
    assert report["families"] == ["SD1.x"] and report["told_by"] == "its ss_base_model_version 'sd_v1'"
    assert (report["applied"], report["modules"]) == (modules, modules + 1)
    assert report["ignored"] == {"lora_unet_not_a_layer": "no layer of this model has this name"}
    assert report["verdict"].startswith(f"partly: {modules} of {modules + 1} modules apply")
    assert all(block["relative_change"] > 0 for block in report["blocks"] if block["applied"])
    total = report["relative_change"]
    assert math.isfinite(total) and total > 0
    untrained = LoRAWeights({key: torch.zeros_like(value) if "lora_up" in key else value
                             for key, value in weights.tensors.items()}, {"ss_base_model_version": "sd_v1"})
    report = run_check("--lora", str(untrained.save(tmp_path / "untrained.safetensors")), "--base", str(DEMO_BASE))
    assert report["verdict"].startswith(f"looks like nothing: {modules} of {modules} modules apply")
    sdxl = save_file(tmp_path / "sdxl.safetensors", FAMILY_FILES["SDXL"], {})
    report = run_check("--lora", str(sdxl), "--base", str(DEMO_BASE))
    assert report["verdict"].startswith("wrong model: this file is for SDXL (by its module names); the model is SD1.x")
    assert report["applied"] == 0
