"""LoKr (Kronecker product, as in LyCORIS): ΔW = w1 ⊗ w2 · scale, w2 optionally low rank (w2_a · w2_b)."""
from __future__ import annotations

import torch


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into m · n with m ≤ n, m ≤ `factor` (any when -1) and m + n smallest: LyCORIS' rule."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        pair = dimension // candidate
        if candidate + pair > m + n or candidate > limit:
            break
        m, n = candidate, pair
    return (n, m) if m > n else (m, n)


def delta_weight(w1: torch.Tensor, w2: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """ΔW of shape `shape` = kron(w1, w2); w2 [out_k, in_n(, k, k)] already rebuilt if it was low rank."""
    w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
    w1 = w1.reshape(*w1.shape, *[1] * (len(shape) - 2))
    return torch.kron(w1, w2).reshape(shape) * scale
