"""DoRA weight decomposition (Liu et al. 2024): W' = m · (W + ΔW) / ‖W + ΔW‖, the norm per output channel."""
from __future__ import annotations

import torch


def output_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ of each output channel, shaped [out, 1, ...] to broadcast over the weight (LyCORIS' `dora_scale` layout)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def magnitude_scale(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m / ‖W + ΔW‖ per output channel; the norm is a constant for autograd, as DoRA §4.3 and PEFT do."""
    return magnitude / output_norm(weight + delta).detach()


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """W + strength · (W_DoRA − W): strength 0 is the base, 1 is DoRA, as ComfyUI's loader applies it."""
    dora = (weight + delta) * magnitude_scale(weight, delta, magnitude)
    return weight + strength * (dora - weight)
