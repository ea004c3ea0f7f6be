"""What users reach for after training, as kohya sd-scripts' `networks/` tools do it: extract a LoRA from a fine-tuned
model, resize a LoRA's rank, merge LoRAs. Each works on kohya-named tensors and keeps the file's metadata."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.base import dense_weight
from ..functional import lora
from ..functional.svd import RANK_RULES, low_rank_factors, rank_by_rule, singular_values
from ..network import grouped_by_module
from .files import LoRAFileError, LoRAWeights

LORA_KEYS = frozenset({"lora_down.weight", "lora_up.weight", "alpha"})
DIFFUSERS_LORA_KEYS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}  # scale 1, no alpha
# The suffixes a module's tensors end in, in the files of LoRA Lab, kohya, LyCORIS and diffusers (whose module names
# hold dots: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`)
MODULE_SUFFIXES = (*LORA_KEYS, *DIFFUSERS_LORA_KEYS, "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                   "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                   "lokr_t2")


@dataclass(frozen=True)
class ModuleReport:
    """What resizing or extracting did to one module: its rank before and after, and the fraction of ΔW's Frobenius
    energy (Σσ² of the kept singular values over all of them) that the new rank keeps."""

    name: str
    rank_before: int
    rank_after: int
    retained: float


def modules_of(weights: LoRAWeights) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors grouped by module: name → {suffix: tensor}, the name ending where a known suffix starts
    (else at the first dot, as kohya's names have none)."""
    return grouped_by_module(weights.tensors, MODULE_SUFFIXES)


def kohya_module(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's tensors with diffusers' lora_A/lora_B read as kohya's lora_down/lora_up (scale 1: no alpha)."""
    return {DIFFUSERS_LORA_KEYS.get(suffix, suffix): value for suffix, value in tensors.items()}


def named_like(source: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """New `factors` (α = rank, scale 1) under the naming of the module they replace: diffusers' lora_A/lora_B
    without alpha where the source had them, kohya's otherwise."""
    if "lora_A.weight" not in source:
        return factors
    names = {kohya: diffusers for diffusers, kohya in DIFFUSERS_LORA_KEYS.items()}
    return {names.get(suffix, suffix): value for suffix, value in factors.items() if suffix != "alpha"}


def lora_delta(name: str, tensors: dict[str, torch.Tensor], allowed: frozenset[str] = LORA_KEYS) -> torch.Tensor:
    """ΔW of a LoRA module (scale α/r included), shaped like the layer's weight; other algorithms are refused."""
    tensors, allowed = kohya_module(tensors), set(kohya_module(dict.fromkeys(allowed)))
    unexpected = set(tensors) - allowed
    if unexpected or "lora_down.weight" not in tensors:
        raise LoRAFileError(f"module {name} holds {sorted(tensors)}; this tool handles LoRA modules "
                            f"({sorted(allowed)}) only, not LoHa/LoKr/Tucker ones")
    down, up = tensors["lora_down.weight"].float(), tensors["lora_up.weight"].float()
    rank = down.shape[0]
    scale = float(tensors["alpha"]) / rank if "alpha" in tensors else 1.0
    shape = (up.shape[0], *down.shape[1:])
    return lora.delta_weight(down, up, scale, torch.Size(shape))


def factor_tensors(delta: torch.Tensor, rank: int, clamp_quantile: float = 1.0
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A LoRA module (α = rank, so scale 1) approximating ΔW at `rank`, and ΔW's singular values."""
    down, up, values = low_rank_factors(delta, rank, clamp_quantile)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(down.shape[0]))}, values


def retained_energy(values: torch.Tensor, rank: int) -> float:
    total = float((values**2).sum())
    return float((values[:rank] ** 2).sum()) / total if total else 1.0


def result_metadata(metadata: dict[str, str], ranks: list[int], comment: str) -> dict[str, str]:
    """A tool's result's metadata: the input's, with the new network's dim/alpha (kohya writes "Dynamic" when ranks
    differ), the algorithm LoRA, and what was done appended to `ss_training_comment`."""
    dim = str(ranks[0]) if len(set(ranks)) == 1 else "Dynamic"
    previous = metadata.get("ss_training_comment", "")
    return {**metadata, "ss_network_dim": dim, "ss_network_alpha": dim, "ss_network_module": "networks.lora",
            "ss_network_args": json.dumps({}),
            "ss_training_comment": f"{previous}; {comment}" if previous else comment}


def checked_rule(rule: str, parameter: float) -> None:
    if rule not in RANK_RULES:
        raise ValueError(f"unknown rank rule {rule!r}; use one of {RANK_RULES}")
    limits = {"rank": (parameter >= 1 and parameter == int(parameter), "a whole number ≥ 1"),
              "sv_ratio": (parameter >= 1, "a ratio ≥ 1 (largest / smallest singular value kept)"),
              "sv_fro": (0 < parameter <= 1, "a fraction in (0, 1] of the Frobenius energy"),
              "sv_cumulative": (0 < parameter <= 1, "a fraction in (0, 1] of the sum of singular values")}
    ok, allowed = limits[rule]
    if not ok:
        raise ValueError(f"{rule} = {parameter} is out of range: use {allowed}")


def resize(weights: LoRAWeights, rule: str = "rank", parameter: float = 8, max_rank: int | None = None
           ) -> tuple[LoRAWeights, list[ModuleReport]]:
    """Every LoRA (or DoRA) module refactored by SVD of its ΔW to the rank `rule` picks (kohya's `resize_lora.py`:
    a fixed rank, or dynamic by `sv_ratio` / `sv_fro` / `sv_cumulative` capped at `max_rank`, its `new_rank`), never
    above its present rank. The discarded singular values are exactly what is lost: ‖ΔW − ΔW_r‖_F² = Σ of their
    squares. DoRA's magnitudes are kept."""
    checked_rule(rule, parameter)
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank = {max_rank} is out of range: use a whole number ≥ 1, or None for no cap")
    tensors, reports = {}, []
    for name, module in modules_of(weights).items():
        delta = lora_delta(name, module, LORA_KEYS | {"dora_scale"})
        rank_before = kohya_module(module)["lora_down.weight"].shape[0]
        values = singular_values(delta)
        rank = min(rank_by_rule(values, rule, parameter), rank_before, max_rank or rank_before)
        factors, _ = factor_tensors(delta, rank)
        if "dora_scale" in module:
            factors["dora_scale"] = module["dora_scale"].float()
        tensors.update({f"{name}.{suffix}": value for suffix, value in named_like(module, factors).items()})
        reports.append(ModuleReport(name, rank_before, rank, retained_energy(values, rank)))
    metadata = result_metadata(weights.metadata, [r.rank_after for r in reports], f"resized: {rule} {parameter:g}")
    if any("dora_scale" in module for module in modules_of(weights).values()):
        metadata["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": True})
    return LoRAWeights(tensors, metadata), reports


def merge(parts: list[tuple[LoRAWeights, float]], rank: int | None = None) -> LoRAWeights:
    """Several LoRAs, each at its weight, as one: exactly by concatenating their ranks (ΔW = Σ wᵢ·ΔWᵢ, kohya's
    `merge_lora.py --concat`), or with `rank` by SVD of that sum (`svd_merge_lora.py`)."""
    if not parts:
        raise ValueError("nothing to merge: give at least one LoRA")
    if rank is not None and rank < 1:
        raise ValueError(f"rank = {rank} is out of range: use a whole number ≥ 1, or None to concatenate exactly")
    deltas: dict[str, list[tuple[dict[str, torch.Tensor], float]]] = defaultdict(list)
    for weights, weight in parts:
        for name, module in modules_of(weights).items():
            deltas[name].append((module, weight))
    tensors, ranks = {}, []
    for name, modules in deltas.items():
        if rank is None:
            factors = concatenated_module(name, modules)
        else:
            factors, _ = factor_tensors(sum(w * lora_delta(name, m) for m, w in modules), rank)
        ranks.append(factors["lora_down.weight"].shape[0])
        tensors.update({f"{name}.{suffix}": value for suffix, value in named_like(modules[0][0], factors).items()})
    described = ", ".join(f"{weights.metadata.get('ss_output_name', '?')} × {weight:g}" for weights, weight in parts)
    how = "concatenated" if rank is None else f"SVD to rank {rank}"
    return LoRAWeights(tensors, result_metadata(parts[0][0].metadata, ranks, f"merged ({how}): {described}"))


def concatenated_module(name: str, modules: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """One LoRA module whose ΔW is exactly Σ wᵢ·ΔWᵢ: the downs stacked, the ups side by side, each up carrying its
    weight and scale αᵢ/rᵢ, and α = the total rank (scale 1)."""
    downs, ups = [], []
    for module, weight in modules:
        lora_delta(name, module)  # refuses what is not LoRA
        module = kohya_module(module)
        down, up = module["lora_down.weight"].float(), module["lora_up.weight"].float()
        scale = float(module["alpha"]) / down.shape[0] if "alpha" in module else 1.0
        downs.append(down)
        ups.append(up * (weight * scale))
    if len({down.shape[1:] for down in downs}) > 1:
        raise LoRAFileError(f"module {name} has different shapes in the LoRAs merged: they are for different models")
    down, up = torch.cat(downs), torch.cat(ups, dim=1)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(down.shape[0]))}


@torch.no_grad()
def extract(base: dict[str, nn.Module], tuned: dict[str, nn.Module], rule: str = "rank", parameter: float = 8,
            clamp_quantile: float = 0.99, min_diff: float = 0.0, max_rank: int | None = None
            ) -> tuple[LoRAWeights, list[ModuleReport]]:
    """A LoRA of the difference between a fine-tuned model and its base, layer by layer (kohya's
    `extract_lora_from_models.py`): ΔW = W_tuned − W_base, factored by SVD at the rank `rule` picks. `base` and
    `tuned` map the same kohya names to the two models' layers. Layers whose largest |ΔW| is at most `min_diff` are
    left out; `clamp_quantile` < 1 clamps outlying factor entries as kohya does (0.99 is its default); `max_rank` caps
    a dynamic rule's rank."""
    checked_rule(rule, parameter)
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise ValueError(f"the two models have different layers (for example {missing[:3]}): extract from a "
                         "fine-tune of this very base")
    tensors, reports = {}, []
    for name, layer in base.items():
        tuned_weight = dense_weight(tuned[name]).float()
        delta = tuned_weight - dense_weight(layer).float().to(tuned_weight.device)
        if delta.shape != dense_weight(layer).shape:
            raise ValueError(f"layer {name} has shape {tuple(dense_weight(tuned[name]).shape)} in the fine-tune and "
                             f"{tuple(dense_weight(layer).shape)} in the base: not a fine-tune of this base")
        if float(delta.abs().max()) <= min_diff:
            continue
        values = singular_values(delta)
        rank = min(rank_by_rule(values, rule, parameter), max_rank or len(values))
        factors, _ = factor_tensors(delta.cpu(), rank, clamp_quantile)
        tensors.update({f"{name}.{suffix}": value for suffix, value in factors.items()})
        reports.append(ModuleReport(name, len(values), rank, retained_energy(values, rank)))
    if not tensors:
        raise ValueError(f"no layer differs by more than min_diff = {min_diff}: the two models are the same here")
    metadata = result_metadata({}, [r.rank_after for r in reports], f"extracted: {rule} {parameter:g}")
    return LoRAWeights(tensors, metadata), reports
