"""LoKr: ΔW = w1 ⊗ w2, with w2 low rank (w2_a · w2_b) when the rank is under half its size, as in LyCORIS."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..functional import lokr
from .base import Adapter, AdapterError, fp32_parameter, kaiming_uniform


class LoKrAdapter(Adapter):
    algorithm = "lokr"
    file_keys = frozenset({"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"})

    def __init__(
        self,
        base: nn.Module,
        rank: int = 8,
        alpha: float | None = None,
        generator: torch.Generator | None = None,
        factor: int = -1,
        w1_shape: tuple[int, int] | None = None,
        full_w2: bool | None = None,
    ) -> None:
        """`factor` bounds w1's size (-1: as square as possible); `w1_shape` and `full_w2` rebuild a saved layout."""
        super().__init__(base, rank, alpha)
        out_dim, in_dim, *kernel = self.weight_shape
        if w1_shape is None:
            w1_shape = (lokr.factorization(out_dim, factor)[0], lokr.factorization(in_dim, factor)[0])
        if out_dim % w1_shape[0] or in_dim % w1_shape[1]:
            raise AdapterError(f"w1 of shape {w1_shape} does not divide a weight of shape {tuple(self.weight_shape)}")
        out_k, in_n = out_dim // w1_shape[0], in_dim // w1_shape[1]
        if full_w2 is None:
            full_w2 = rank >= max(out_k, in_n) / 2
        device = base.weight.device
        self.lokr_w1 = fp32_parameter(*w1_shape, device=device)
        kaiming_uniform(self.lokr_w1, generator)
        if full_w2:
            self.scaled_by_rank = False
            self.alpha.fill_(rank)  # a full w2 has no rank to scale by: LyCORIS and ComfyUI use scale 1
            self.lokr_w2 = fp32_parameter(out_k, in_n, *kernel, device=device)
            nn.init.zeros_(self.lokr_w2)
        else:
            self.lokr_w2_a = fp32_parameter(out_k, rank, device=device)
            self.lokr_w2_b = fp32_parameter(rank, in_n * math.prod(kernel), device=device)
            kaiming_uniform(self.lokr_w2_a, generator)
            nn.init.zeros_(self.lokr_w2_b)

    @classmethod
    def rank_limit(cls, base: nn.Module) -> None:
        """None: a rank too large for w2 switches to a full w2 instead (LyCORIS' rule), which is smaller."""
        return None

    def delta_weight(self) -> torch.Tensor:
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return lokr.delta_weight(self.lokr_w1, w2, self.scale, self.weight_shape)

    @classmethod
    def from_tensors(cls, base: nn.Module, tensors: dict[str, torch.Tensor]) -> LoKrAdapter:
        unsupported = {"lokr_w1_a", "lokr_w1_b", "lokr_t2"} & tensors.keys()
        if unsupported:
            raise AdapterError(f"LoKr with {sorted(unsupported)} (decomposed w1 or Tucker w2) is not supported")
        if "lokr_w1" not in tensors:
            raise AdapterError("a LoKr module needs `lokr_w1` and either `lokr_w2` or `lokr_w2_a` + `lokr_w2_b`")
        full_w2 = "lokr_w2" in tensors
        rank = 1 if full_w2 else tensors["lokr_w2_b"].shape[0]
        alpha = tensors.get("alpha")
        adapter = cls(
            base, rank=rank, alpha=None if alpha is None or full_w2 else float(alpha),
            w1_shape=tuple(tensors["lokr_w1"].shape), full_w2=full_w2,
        )
        adapter.load_tensors({key: value for key, value in tensors.items() if key != "alpha" or not full_w2})
        return adapter
