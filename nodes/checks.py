"""What ComfyUI's core LoRA loader does with a file on a MODEL and CLIP (Check LoRA), and whether a saved file gives
the trained adapters' outputs through it (Save LoRA's verdict). ComfyUI decides: its key map, its `load_lora`, its
`calculate_weight`; the keys it does not load and the weights it cannot merge are read from its own log records."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import comfy.lora
import comfy.sd
import comfy.utils
import torch

from ..lora_core.adapters.base import dense_weight
from ..lora_core.formats.check import (
    LoRACheck,
    ModuleCheck,
    describe_file,
    file_modules,
)
from ..lora_core.formats.files import LoRAWeights
from ..lora_core.network import LoRANetwork
from .comfy_backend import ComfyBackend, config_family, model_family
from .patches import apply_lora, original_weight, with_weight

NOT_LOADED = "lora key not loaded: "  # ComfyUI's log line for a file key its key map has no layer for
CORE_LOADER = "ComfyUI's core loader (as Load LoRA and Apply LoRA apply it)"
OUTPUT_SEED = 0  # the random input each layer's outputs are compared on
# How far a loader's ΔW·x may be from the trained one's, relative to it: the diffs Apply LoRA hands ComfyUI for DoRA
# are rounded to a 16-bit weight's dtype (≤ 0.4 % in bf16); a wrong name, scale, transpose or alpha is ≥ 10 %
LOADER_TOLERANCE = 0.01


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def logged() -> Iterator[list[logging.LogRecord]]:
    """The warnings and errors logged meanwhile (ComfyUI's loader reports what it skips only there)."""
    handler, root = Records(), logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


def converted(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file as ComfyUI's loader reads it: 0.3.x first converts some trainers' layouts (`comfy.lora_convert`)."""
    try:
        import comfy.lora_convert
    except ImportError:  # ComfyUI before 0.3
        return tensors
    return comfy.lora_convert.convert_lora(tensors)


class CoreLoader:
    """ComfyUI's core loader on one file: its patches on clones of MODEL and CLIP, and each file module's weight
    key, offset and patch, for ΔW through ComfyUI's own `calculate_weight`."""

    def __init__(self, model: Any, clip: Any, tensors: dict[str, torch.Tensor]) -> None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        if clip is not None:
            key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        self.tensors = converted(tensors)
        with logged() as records:
            loaded = comfy.lora.load_lora(self.tensors, key_map)
        self.not_loaded = {record.getMessage()[len(NOT_LOADED):] for record in records
                           if record.getMessage().startswith(NOT_LOADED)}
        self.key_map, self.patchers, self.accepted = key_map, {"model": model}, {}
        self.patched = {"model": model.clone()}
        self.accepted["model"] = set(self.patched["model"].add_patches(loaded, 1.0))
        if clip is not None:
            self.patchers["clip"], self.patched["clip"] = clip.patcher, clip.clone().patcher
            self.accepted["clip"] = set(self.patched["clip"].add_patches(loaded, 1.0))
        self.loaded = loaded
        # each model weight key's new patches in the order load_lora made them: one per file module (a fused
        # layer's q, k and v each patch a slice of it)
        self.order: dict[str, list] = {}
        for patch_key in loaded:
            self.order.setdefault(weight_key(patch_key), []).append(patch_key)

    def owner(self, patch_key: Any) -> str | None:
        return next((owner for owner, keys in self.accepted.items() if patch_key in keys
                     or weight_key(patch_key) in keys), None)

    def delta(self, patch_key: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """ΔW of one file module at strength 1 through ComfyUI's `calculate_weight`, the weight (the slice a fused
        layer's piece patches), and what ComfyUI logged while merging it."""
        owner, key = self.owner(patch_key), weight_key(patch_key)
        patched, base = self.patched[owner], self.patchers[owner]
        new = patched.patches[key][len(base.patches.get(key, [])):]
        patch = new[self.order[key].index(patch_key)]
        weight = true_weight(base, key)
        with logged() as records:
            merged = calculate_weight(patched, [patch], weight.clone(), key)
        delta = merged.float() - weight
        if isinstance(patch_key, tuple) and len(patch_key) > 1 and patch_key[1] is not None:
            dimension, start, size = patch_key[1][:3]
            weight, delta = weight.narrow(dimension, start, size), delta.narrow(dimension, start, size)
        return delta, weight, [record.getMessage() for record in records]

    def module_key(self, name: str) -> Any | None:
        """The patch key of file module `name`, where the key map has it."""
        return self.key_map.get(name)


def weight_key(patch_key: Any) -> str:
    return patch_key[0] if isinstance(patch_key, tuple) else patch_key


def model_names(model: Any) -> tuple[str, str]:
    """The MODEL as a reader names it, and its family's name in LoRA Lab ("" where LoRA Lab has none)."""
    family = config_family(model)
    return model_family(model), family.name if family is not None else ""


@torch.no_grad()
def check_lora(model: Any, clip: Any, weights: LoRAWeights) -> LoRACheck:
    """Check LoRA: the file's family and layout, and each of its modules as ComfyUI's core loader applies or ignores
    it on MODEL and CLIP, with ‖ΔW‖² and ‖W‖² at strength 1."""
    layout, families, told_by = describe_file(weights.tensors, weights.metadata)
    loader = CoreLoader(model, clip, weights.tensors)
    grouped = file_modules(loader.tensors)
    kept = {}  # ComfyUI keeps one patch per weight from a file: that of the last module its key map lists
    for name, patch_key in loader.key_map.items():
        if name in grouped:
            kept[patch_key] = name
    modules = []
    for name, tensors in grouped.items():
        patch_key = loader.module_key(name)
        if patch_key is not None and kept.get(patch_key, name) != name:
            modules.append(ModuleCheck(name, f"{kept[patch_key]} patches the same weight ({weight_key(patch_key)}), "
                                             "and ComfyUI keeps one patch per weight from a file: that one"))
        elif patch_key is None:
            modules.append(ModuleCheck(name, "no layer of this model has this name in ComfyUI's key map (ComfyUI "
                                             "logs 'lora key not loaded')"))
        elif patch_key not in loader.loaded:
            modules.append(ModuleCheck(name, f"ComfyUI reads no adapter from its tensors ({', '.join(sorted(tensors))})"))
        elif loader.owner(patch_key) is None:
            modules.append(ModuleCheck(name, f"{weight_key(patch_key)} is not a weight of this model or CLIP"))
        else:
            delta, weight, problems = loader.delta(patch_key)
            if problems:
                modules.append(ModuleCheck(name, "ComfyUI cannot merge it: " + "; ".join(problems)))
            else:
                modules.append(ModuleCheck(name, "", float(delta.square().sum()), float(weight.square().sum())))
    described, family = model_names(model)
    return LoRACheck(layout, families, told_by, described, family, CORE_LOADER, tuple(modules))


def calculate_weight(patcher: Any, patches: list, weight: torch.Tensor, key: str) -> torch.Tensor:
    """ComfyUI's own merge of `patches` into `weight` (0.3.x's `comfy.lora`, 2024's ModelPatcher method)."""
    return getattr(comfy.lora, "calculate_weight", patcher.calculate_weight)(patches, weight, key)


def true_weight(patcher: Any, key: str) -> torch.Tensor:
    """The weight `key` in fp32 (a scaled-fp8 layer's scale applied), without any LoRA's patch."""
    layer = comfy.utils.get_attr(patcher.model, key.rpartition(".")[0])
    return dense_weight(with_weight(layer, original_weight(patcher, key)))


def added_deltas(pairs: list[tuple[Any, Any]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ΔW of every weight the `after` patchers patch beyond their `before`, merged by ComfyUI, and what it logged."""
    deltas, problems = {}, []
    for before, after in pairs:
        for key, entries in after.patches.items():
            new = entries[len(before.patches.get(key, [])):]
            if new:
                weight = true_weight(before, key)
                with logged() as records:
                    deltas[key] = calculate_weight(after, new, weight.clone(), key).float() - weight
                problems += [record.getMessage() for record in records]
    return deltas, problems


@torch.no_grad()
def trained_deltas(model: Any, clip: Any, trained: LoRAWeights) -> dict[str, torch.Tensor]:
    """ΔW at strength 1 of each weight key the trained adapters change, with lora_core's math (the training's)."""
    backend = ComfyBackend(model, clip)
    modules, tensors = backend.loadable_modules(), backend.network_tensors(trained.tensors)
    patchers = {"model": model, "clip": clip.patcher if clip is not None else None}
    stand_ins, keys = {}, {}
    for name in {key.partition(".")[0] for key in tensors} & modules.keys():
        keys[name] = backend.weight_key(name)
        key, owner = keys[name]
        stand_ins[name] = with_weight(modules[name], original_weight(patchers[owner], key))
    network, _ = LoRANetwork.from_tensors(tensors, stand_ins, strict=False)
    return {keys[name][0]: adapter.merged_weight(1.0) - adapter.base_weight() for name, adapter in network.items()}


def compared(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], problems: list[str] = ()
             ) -> tuple[float, list[str]]:
    """The largest ‖ΔW_found·x − ΔW_expected·x‖ / ‖ΔW_expected·x‖ over the layers on one random input x each,
    and what makes the two differ beyond LOADER_TOLERANCE (nothing: they agree)."""
    generator = torch.Generator().manual_seed(OUTPUT_SEED)
    worst, worst_key, reasons = 0.0, "", list(problems[:3])
    for key in sorted(expected.keys() & found.keys()):
        want, got = expected[key].flatten(1), found[key].flatten(1)
        if want.shape != got.shape:
            reasons.append(f"{key}: ComfyUI's ΔW has shape {tuple(got.shape)}, the trained {tuple(want.shape)}")
            continue
        x = torch.randn(want.shape[1], generator=generator)
        size = float((want @ x).norm())
        difference = float((got @ x - want @ x).norm()) / size if size else float((got @ x).norm())
        if difference > worst:
            worst, worst_key = difference, key
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing:
        reasons.append(f"{len(missing)} trained layers are not patched, e.g. {missing[0]}")
    if extra:
        reasons.append(f"{len(extra)} layers are patched that were not trained, e.g. {extra[0]}")
    if worst > LOADER_TOLERANCE:
        reasons.append(f"outputs differ by up to {worst:.1%} of the LoRA's effect, in {worst_key}")
    return worst, reasons


@torch.no_grad()
def saved_file_verdict(model: Any, clip: Any, trained: LoRAWeights, saved: LoRAWeights, precision: str) -> str:
    """Whether the saved file, read back and applied by ComfyUI's core loader, gives each trained layer the output
    the trained adapters give it on one random input; for DoRA, through Apply LoRA too (the core loader's DoRA math
    is not the trained one)."""
    expected = trained_deltas(model, clip, trained.converted(precision))  # the file's rounding on both sides
    rounding = ""
    if precision != "float32":
        lost = compared(trained_deltas(model, clip, trained), expected)[0]
        rounding = f"; saving as {precision} changes them by up to {lost:.1e} of the LoRA's effect (float32: none)"

    def pairs(patched_model: Any, patched_clip: Any) -> list[tuple[Any, Any]]:
        return [(model, patched_model), *([(clip.patcher, patched_clip.patcher)] if clip is not None else [])]

    core = compared(expected, *added_deltas(pairs(*comfy.sd.load_lora_for_models(model, clip, saved.tensors, 1.0,
                                                                                   1.0))))
    layers = f"all {len(expected)} trained layers"
    if not any(key.endswith(".dora_scale") for key in saved.tensors):
        if core[1]:
            return "check FAILED: through ComfyUI's loader the file is not the trained LoRA: " + "; ".join(core[1])
        return (f"checked: read back through ComfyUI's loader, the file gives {layers} the trained LoRA's outputs on "
                f"a random input (largest difference {core[0]:.1e}){rounding}")
    applied = compared(expected, *added_deltas(pairs(*apply_lora(model, clip, saved, 1.0, 1.0))))
    if applied[1]:
        return "check FAILED: through Apply LoRA the file is not the trained DoRA: " + "; ".join(applied[1])
    core_text = ("ComfyUI's core Load LoRA gives them too" if not core[1] else
                 f"ComfyUI's core Load LoRA does not ({core[1][-1]}: its DoRA math is not the trained one), so "
                 "apply this file with Apply LoRA")
    return (f"checked: read back through Apply LoRA, the file gives {layers} the trained DoRA's outputs on a random "
            f"input (largest difference {applied[0]:.1e}); {core_text}{rounding}")
