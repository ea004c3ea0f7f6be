"""The training objective as pure functions of fixed tensors: noising, the ε/v target of a discrete schedule and its
min-SNR weighting (diffusers' `training_utils`, kohya's `custom_train_functions`).

`DiscreteObjective` answers one question: given clean latents, noise and timesteps, how far is the denoiser's
prediction from its target, per sample. Training draws the noise and timesteps at random; the validation loss asks
the same question with fixed noise and fixed, stratified timesteps.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")
SNR_FLOOR = 1e-8  # ᾱ_T = 0 (zero terminal SNR) gives SNR 0; min(SNR, γ)/SNR tends to 1 there, not 0/0

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents, timesteps) → ε or v


def noised_and_target(
    latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = √ᾱ·x0 + √(1−ᾱ)·ε and the target: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0 (DDPM's `add_noise`, `get_velocity`)."""
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    if prediction_type == "epsilon":
        return noisy, noise
    return noisy, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v.

    SNR is floored at `SNR_FLOOR`, so a zero-terminal-SNR schedule (ᾱ_T = 0) weighs its last timestep 1 for ε
    instead of NaN."""
    snr = (alpha_bar / (1 - alpha_bar)).clamp(min=SNR_FLOOR)
    return snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


def stratified_timesteps(count: int, num_timesteps: int) -> torch.Tensor:
    """`count` timesteps at the centres of equal strata of [0, num_timesteps): every noise level is represented."""
    return ((torch.arange(count) + 0.5) * num_timesteps / count).long()


@dataclass(frozen=True)
class DiscreteObjective:
    """ε- or v-prediction on a discrete schedule ᾱ_t, with optional min-SNR-γ weighting and offset noise."""

    alphas_cumprod: torch.Tensor  # fp32, one entry per timestep, on the device the latents are on
    prediction_type: str
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction type {self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, part: slice = slice(None)
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the offset) and timesteps for a global batch of `shape`, drawn on the CPU; only `part` kept.

        Data-parallel ranks each draw the whole global batch, as one process would, and keep their share."""
        noise = torch.randn(shape, generator=generator)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, self.num_timesteps, (shape[0],), generator=generator)
        return noise[part], timesteps[part]

    def loss(self, predict: Predict, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
             ) -> torch.Tensor:
        """The weighted MSE between `predict`'s output and the target, one value per sample (fp32)."""
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        alpha_bar = self.alphas_cumprod[timesteps]
        noisy, target = noised_and_target(latents, noise, alpha_bar.reshape(-1, 1, 1, 1), self.prediction_type)
        loss = F.mse_loss(predict(noisy, timesteps).float(), target, reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            loss = loss * min_snr_weight(alpha_bar, self.min_snr_gamma, self.prediction_type)
        return loss
