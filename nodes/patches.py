"""Applying a LoRA through ComfyUI's own patch mechanism, exactly as its LoraLoader does."""
from __future__ import annotations

import importlib.util
from typing import Any

import comfy.lora
import comfy.model_patcher
import comfy.sd

from ..lora_core.files import LoRAWeights
from ..lora_core.network import LoRANetwork
from .comfy_backend import ComfyBackend


def comfy_reads_dora() -> bool:
    """Whether this ComfyUI applies `dora_scale` itself (it does since mid-2024)."""
    return (
        hasattr(comfy.lora, "weight_decompose")
        or hasattr(comfy.model_patcher, "weight_decompose")
        or importlib.util.find_spec("comfy.weight_adapter") is not None
    )


def dora_as_diffs(model: Any, clip: Any, weights: LoRAWeights, strength_model: float, strength_clip: float):
    """For a ComfyUI without DoRA: each layer's `W_DoRA − W` from `lora_core`, added as ComfyUI "diff" patches,
    so that strength s gives W + s·(W_DoRA − W), as newer ComfyUI computes it."""
    backend = ComfyBackend(model, clip)
    network, _ = LoRANetwork.from_tensors(weights.tensors, backend.loadable_modules(), strict=False)
    unet_patches, clip_patches = {}, {}
    for name, adapter in network.items():
        diff = (adapter.merged_weight(1.0) - adapter.base_weight()).to(adapter.base.weight.dtype)
        key, patches = backend.weight_key(name)
        (clip_patches if patches == "clip" else unet_patches)[key] = (diff,)
    new_model, new_clip = model.clone(), clip.clone() if clip is not None else None
    new_model.add_patches({key: ("diff", value) for key, value in unet_patches.items()}, strength_model)
    if new_clip is not None:
        new_clip.add_patches({key: ("diff", value) for key, value in clip_patches.items()}, strength_clip)
    return new_model, new_clip


def apply_lora(model: Any, clip: Any, weights: LoRAWeights, strength_model: float, strength_clip: float):
    """New MODEL and CLIP with the LoRA patched in at the given strengths; the inputs stay untouched."""
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    if any(key.endswith(".dora_scale") for key in weights.tensors) and not comfy_reads_dora():
        return dora_as_diffs(model, clip, weights, strength_model, strength_clip)
    return comfy.sd.load_lora_for_models(model, clip, weights.tensors, strength_model, strength_clip)
