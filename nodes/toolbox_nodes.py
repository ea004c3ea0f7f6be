"""Resize LoRA, Merge LoRAs and Extract LoRA: kohya's LoRA tools as nodes over `lora_core.formats.toolbox`. Merging a LoRA
into a checkpoint needs no node of its own: Apply LoRA → ComfyUI's Save Checkpoint writes the patched weights."""
from __future__ import annotations

import comfy.model_management

from ..lora_core.formats.files import LoRAWeights
from ..lora_core.formats.toolbox import ModuleReport, extract, merge, resize
from ..lora_core.functional.svd import RANK_RULES
from ..lora_core.network_config import EXTRACT_TARGET
from .comfy_backend import ComfyBackend
from .widgets import setting_input

CATEGORY = "LoRA Lab/tools"
DYNAMIC_METHODS = ("none", *RANK_RULES[1:])


def rank_rule(new_rank: int, dynamic_method: str, dynamic_param: float) -> tuple[str, float, int | None]:
    """(rule, parameter, cap): `new_rank` alone, or a dynamic method capped at `new_rank`, as kohya's resize_lora."""
    if dynamic_method == "none":
        if dynamic_param:
            raise ValueError(f"dynamic_param = {dynamic_param} is read by a dynamic_method only; choose one "
                             f"({', '.join(DYNAMIC_METHODS[1:])}) or set dynamic_param to 0")
        return "rank", new_rank, None
    return dynamic_method, dynamic_param, new_rank


def summary(reports: list[ModuleReport]) -> str:
    ranks = sorted({report.rank_after for report in reports})
    retained = [report.retained for report in reports]
    return (f"{len(reports)} modules, rank {ranks[0]}" + (f"–{ranks[-1]}" if len(ranks) > 1 else "") +
            f"; energy kept: mean {sum(retained) / len(retained):.4f}, lowest {min(retained):.4f}")


RANK_INPUTS = {
    "new_rank": ("INT", {"default": 8, "min": 1, "max": 1024, "tooltip": "The rank; with a dynamic method, the largest rank any module may get."}),
    "dynamic_method": (list(DYNAMIC_METHODS), {"default": "none", "tooltip": "none: every module gets new_rank. sv_ratio: keep singular values ≥ the largest / dynamic_param. sv_fro: keep the fraction dynamic_param of each ΔW's Frobenius energy. sv_cumulative: keep the fraction dynamic_param of the sum of singular values (kohya's resize_lora)."}),
    "dynamic_param": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip": "The dynamic method's threshold (sv_ratio ≥ 1; sv_fro and sv_cumulative in (0, 1]); 0 with method none."}),
}


class ResizeLoRA:
    DESCRIPTION = "Changes a LoRA's rank by SVD of each module's ΔW; what is lost is exactly the discarded singular values."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA",)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The resized LoRA, for Save LoRA or Apply LoRA.",)
    FUNCTION = "resize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": ("LORA", {"tooltip": "A LoRA or DoRA from Load LoRA or Train LoRA."}), **RANK_INPUTS}}

    def resize(self, lora, new_rank: int, dynamic_method: str, dynamic_param: float):
        rule, parameter, cap = rank_rule(new_rank, dynamic_method, dynamic_param)
        weights, reports = resize(lora, rule, parameter, cap)
        return {"ui": {"text": [summary(reports)]}, "result": (weights,)}


class MergeLoRAs:
    DESCRIPTION = "Two LoRAs as one: exactly (their ranks side by side) or SVD-merged to a rank."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA",)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The merged LoRA: applying it equals applying both at their weights (exactly, with rank 0).",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_a": ("LORA", {"tooltip": "The first LoRA."}),
            "weight_a": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Its weight in the merge."}),
            "lora_b": ("LORA", {"tooltip": "The second LoRA (merge the result again for more)."}),
            "weight_b": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Its weight in the merge."}),
            "rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "0: concatenate the ranks (exact, rank a + rank b). Otherwise: the best approximation of the weighted sum at this rank (SVD)."}),
        }}

    def merge(self, lora_a, weight_a: float, lora_b, weight_b: float, rank: int):
        return (merge([(lora_a, weight_a), (lora_b, weight_b)], rank or None),)


class ExtractLoRA:
    DESCRIPTION = "A LoRA of the difference between a fine-tuned checkpoint and its base, by SVD (kohya's extract_lora_from_models)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA",)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The extracted LoRA, for Save LoRA or Apply LoRA.",)
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tuned_model": ("MODEL", {"tooltip": "The fine-tuned model, as Load Checkpoint gives it."}),
            "base_model": ("MODEL", {"tooltip": "The model it was fine-tuned from."}),
            "target": setting_input(EXTRACT_TARGET),
            **RANK_INPUTS,
            "clamp_quantile": ("FLOAT", {"default": 0.99, "min": 0.5, "max": 1.0, "step": 0.001, "tooltip": "Clamp the factors' outlying entries to this quantile of their magnitudes (kohya: 0.99); 1 keeps the exact SVD."}),
        }, "optional": {
            "tuned_clip": ("CLIP", {"tooltip": "The fine-tuned text encoder, to extract its layers too."}),
            "base_clip": ("CLIP", {"tooltip": "The base text encoder (needed with tuned_clip)."}),
        }}

    def extract(self, tuned_model, base_model, target: str, new_rank: int, dynamic_method: str, dynamic_param: float,
                clamp_quantile: float, tuned_clip=None, base_clip=None):
        if (tuned_clip is None) != (base_clip is None):
            raise ValueError("connect both tuned_clip and base_clip to extract the text encoder, or neither")
        for name, model in (("tuned_model", tuned_model), ("base_model", base_model)):
            if model.patches:
                raise ValueError(f"{name} carries {len(model.patches)} weight patches (a LoRA applied?): extract from "
                                 "models as Load Checkpoint gives them, or save the patched one with Save Checkpoint "
                                 "and load it")
        rule, parameter, cap = rank_rule(new_rank, dynamic_method, dynamic_param)
        with_clip = tuned_clip is not None
        # Both loaded at once: ComfyUI patches weights in place while a model is loaded, so a MODEL's weights are its
        # own only while it is (another patcher of the same checkpoint, e.g. with a LoRA, may hold them otherwise).
        patchers = [tuned_model, base_model] + ([tuned_clip.patcher, base_clip.patcher] if with_clip else [])
        comfy.model_management.load_models_gpu(patchers)
        backend = ComfyBackend(base_model, base_clip)
        tuned = ComfyBackend(tuned_model, tuned_clip).adapter_targets(target, with_clip)
        weights, reports = extract(backend.adapter_targets(target, with_clip), tuned, rule, parameter, clamp_quantile,
                                   max_rank=cap)
        weights = LoRAWeights(backend.file_tensors(weights.tensors), weights.metadata)  # SD3: diffusers' names
        return {"ui": {"text": [summary(reports)]}, "result": (weights,)}
