"""LoHa (FedPara, Hyeon-Woo et al. 2022): ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · scale."""
from __future__ import annotations

import torch


def delta_weight(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float, shape: torch.Size
) -> torch.Tensor:
    """ΔW of shape `shape`; the `_b` factors hold the flattened input side (in · k · k)."""
    return ((w1_a @ w1_b) * (w2_a @ w2_b)).reshape(shape) * scale
