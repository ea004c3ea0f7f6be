"""Checks the flow-matching families share: the objective against the pipeline's own scheduler."""
from __future__ import annotations

import torch


def check_objective_against_the_scheduler(objective, scheduler, mu: float | None, multiplier: float = 1.0) -> None:
    """x_σ from `scheduler.scale_noise` at its shifted timesteps (set with μ = `mu`, or its fixed shift where `mu` is
    None), the objective's time timestep / 1000 × `multiplier` (σ, as the Flux, Chroma and Qwen-Image pipelines
    pass it; σ·1000, as SD3's and HiDream's do), the
    target ε − x0, and σ drawn logit-normal with the scheduler's exponential shift at `mu` (or its fixed shift)."""
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    scheduler.set_timesteps(4, **({} if mu is None else {"mu": mu}))
    timesteps = scheduler.timesteps[[1, 2]]
    seen = {}

    def predict(noisy, times):
        seen.update(noisy=noisy, times=times)
        return torch.zeros_like(noisy)

    loss = objective.loss(predict, latents, noise, scheduler.sigmas[[1, 2]])
    expected = torch.cat([scheduler.scale_noise(latents[i:i + 1], timesteps[i:i + 1], noise[i:i + 1])
                          for i in range(2)])
    torch.testing.assert_close(seen["noisy"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["times"], timesteps / 1000 * multiplier, rtol=0, atol=1e-6 * multiplier)
    torch.testing.assert_close(loss, ((noise - latents) ** 2).mean(dim=(1, 2, 3)))
    _, sigmas = objective.draw((3, 16, 8, 8), torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    torch.randn((3, 16, 8, 8), generator=replay)
    raw = torch.sigmoid(torch.normal(0.0, 1.0, (3,), generator=replay))
    shift = scheduler.config.shift
    expected = shift * raw / (1 + (shift - 1) * raw) if mu is None else scheduler.time_shift(mu, 1.0, raw)
    torch.testing.assert_close(sigmas, expected)
