"""LoRA: ΔW = up · down · scale (Hu et al. 2021); conv kernels stay on the down half, as in LoCon."""
from __future__ import annotations

import torch


def delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """ΔW of shape `shape` from `down` [r, in(, k, k)] and `up` [out, r(, 1, 1)]."""
    rank = down.shape[0]
    return (up.reshape(-1, rank) @ down.reshape(rank, -1)).reshape(shape) * scale
