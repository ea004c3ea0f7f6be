"""DoRA in ComfyUI: what Apply LoRA and Train LoRA's MODEL put into the weights is the trained DoRA weight.

The patched weights are read back as ComfyUI itself writes them (ModelSave on 0.3.64, CheckpointSave on the 2024
server, which lacks ModelSave) and compared with `lora_core`'s merged weight on the checkpoint's own base weights.
On 0.3.64 ComfyUI's core Load LoRA is measured on the same file: its DoRA math is ComfyUI's (the README states the
numbers); the 2024 server has no DoRA at all.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_core import LoRANetwork

from .harness import GENERATED_CHECKPOINT, TEST_CHECKPOINT, ComfyServer
from .test_lora_lab_nodes import dataset, new_loras, saved_name, training_graph  # noqa: F401 (fixtures)

EXACT = 1e-5  # relative to the trained weight
# kohya block names of the test UNet's attention blocks and their LDM paths (one level, one transformer block)
BLOCKS = {"lora_unet_down_blocks_0_attentions_0": "input_blocks.1.1", "lora_unet_mid_block_attentions_0": "middle_block.1"}
PROJECTIONS = {f"transformer_blocks_0_{attn}_{proj}": f"transformer_blocks.0.{attn}.{proj.replace('out_0', 'out.0')}"
               for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")}
LAYERS = {f"{block}_{name}": f"{path}.{ldm}" for block, path in BLOCKS.items() for name, ldm in PROJECTIONS.items()}


def save_model_nodes(comfy_object_info: dict, node_id: str, model: list, prefix: str) -> dict:
    """A node that writes MODEL's weights, patches applied, to output/lora_lab_probe/<prefix>_00001_.safetensors."""
    if "ModelSave" in comfy_object_info:
        return {node_id: {"class_type": "ModelSave", "inputs": {"model": model, "filename_prefix": f"lora_lab_probe/{prefix}"}}}
    return {node_id: {"class_type": "CheckpointSave", "inputs": {
        "model": model, "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": f"lora_lab_probe/{prefix}"}}}


def saved_unet(comfy: ComfyServer, prefix: str) -> dict[str, torch.Tensor]:
    """The UNet layers of LAYERS from a file the nodes above wrote, by LDM path; the file is deleted."""
    [path] = (comfy.output_dir / "lora_lab_probe").glob(f"{prefix}_*.safetensors")
    tensors = load_file(path)
    path.unlink()
    return {ldm: tensors[f"model.diffusion_model.{ldm}.weight"].float() for ldm in LAYERS.values()}


@torch.no_grad()
def trained_weights(lora_file: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """lora_core's W + s·(W_DoRA − W) on the checkpoint's base weights, by LDM path."""
    checkpoint = load_file(GENERATED_CHECKPOINT)
    layers = {}
    for name, ldm in LAYERS.items():
        base = checkpoint[f"model.diffusion_model.{ldm}.weight"].float()
        layers[name] = nn.Linear(base.shape[1], base.shape[0], bias=False)
        layers[name].weight.data = base
    network, _ = LoRANetwork.from_tensors({k: v for k, v in lora_file.items() if k.partition(".")[0] in layers},
                                          layers)
    return {LAYERS[name]: adapter.merged_weight(strength) for name, adapter in network.items()}


def relative_error(applied: dict, expected: dict, reference: dict) -> float:
    """max over layers of ‖applied − expected‖ / ‖reference‖."""
    return max(float((applied[k] - expected[k]).norm() / reference[k].norm()) for k in expected)


def test_dora_is_applied_with_the_trained_math(comfy: ComfyServer, comfy_object_info, dataset, new_loras) -> None:
    graph = training_graph(dataset, steps=3, prefix="lora_lab_dora", algorithm="dora", learning_rate=1e-2)
    graph.update(save_model_nodes(comfy_object_info, "6", ["4", 1], "train_output"))
    name = saved_name(comfy.run(graph, timeout=300))
    lora_file = load_file(comfy.loras_dir / name)
    assert any(key.endswith(".dora_scale") for key in lora_file)

    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": name}},
    }
    for strength, node_id in ((1.0, "10"), (0.5, "20")):
        graph[node_id] = {"class_type": "LoraLab_ApplyLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora": ["2", 0], "strength_model": strength, "strength_clip": strength}}
        graph.update(save_model_nodes(comfy_object_info, str(int(node_id) + 1), [node_id, 0], f"apply_{strength:g}"))
    comfy_has_dora = comfy.version is not None  # the March 2024 server ignores `dora_scale` ("lora key not loaded")
    if comfy_has_dora:
        graph["3"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                             "strength_model": 1.0, "strength_clip": 1.0}}
        graph.update(save_model_nodes(comfy_object_info, "30", ["3", 0], "core_loader"))
    comfy.run(graph, timeout=300)

    trained, half = trained_weights(lora_file, 1.0), trained_weights(lora_file, 0.5)
    base = trained_weights(lora_file, 0.0)
    update = {k: trained[k] - base[k] for k in trained}
    assert min(float(update[k].norm() / base[k].norm()) for k in update) > 1e-3, "training changed every layer"
    errors = {"train_output": relative_error(saved_unet(comfy, "train_output"), trained, trained),
              "apply_1": relative_error(saved_unet(comfy, "apply_1"), trained, trained),
              "apply_0.5": relative_error(saved_unet(comfy, "apply_0.5"), half, half)}
    print(f"LoRA Lab's DoRA, error relative to the trained weight: {errors}")
    assert max(errors.values()) <= EXACT

    if comfy_has_dora:  # 0.3.64's weight_decompose divides by ‖W‖, not ‖W + ΔW‖ (ComfyUI's math, not ours)
        core = saved_unet(comfy, "core_loader")
        print(f"ComfyUI {comfy.version} core Load LoRA on this DoRA file: error {relative_error(core, trained, trained):.4f} "
              f"of the trained weight, {relative_error(core, trained, update):.4f} of the trained update; the update "
              f"is {max(float(update[k].norm() / base[k].norm()) for k in update):.4f} of the weight")
        if comfy.version == (0, 3, 64):
            assert relative_error(core, trained, update) > 100 * EXACT
