"""Resize LoRA, Merge LoRAs and Extract LoRA in the real server, against ComfyUI's own LoraLoader and checkpoint
saving: a merge samples like both LoRAs loaded by the core loader, a LoRA merged into a checkpoint with Save
Checkpoint comes back out of it with Extract LoRA, and every written file loads with no unmatched key."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .harness import TEST_CHECKPOINT, ComfyServer, output_images, txt2img_graph

RANK = 4


def random_lora(comfy: ComfyServer, name: str, seed: int) -> None:
    """A rank-4 LoRA in kohya's LDM naming on every attention q/k/v/out of the test checkpoint and CLIP's q_proj."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(comfy.comfy_dir / "models" / "checkpoints" / TEST_CHECKPOINT), "pt") as checkpoint:
        for key in checkpoint.keys():
            if key.startswith("model.diffusion_model.") and key.endswith(("to_q.weight", "to_k.weight",
                                                                         "to_v.weight", "to_out.0.weight")):
                module = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            elif key.startswith("cond_stage_model.transformer.") and key.endswith("self_attn.q_proj.weight"):
                module = "lora_te_" + key[len("cond_stage_model.transformer."):-len(".weight")].replace(".", "_")
            else:
                continue
            out_features, in_features = checkpoint.get_slice(key).get_shape()
            tensors[f"{module}.lora_down.weight"] = torch.randn(RANK, in_features, generator=generator) * 0.2
            tensors[f"{module}.lora_up.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.2
            tensors[f"{module}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, str(comfy.loras_dir / name))


def sampled(comfy: ComfyServer, graph: dict, node: str) -> np.ndarray:
    entry = comfy.run(graph, timeout=300)
    [image] = output_images(entry, node)
    return np.asarray(comfy.fetch_image(image), dtype=np.float32)


def sampling_from(model: list, clip: list, prefix: str, seed: int = 3) -> dict:
    """txt2img nodes "2"–"7" reading MODEL and CLIP from the given outputs."""
    graph = txt2img_graph(seed=seed, steps=3, filename_prefix=prefix)
    del graph["1"]
    graph["2"]["inputs"]["clip"] = graph["3"]["inputs"]["clip"] = clip
    graph["5"]["inputs"]["model"] = model
    graph["6"]["inputs"]["vae"] = ["c", 2]
    return graph


@pytest.fixture(scope="module")
def loras(comfy: ComfyServer):
    names = ["lora_lab_tool_a.safetensors", "lora_lab_tool_b.safetensors"]
    for seed, name in enumerate(names):
        random_lora(comfy, name, seed)
    yield names
    for created in [*comfy.loras_dir.glob("lora_lab_tool_*"), *comfy.loras_dir.glob("lora_lab_tools_*")]:
        created.unlink()


def test_a_merge_samples_like_both_loras_through_the_core_loader(comfy: ComfyServer, loras) -> None:
    checkpoint = {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}}}
    merged = {
        **checkpoint,
        "a": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": loras[0]}},
        "b": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": loras[1]}},
        "m": {"class_type": "LoraLab_MergeLoRAs", "inputs": {"lora_a": ["a", 0], "weight_a": 0.7, "lora_b": ["b", 0],
                                                             "weight_b": -0.5, "rank": 0}},
        "p": {"class_type": "LoraLab_ApplyLoRA", "inputs": {"model": ["c", 0], "clip": ["c", 1], "lora": ["m", 0],
                                                            "strength_model": 1.0, "strength_clip": 1.0}},
        "s": {"class_type": "LoraLab_SaveLoRA", "inputs": {"lora": ["m", 0], "filename_prefix": "lora_lab_tools_merged",
                                                           "precision": "float32"}},
        **sampling_from(["p", 0], ["p", 1], "lora_lab_tools_merged"),
    }
    both = {
        **checkpoint,
        "a": {"class_type": "LoraLoader", "inputs": {"model": ["c", 0], "clip": ["c", 1], "lora_name": loras[0],
                                                     "strength_model": 0.7, "strength_clip": 0.7}},
        "b": {"class_type": "LoraLoader", "inputs": {"model": ["a", 0], "clip": ["a", 1], "lora_name": loras[1],
                                                     "strength_model": -0.5, "strength_clip": -0.5}},
        **sampling_from(["b", 0], ["b", 1], "lora_lab_tools_both"),
    }
    base = {**checkpoint, **sampling_from(["c", 0], ["c", 1], "lora_lab_tools_base")}
    log_before = len(comfy.log_text())
    merged_image, both_image, base_image = (sampled(comfy, graph, "7") for graph in (merged, both, base))
    assert np.abs(merged_image - both_image).max() <= 1, "the merge must sample as both LoRAs do"
    assert np.abs(merged_image - base_image).mean() > 2, "the LoRAs must change the image for this to mean anything"
    saved = next(comfy.loras_dir.glob("lora_lab_tools_merged_*.safetensors"))
    check = {**checkpoint, "l": {"class_type": "LoraLoader", "inputs": {
        "model": ["c", 0], "clip": ["c", 1], "lora_name": saved.name, "strength_model": 1.0, "strength_clip": 1.0}},
        **sampling_from(["l", 0], ["l", 1], "lora_lab_tools_core")}
    assert np.abs(sampled(comfy, check, "7") - both_image).max() <= 1
    assert "lora key not loaded" not in comfy.log_text()[log_before:].lower()


def test_a_lora_merged_into_a_checkpoint_comes_back_out_with_extract(comfy: ComfyServer, loras) -> None:
    checkpoint = {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}}}
    merge_into = {**checkpoint,
                  "l": {"class_type": "LoraLoader", "inputs": {"model": ["c", 0], "clip": ["c", 1], "lora_name": loras[0],
                                                               "strength_model": 1.0, "strength_clip": 1.0}},
                  "k": {"class_type": "CheckpointSave", "inputs": {"model": ["l", 0], "clip": ["l", 1], "vae": ["c", 2],
                                                                   "filename_prefix": "lora_lab_tools_tuned"}}}
    comfy.run(merge_into, timeout=300)
    [written] = comfy.output_dir.rglob("lora_lab_tools_tuned*.safetensors")
    tuned_name = "lora_lab_tools_tuned.safetensors"
    tuned_path = comfy.comfy_dir / "models" / "checkpoints" / tuned_name
    written.replace(tuned_path)  # a user moves the saved checkpoint into models/checkpoints
    try:
        tuned = {"t": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tuned_name}}}
        extracted = {
            **checkpoint, **tuned,
            "x": {"class_type": "LoraLab_ExtractLoRA", "inputs": {
                "tuned_model": ["t", 0], "base_model": ["c", 0], "tuned_clip": ["t", 1], "base_clip": ["c", 1],
                "target": "attention", "new_rank": RANK, "dynamic_method": "none", "dynamic_param": 0.0,
                "clamp_quantile": 1.0}},
            "p": {"class_type": "LoraLab_ApplyLoRA", "inputs": {"model": ["c", 0], "clip": ["c", 1], "lora": ["x", 0],
                                                                "strength_model": 1.0, "strength_clip": 1.0}},
            "r": {"class_type": "LoraLab_ResizeLoRA", "inputs": {"lora": ["x", 0], "new_rank": 2,
                                                                 "dynamic_method": "none", "dynamic_param": 0.0}},
            "s": {"class_type": "LoraLab_SaveLoRA", "inputs": {"lora": ["r", 0], "filename_prefix": "lora_lab_tools_small",
                                                               "precision": "float16"}},
            **sampling_from(["p", 0], ["p", 1], "lora_lab_tools_extracted"),
        }
        from_checkpoint = {"c": tuned["t"], **sampling_from(["c", 0], ["c", 1], "lora_lab_tools_tuned")}
        with_lora = {**merge_into, **sampling_from(["l", 0], ["l", 1], "lora_lab_tools_lora")}
        del with_lora["k"]
        log_before = len(comfy.log_text())
        extracted_image = sampled(comfy, extracted, "7")
        checkpoint_image, lora_image = sampled(comfy, from_checkpoint, "7"), sampled(comfy, with_lora, "7")
        assert np.abs(checkpoint_image - lora_image).max() <= 2, "the merged checkpoint samples like base + LoRA"
        assert np.abs(extracted_image - lora_image).max() <= 2, "the extracted LoRA samples like the LoRA merged in"
        small = next(comfy.loras_dir.glob("lora_lab_tools_small_*.safetensors"))
        with safe_open(str(small), "pt") as file:
            assert {file.get_slice(k).get_shape()[0] for k in file.keys() if k.endswith("lora_down.weight")} == {2}
        core = {**checkpoint, "l": {"class_type": "LoraLoader", "inputs": {
            "model": ["c", 0], "clip": ["c", 1], "lora_name": small.name, "strength_model": 1.0, "strength_clip": 1.0}},
            **sampling_from(["l", 0], ["l", 1], "lora_lab_tools_small")}
        sampled(comfy, core, "7")
        assert "lora key not loaded" not in comfy.log_text()[log_before:].lower()
    finally:
        tuned_path.unlink(missing_ok=True)
