"""Low-rank factors of a weight delta by SVD, and kohya's rules for choosing their rank (`resize_lora.py`)."""
from __future__ import annotations

import torch

RANK_RULES = ("rank", "sv_ratio", "sv_fro", "sv_cumulative")


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """The singular values of ΔW flattened to [out, in·k·k], largest first (fp32)."""
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).float())


def rank_by_rule(values: torch.Tensor, rule: str, parameter: float) -> int:
    """How many of the singular `values` (descending) to keep, at least 1:
    rank: `parameter` of them; sv_ratio: those ≥ the largest / `parameter`; sv_fro: the fewest whose squares hold
    the fraction `parameter` of the Frobenius energy; sv_cumulative: the fewest whose sum holds that fraction."""
    if rule == "rank":
        keep = int(parameter)
    elif rule == "sv_ratio":
        keep = int((values >= values[0] / parameter).sum())
    elif rule in ("sv_fro", "sv_cumulative"):
        weights = values**2 if rule == "sv_fro" else values
        total = weights.sum()
        if total == 0:
            return 1
        keep = int((weights.cumsum(0) / total < parameter - 1e-7).sum()) + 1
    else:
        raise ValueError(f"unknown rank rule {rule!r}; use one of {RANK_RULES}")
    return max(1, min(keep, len(values)))


def low_rank_factors(delta: torch.Tensor, rank: int, clamp_quantile: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`down` [r, in(, k, k)] and `up` [out, r(, 1, 1)] with up·down the best rank-`rank` approximation of ΔW
    (Eckart–Young), the singular values split evenly between them; and all singular values.

    With `clamp_quantile` < 1, the factors' entries are clamped to that quantile of their magnitudes, as kohya's
    `extract_lora_from_models.py` does against outliers (the approximation is then no longer optimal)."""
    out_features, *rest = delta.shape
    u, s, vh = torch.linalg.svd(delta.reshape(out_features, -1).float(), full_matrices=False)
    rank = min(rank, len(s))
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    if clamp_quantile < 1:
        limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), clamp_quantile)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    down = down.reshape(rank, *rest)
    up = up.reshape(out_features, rank, *[1] * len(rest[1:]))
    return down.contiguous(), up.contiguous(), s
