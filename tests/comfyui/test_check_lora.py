"""Check LoRA and Save LoRA's check in a real ComfyUI server, against what ComfyUI's own loader does and logs."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import test_lora_lab_nodes
from .harness import TEST_CHECKPOINT, ComfyServer
from .test_lora_lab_nodes import sampling_nodes, saved_name, training_graph

CHECK_NODE = "9"
dataset, new_loras = test_lora_lab_nodes.dataset, test_lora_lab_nodes.new_loras  # its fixtures, for this module


def check_graph(lora_name: str, clip: bool = True) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
            CHECK_NODE: {"class_type": "LoraLab_CheckLoRA", "inputs": {
                "model": ["1", 0], "lora_name": lora_name, **({"clip": ["1", 1]} if clip else {})}}}


def checked(comfy: ComfyServer, lora_name: str) -> dict:
    return comfy.run(check_graph(lora_name), timeout=300)["outputs"][CHECK_NODE]["lora_lab_check"][0]


def lora_module(name: str, out_features: int, in_features: int, seed: int, kernel: tuple = ()) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {f"{name}.lora_down.weight": torch.randn(4, in_features, *kernel, generator=generator),
            f"{name}.lora_up.weight": torch.randn(out_features, 4, *kernel, generator=generator),
            f"{name}.alpha": torch.tensor(2.0)}


def modules(tensors: dict) -> set[str]:
    return {key.partition(".")[0] for key in tensors}


@pytest.mark.parametrize("algorithm", ["lora", "dora"])
def test_save_lora_checks_the_saved_file_through_comfys_loader(comfy: ComfyServer, dataset, new_loras,
                                                               algorithm) -> None:
    """Save LoRA with the trained MODEL and CLIP reads the file back through ComfyUI's loader and finds every trained
    layer's output on a random input as training left it; for DoRA through Apply LoRA, and it says that ComfyUI's
    core loader's DoRA math is not the trained one."""
    graph = training_graph(dataset, steps=2, prefix=f"lora_lab_checked_{algorithm}", algorithm=algorithm,
                           train_text_encoder=True)
    graph["5"]["inputs"].update(model=["1", 0], clip=["1", 1], precision="float16")
    entry = comfy.run(graph, timeout=600)
    saved = entry["outputs"]["5"]["lora_lab_saved"][0]
    trained_layers = len(modules(load_file(comfy.loras_dir / saved_name(entry))))
    assert entry["outputs"]["5"]["text"][2] == saved["verdict"]
    if algorithm == "lora":
        assert saved["verdict"].startswith(f"checked: read back through ComfyUI's loader, the file gives all "
                                           f"{trained_layers} trained layers the trained LoRA's outputs"), saved
    else:
        assert saved["verdict"].startswith(f"checked: read back through Apply LoRA, the file gives all "
                                           f"{trained_layers} trained layers the trained DoRA's outputs"), saved
        assert "ComfyUI's core Load LoRA does not" in saved["verdict"]
    assert "saving as float16 changes them by up to" in saved["verdict"]


def test_check_lora_names_what_comfyui_ignores_and_each_blocks_change(comfy: ComfyServer, dataset, new_loras) -> None:
    """A trained file with a module no layer has: Check LoRA ignores exactly the module whose keys ComfyUI's
    LoraLoader logs as not loaded, and applies the rest. A module on a known weight: its block's ‖ΔW‖/‖W‖ equals
    the factors' product by hand over the checkpoint's weight."""
    entry = comfy.run(training_graph(dataset, steps=2, prefix="lora_lab_to_check"), timeout=300)
    trained = load_file(comfy.loras_dir / saved_name(entry))
    with safe_open(str(comfy.comfy_dir / "models" / "checkpoints" / TEST_CHECKPOINT), framework="pt") as checkpoint:
        weight = checkpoint.get_tensor("model.diffusion_model.input_blocks.1.1.proj_in.weight").float()
    known = lora_module("lora_unet_input_blocks_1_1_proj_in", weight.shape[0], weight.shape[1], seed=1,
                        kernel=tuple(weight.shape[2:]))
    fake = lora_module("lora_unet_not_a_layer", 8, 8, seed=2)
    misshapen_key = "input_blocks.1.1.proj_out"  # a real layer the LoRA does not train, factors one input too wide
    with safe_open(str(comfy.comfy_dir / "models" / "checkpoints" / TEST_CHECKPOINT), framework="pt") as checkpoint:
        shape = checkpoint.get_slice(f"model.diffusion_model.{misshapen_key}.weight").get_shape()
    misshapen = lora_module(f"lora_unet_{misshapen_key.replace('.', '_')}", shape[0], shape[1] + 1, seed=3,
                            kernel=tuple(shape[2:]))
    # the trained module of this weight again, under its LDM name: two patches for one weight
    twin = lora_module("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k", *trained[
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"].shape[:1],
        trained["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape[1],
        seed=4)
    save_file({**trained, **known, **fake, **misshapen, **twin},
              str(comfy.loras_dir / "lora_lab_fake_module.safetensors"))
    new_loras()

    log_before = len(comfy.log_text())
    comfy.run({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
               "2": {"class_type": "LoraLoader", "inputs": {
                   "model": ["1", 0], "clip": ["1", 1], "lora_name": "lora_lab_fake_module.safetensors",
                   "strength_model": 1.0, "strength_clip": 1.0}},
               **sampling_nodes(10, ["2", 0], ["2", 1], ["1", 2], seed=1, prefix="lora_lab_check", save="SaveLatent")})
    log = comfy.log_text()[log_before:]
    logged = {key.partition(".")[0] for key in re.findall(r"lora key not loaded:? (\S+)", log)}

    report = checked(comfy, "lora_lab_fake_module.safetensors")
    misshapen_name = next(iter(modules(misshapen)))
    assert logged == {"lora_unet_not_a_layer"}
    [dropped] = set(report["ignored"]) - logged - {misshapen_name}
    assert dropped == next(iter(modules(twin))) and "patches the same weight" in report["ignored"][dropped]
    assert report["ignored"][misshapen_name].startswith("ComfyUI cannot merge it")
    total = len(modules({**trained, **known, **fake, **misshapen, **twin}))
    assert (report["applied"], report["modules"]) == (total - 3, total)
    assert report["verdict"].startswith(f"partly: {total - 3} of {total} modules apply")
    assert report["families"] == ["SD1.x"] and report["model_family"] == "SD1.x"

    down, up = (known[f"lora_unet_input_blocks_1_1_proj_in.{part}.weight"].flatten(1) for part in ("lora_down", "lora_up"))
    by_hand = float(((up @ down) * 2.0 / 4).norm() / weight.norm())
    [block] = [block for block in report["blocks"] if block["name"] == "input_blocks_1"]
    assert (block["applied"], block["modules"]) == (1, 3)  # the known module; the misshapen one and the twin ignored
    assert block["relative_change"] == pytest.approx(by_hand, rel=1e-4)


def test_check_lora_tells_a_file_for_another_family(comfy: ComfyServer, new_loras) -> None:
    """An SDXL LoRA (kohya's names and shapes: the second text encoder, a 2048-wide context) on the SD1.5 checkpoint:
    Check LoRA names SDXL from the file's module names; its UNet and second text encoder modules apply to nothing, each
    with ComfyUI's reason (its first text encoder is the CLIP ViT-L SD1.x has, which ComfyUI may patch)."""
    sdxl = {**lora_module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048, seed=3),
            **lora_module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, seed=4),
            **lora_module("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, seed=5)}
    save_file(sdxl, str(comfy.loras_dir / "lora_lab_sdxl_names.safetensors"))
    new_loras()
    report = checked(comfy, "lora_lab_sdxl_names.safetensors")
    assert report["families"] == ["SDXL"] and report["told_by"] == "its module names"
    assert report["verdict"].startswith("wrong model: this file is for SDXL (by its module names); the model is SD1.x")
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"} <= set(report["ignored"])
    assert report["applied"] + len(report["ignored"]) == report["modules"] == 3
    assert all("no layer of this model has this name" in problem for problem in report["ignored"].values())
