"""LoHa: the Hadamard product of two low-rank pairs, initialised as LyCORIS does (w2_a zero, so ΔW starts at 0)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..functional import loha
from .base import Adapter, AdapterError, fp32_parameter, normal


class LoHaAdapter(Adapter):
    algorithm = "loha"
    file_keys = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"})

    def __init__(
        self, base: nn.Module, rank: int = 8, alpha: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(base, rank, alpha)
        device = base.weight.device
        out_dim, in_dim = self.weight_shape[0], math.prod(self.weight_shape[1:])
        self.hada_w1_a = fp32_parameter(out_dim, rank, device=device)
        self.hada_w1_b = fp32_parameter(rank, in_dim, device=device)
        self.hada_w2_a = fp32_parameter(out_dim, rank, device=device)
        self.hada_w2_b = fp32_parameter(rank, in_dim, device=device)
        normal(self.hada_w1_b, 1.0, generator)
        normal(self.hada_w1_a, 0.1, generator)
        normal(self.hada_w2_b, 1.0, generator)
        nn.init.zeros_(self.hada_w2_a)

    def delta_weight(self) -> torch.Tensor:
        return loha.delta_weight(
            self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale, self.weight_shape
        )

    @classmethod
    def from_tensors(cls, base: nn.Module, tensors: dict[str, torch.Tensor]) -> LoHaAdapter:
        if "hada_t1" in tensors or "hada_t2" in tensors:
            raise AdapterError("LoHa with Tucker weights (`hada_t1`/`hada_t2`) is not supported")
        if "hada_w1_b" not in tensors:
            raise AdapterError("a LoHa module needs `hada_w1_a`, `hada_w1_b`, `hada_w2_a` and `hada_w2_b`")
        alpha = tensors.get("alpha")
        adapter = cls(base, rank=tensors["hada_w1_b"].shape[0], alpha=None if alpha is None else float(alpha))
        adapter.load_tensors(tensors)
        return adapter
