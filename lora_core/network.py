"""A set of adapters over a model, addressed by kohya module names: inject, remove, merge, save tensors, load."""
from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import ALGORITHMS, Adapter, AdapterError, algorithm_of
from .adapters.base import checked_rank_and_alpha
from .errors import LoRALabError
from .targets import TEXT_ENCODER_PREFIX


class NetworkError(LoRALabError, ValueError):
    """The network cannot be built or loaded as asked; the message names the modules or keys."""


def grouped_by_module(tensors: dict[str, torch.Tensor], suffixes: Collection[str] = ()
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """Module name → its tensors by suffix (`lora_down.weight`, `alpha`…): a name ends where one of `suffixes`
    starts (diffusers' module names hold dots), else at the first dot, as kohya's names have none."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        suffix = next((suffix for suffix in suffixes if key.endswith(f".{suffix}")), None)
        name, _, suffix = (key[:-len(suffix) - 1], ".", suffix) if suffix else key.partition(".")
        modules[name][suffix] = value
    return dict(modules)


class LoRANetwork(nn.Module):
    """Adapters keyed by kohya name (`lora_unet_…`, `lora_te_…`). Nothing changes in the model until `attach()`.

    `rank` and `alpha` are the network's as asked (kohya's `ss_network_dim`/`ss_network_alpha`); a layer narrower
    than `rank` holds a smaller one (`clamped_ranks`), and `options` are the algorithm's settings (LoKr's `factor`).
    """

    def __init__(
        self,
        adapters: dict[str, Adapter],
        rank: int | None = None,
        alpha: float | None = None,
        clamped_ranks: dict[str, int] | None = None,
        options: dict[str, object] | None = None,
    ) -> None:
        super().__init__()
        if not adapters:
            raise NetworkError("the network has no modules: the target preset matched no layer of this model")
        self.adapters = nn.ModuleDict(adapters)
        self.rank = rank if rank is not None else max(adapter.rank for adapter in adapters.values())
        self.alpha = float(alpha) if alpha is not None else self.alpha_of_rank(self.rank)
        self.clamped_ranks = dict(clamped_ranks or {})
        self.options = dict(options or {})

    def alpha_of_rank(self, rank: int) -> float:
        """The alpha of a loaded network: that of its modules of `rank` (whose scale is alpha / rank)."""
        scaled = [a for a in self.adapters.values() if a.rank == rank and a.scaled_by_rank]
        return float(scaled[0].alpha) if scaled else float(rank)

    @classmethod
    def create(
        cls,
        targets: dict[str, nn.Module],
        algorithm: str = "lora",
        rank: int = 8,
        alpha: float | None = None,
        seed: int = 0,
        **algorithm_options,
    ) -> LoRANetwork:
        """New adapters (ΔW = 0) on `targets` (kohya name → layer), initialised from `seed`.

        A layer that cannot use `rank` (ΔW's rank is at most min(out, in · kernel)) gets that smaller rank, with a
        warning, and keeps the scale alpha / rank the others have; `clamped_ranks` records it.
        """
        if algorithm not in ALGORITHMS:
            raise NetworkError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
        rank, alpha = checked_rank_and_alpha(rank, alpha)
        generator = torch.Generator().manual_seed(seed)
        adapter_cls = ALGORITHMS[algorithm]
        adapters, clamped = {}, {}
        for name, module in targets.items():
            limit = adapter_cls.rank_limit(module)
            layer_rank = rank if limit is None else min(rank, limit)
            if layer_rank < rank:
                clamped[name] = layer_rank
            adapters[name] = adapter_cls(
                module, rank=layer_rank, alpha=alpha * layer_rank / rank, generator=generator, **algorithm_options
            )
        if clamped:
            examples = ", ".join(f"{name} → {value}" for name, value in list(clamped.items())[:3])
            warnings.warn(
                f"rank {rank} is more than {len(clamped)} of {len(adapters)} layers can use (a layer's ΔW has rank "
                f"at most min(out, in · kernel)); they get that rank instead, with the same scale alpha / rank, for "
                f"example {examples}. The file records them in `ss_clamped_ranks`; choose a rank ≤ the narrowest "
                "layer to avoid this",
                stacklevel=2,
            )
        return cls(adapters, rank, alpha, clamped, algorithm_options)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], candidates: dict[str, nn.Module], strict: bool = True
    ) -> tuple[LoRANetwork, list[str]]:
        """Adapters rebuilt from kohya-format `tensors` on `candidates` (kohya name → layer).

        Returns the network and the module names that matched no candidate; with `strict` those are an error.
        """
        grouped = grouped_by_module(tensors)
        unmatched = sorted(name for name in grouped if name not in candidates)
        if unmatched and strict:
            raise NetworkError(
                f"{len(unmatched)} of {len(grouped)} modules in the file match no layer of this model, "
                f"for example {unmatched[:3]}; the LoRA was trained for another architecture "
                "(load it non-strictly to skip them)"
            )
        adapters = {}
        for name, module_tensors in grouped.items():
            if name in candidates:
                try:
                    adapter_cls = algorithm_of(set(module_tensors))
                    adapters[name] = adapter_cls.from_tensors(candidates[name], module_tensors)
                except AdapterError as error:
                    raise NetworkError(f"module {name}: {error}") from error
        return cls(adapters), unmatched

    # -- what it holds ---------------------------------------------------------------------------------------

    def items(self) -> Iterator[tuple[str, Adapter]]:
        return iter(self.adapters.items())

    @property
    def algorithm(self) -> str:
        return next(iter(self.adapters.values())).algorithm

    @property
    def has_text_encoder(self) -> bool:
        return any(name.startswith(TEXT_ENCODER_PREFIX) for name in self.adapters)

    def kohya_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """`<kohya name>.<suffix>` → tensor on the CPU, as LoRA files store them (alpha stays fp32)."""
        return {
            f"{name}.{suffix}": value.detach().to("cpu", torch.float32 if suffix == "alpha" else dtype).contiguous()
            for name, adapter in self.adapters.items()
            for suffix, value in adapter.state_dict().items()
        }

    # -- applying it -----------------------------------------------------------------------------------------

    @property
    def multiplier(self) -> float:
        return next(iter(self.adapters.values())).multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        for adapter in self.adapters.values():
            adapter.multiplier = float(value)

    def attach(self) -> None:
        """Hook every adapter into its layer; the layers themselves are not replaced."""
        for adapter in self.adapters.values():
            adapter.attach()

    def detach(self) -> None:
        """Remove every hook: the model computes exactly what it did before `attach()`."""
        for adapter in self.adapters.values():
            adapter.detach()

    @contextmanager
    def applied(self, multiplier: float = 1.0) -> Iterator[LoRANetwork]:
        """Attached at `multiplier` inside the block, restored to its previous state after it."""
        was_attached = [adapter.attached for adapter in self.adapters.values()]
        previous = self.multiplier
        self.multiplier = multiplier
        self.attach()
        try:
            yield self
        finally:
            self.multiplier = previous
            for attached, adapter in zip(was_attached, self.adapters.values()):
                if not attached:
                    adapter.detach()

    @contextmanager
    def merged(self, strength: float = 1.0) -> Iterator[LoRANetwork]:
        """Merged into the model's weights at `strength` inside the block (no per-layer cost, for batches of
        images), restored exactly after it."""
        self.merge(strength)
        try:
            yield self
        finally:
            self.unmerge()

    def merge(self, strength: float = 1.0) -> None:
        """Write ΔW at `strength` into the model's weights (no cost at inference); `unmerge()` restores them."""
        if any(adapter.attached for adapter in self.adapters.values()):
            raise NetworkError("detach the network before merging it, or it would be applied twice")
        for adapter in self.adapters.values():
            adapter.merge(strength)

    def unmerge(self) -> None:
        for adapter in self.adapters.values():
            adapter.unmerge()
