"""Applying a LoRA through ComfyUI's own patch mechanism, as its LoraLoader does; DoRA with the trained math."""
from __future__ import annotations

import copy
import logging
from typing import Any

import comfy.sd
import comfy.utils
import torch
from torch import nn

from ..lora_core.formats import block_weights
from ..lora_core.formats.files import LoRAWeights
from ..lora_core.network import LoRANetwork
from .comfy_backend import ComfyBackend, config_family, model_family


def original_weight(patcher: Any, key: str) -> torch.Tensor:
    """The weight `key` of the patcher's model without patches. Clones share one torch model and one `backup`:
    while some clone's patches are in the weights, ComfyUI keeps the original there."""
    backup = patcher.backup.get(key)
    if backup is None:
        return comfy.utils.get_attr(patcher.model, key)
    return getattr(backup, "weight", backup)  # 0.3.x keeps (weight, inplace_update), 2024 the tensor


def with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A shallow stand-in for `module` whose weight is `weight`; the module itself is left alone."""
    stand_in = copy.copy(module)
    stand_in._parameters = {**module._parameters, "weight": weight}
    return stand_in


def diff_dtype(weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a diff patch for a weight stored in `weight_dtype`: its own where it has 16 bits or more; for an
    fp8 weight the compute dtype (float32 if that is fp8 too). ComfyUI adds a diff to a float32 copy of the weight
    (in true units for scaled fp8), and fp8's smallest step of 2⁻⁹ would round most of a trained change to zero."""
    if weight_dtype.itemsize >= 2:
        return weight_dtype
    return compute_dtype if compute_dtype.itemsize >= 2 else torch.float32


def dora_as_diffs(model: Any, clip: Any, weights: LoRAWeights, strength_model: float, strength_clip: float):
    """Each layer's `W_DoRA − W` from `lora_core`, added as ComfyUI "diff" patches, so that strength s gives
    W + s·(W_DoRA − W), as ComfyUI's loader defines DoRA strength.

    ComfyUI's own DoRA (`weight_decompose`) is not the math DoRA trains with: 0.3.64 divides by the norm of W
    instead of W + ΔW when `dora_scale` is on the output axis, mid-2024 builds broadcast it per input, and the
    March 2024 one ignores it. Each diff costs the memory of its layer's weight, in the compute dtype over an fp8
    weight (see `diff_dtype`). Diffs are in true units: a scaled-fp8 layer's `scale_weight` is applied.
    """
    backend = ComfyBackend(model, clip)
    modules, tensors = backend.loadable_modules(), backend.network_tensors(weights.tensors)
    names = {key.partition(".")[0] for key in tensors}
    for name in sorted(names - modules.keys()):
        logging.warning("LoRA Lab: no layer of this model is called %s; its LoRA weights are not applied", name)
    patchers = {"model": model, "clip": clip.patcher if clip is not None else None}
    keys, stand_ins = {}, {}
    for name in names & modules.keys():
        keys[name] = backend.weight_key(name)
        key, owner = keys[name]
        stand_ins[name] = with_weight(modules[name], original_weight(patchers[owner], key))
    network, _ = LoRANetwork.from_tensors(tensors, stand_ins, strict=False)
    compute_dtype = backend.compute_dtype()
    patches: dict[str, dict[str, tuple]] = {"model": {}, "clip": {}}
    for name, adapter in network.items():
        key, owner = keys[name]
        diff = adapter.merged_weight(1.0) - adapter.base_weight()
        patches[owner][key] = ("diff", (diff.to(diff_dtype(adapter.base.weight.dtype, compute_dtype)),))
    new_model, new_clip = model.clone(), clip.clone() if clip is not None else None
    new_model.add_patches(patches["model"], strength_model)
    if new_clip is not None:
        new_clip.add_patches(patches["clip"], strength_clip)
    return new_model, new_clip


def apply_lora(model: Any, clip: Any, weights: LoRAWeights, strength_model: float, strength_clip: float):
    """New MODEL and CLIP with the LoRA patched in at the given strengths; the inputs stay untouched."""
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    if any(key.endswith(".dora_scale") for key in weights.tensors):
        return dora_as_diffs(model, clip, weights, strength_model, strength_clip)
    return comfy.sd.load_lora_for_models(model, clip, weights.tensors, strength_model, strength_clip)


def block_layout(model: Any) -> tuple[str, tuple[int, ...]]:
    """The MODEL's block-weight family and depth (Flux's double/single block counts, SD3's joint block count)."""
    family = config_family(model)
    if family is None:
        raise block_weights.BlockWeightError(f"block weights know {', '.join(block_weights.LAYOUTS)}; this MODEL is "
                                             f"{model_family(model)}: leave block_weights empty")
    layout, denoiser = family.block_layout, model.model.diffusion_model
    return layout.name, () if layout.unet_layouts else tuple(len(getattr(denoiser, blocks))
                                                             for blocks in family.comfy_blocks)


def apply_lora_by_block(model: Any, clip: Any, weights: LoRAWeights, strength_model: float, strength_clip: float,
                        spec: str):
    """`apply_lora` with each module's strength times its block's weight in `spec` (see lora_core.formats.block_weights):
    the modules of each distinct strength are applied together, so all-ones patches as `apply_lora` does."""
    family, depth = block_layout(model)
    weight_of = block_weights.key_weights(weights.tensors, family, block_weights.parse(spec, family, depth))
    groups: dict[tuple[float, float], dict[str, torch.Tensor]] = {}
    for key, tensor in weights.tensors.items():
        text_encoder = block_weights.module_block(key, family) == block_weights.TEXT_ENCODER
        strengths = (0.0, strength_clip * weight_of[key]) if text_encoder else (strength_model * weight_of[key], 0.0)
        groups.setdefault(strengths, {})[key] = tensor
    for (model_strength, clip_strength), tensors in groups.items():
        model, clip = apply_lora(model, clip, LoRAWeights(tensors, weights.metadata), model_strength, clip_strength)
    return model, clip
