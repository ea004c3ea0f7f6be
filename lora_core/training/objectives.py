"""The training objective as pure functions of fixed tensors: noising, the ε/v target of a discrete schedule and its
min-SNR weighting (diffusers' `training_utils`, kohya's `custom_train_functions`), and the flow-matching objective of
SD3 and Flux (rectified flow: σ sampling, shifts, SD3 loss weighting).

`DiscreteObjective` and `FlowMatchingObjective` answer one question: given clean latents, noise and times, how far is
the denoiser's prediction from its target, per sample. Training draws the noise and times at random (`draw`); the
validation loss asks the same question (`loss`) with fixed noise and fixed, stratified times.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")
SNR_FLOOR = 1e-8  # ᾱ_T = 0 (zero terminal SNR) gives SNR 0; min(SNR, γ)/SNR tends to 1 there, not 0/0

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents, time input) → ε, v or velocity


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

    def stratified(self, count: int) -> torch.Tensor:
        """Fixed times for the validation loss: `count` timesteps at the centres of equal strata."""
        return stratified_timesteps(count, self.num_timesteps)

    def metadata(self) -> dict[str, object]:
        """Nothing beyond the run's settings (min-SNR γ, noise offset), which the metadata records already."""
        return {}

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, part: slice = slice(None)
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the offset) and timesteps for a global batch of `shape`, drawn on the CPU; only `part` kept.

        Data-parallel ranks each draw the whole global batch, as one process would, and keep their share."""
        noise = torch.randn(shape, generator=generator)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, self.num_timesteps, (shape[0],), generator=generator)
        return noise[part], timesteps[part]

    def loss(self, predict: Predict, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted MSE between `predict`'s output and the target, one value per sample (fp32); each latent value's
        error times `mask`'s weight where given (kohya's masked loss: the mean over every value)."""
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        alpha_bar = self.alphas_cumprod[timesteps]
        noisy, target = noised_and_target(latents, noise, alpha_bar.reshape(-1, 1, 1, 1), self.prediction_type)
        error = F.mse_loss(predict(noisy, timesteps).float(), target, reduction="none")
        loss = (error if mask is None else error * mask).mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            loss = loss * min_snr_weight(alpha_bar, self.min_snr_gamma, self.prediction_type)
        return loss


SIGMA_SAMPLINGS = ("uniform", "logit_normal", "mode")
SD3_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))  # where f_mode is monotone on [0, 1]: a density (SD3 paper, §3.1)
SIGMA_SQRT_FLOOR = 1e-3  # the smallest σ of a 1000-step flow schedule; σ⁻² stays finite when σ = 0 is drawn
FLUX_SEQ_LENS = (256, 4096)  # image tokens at which Flux's μ is base_shift and max_shift (2×2 patches of the latent)


def flow_noised_and_target(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """x_σ = (1 − σ)·x0 + σ·ε and the velocity target ε − x0 (diffusers' `FlowMatchEulerDiscreteScheduler.scale_noise`,
    ComfyUI's `CONST.noise_scaling`)."""
    return (1 - sigma) * latents + sigma * noise, noise - latents


def sample_sigmas(sampling: str, count: int, generator: torch.Generator, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """`count` noise levels σ in [0, 1] (SD3 paper §3.1), as diffusers' `compute_density_for_timestep_sampling` draws
    them: uniform; logit-normal, sigmoid(N(mean, std)); or mode, f(u) = 1 − u − scale·(cos²(πu/2) − 1 + u).

    σ is the drawn value itself, as in the paper and kohya's `sigmoid`/`shift` modes; diffusers' scripts index their
    descending schedule with it, so their σ is about 1 − u and their logit mean m reads here as −m."""
    if sampling == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (count,), generator=generator))
    u = torch.rand((count,), generator=generator)
    if sampling == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def shifted_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's fixed shift σ' = shift·σ / (1 + (shift − 1)·σ) (ComfyUI's `time_snr_shift`; SD3.5 uses 3.0)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
            seq_lens: tuple[int, int] = FLUX_SEQ_LENS) -> float:
    """Flux's μ for an image of `image_seq_len` tokens: the line through (`seq_lens`[0], base_shift) and
    (`seq_lens`[1], max_shift), Flux's (256, 4096) by default (diffusers' `calculate_shift`, kohya's
    `get_lin_function`, ComfyUI's ModelSamplingFlux node); Qwen-Image's scheduler puts the second at 8192."""
    low, high = seq_lens
    slope = (max_shift - base_shift) / (high - low)
    return base_shift + slope * (image_seq_len - low)


def flux_shifted_sigmas(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's shift σ' = e^μ / (e^μ + (1/σ − 1)) (ComfyUI's `flux_time_shift`, kohya's `time_shift`)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def sd3_loss_weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """diffusers' `compute_loss_weighting_for_sd3`: 1, σ⁻² (σ floored at `SIGMA_SQRT_FLOOR`), or 2 / (π(1 − 2σ + 2σ²))
    for cosmap."""
    if weighting == "sigma_sqrt":
        return sigma.clamp(min=SIGMA_SQRT_FLOOR) ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


def stratified_sigmas(count: int) -> torch.Tensor:
    """`count` noise levels at the centres of equal strata of (0, 1), unshifted: every noise level is represented."""
    return (torch.arange(count) + 0.5) / count


@dataclass(frozen=True)
class FlowMatchingObjective:
    """Rectified flow (SD3, Flux): x_σ = (1 − σ)·x0 + σ·ε, the denoiser predicts the velocity ε − x0.

    The times `draw` returns and `loss` takes are the noise levels σ in [0, 1]; the denoiser receives
    σ·`timestep_multiplier`: 1000 for diffusers' `SD3Transformer2DModel` and ComfyUI's SD3
    (`ModelSamplingDiscreteFlow`), 1 for diffusers' `FluxTransformer2DModel` and ComfyUI's Flux, which scale σ by 1000
    themselves. σ is drawn by `sampling`, then shifted by the fixed `shift`
    (SD3) or, with `resolution_shift`, by Flux's μ from the latents' size (unpacked (B, C, H, W); H/2·W/2 tokens), or
    mapped by `schedule`, the model's own shifted schedule (ComfyUI's patched `model_sampling`).
    diffusers' one `--weighting_scheme X` is `sampling` X for logit_normal/mode (else uniform) and `weighting` X for
    sigma_sqrt/cosmap (else none). With `precondition_outputs` the loss compares x̂0 = x_σ − σ·v̂ with x0, as
    diffusers' `train_dreambooth_lora_sd3.py` (`--precondition_outputs 1`, its default) and kohya's
    `sd3_train_network.py` train SD3: σ²·‖v̂ − v‖², where the plain loss is ‖v̂ − v‖²."""

    timestep_multiplier: float
    sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    resolution_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    shift_seq_lens: tuple[int, int] = FLUX_SEQ_LENS  # image tokens at which μ is base_shift and max_shift
    weighting: str = "none"
    schedule: Callable[[torch.Tensor], torch.Tensor] | None = None  # the model's own σ of a drawn σ ∈ [0, 1]
    precondition_outputs: bool = False  # the loss on x̂0 = x_σ − σ·v̂ against x0 (diffusers' and kohya's SD3)
    sigma_range: tuple[float, float] = (0.0, 1.0)  # only σ (after the shift) in [low, high] train: one expert's

    def __post_init__(self) -> None:
        if self.schedule is not None and (self.shift != 1 or self.resolution_shift):
            raise ValueError("a schedule (the model's own shifted σ, as ComfyUI's patched model_sampling gives it) "
                             "replaces shift and resolution_shift; leave those at 1 and False")
        if self.sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"sigma sampling {self.sampling!r} is not supported; use one of {SIGMA_SAMPLINGS}")
        if self.weighting not in SD3_WEIGHTINGS:
            raise ValueError(f"loss weighting {self.weighting!r} is not supported; use one of {SD3_WEIGHTINGS}")
        if not self.timestep_multiplier > 0:
            raise ValueError(f"timestep_multiplier must be > 0 (1000 for SD3, 1 for Flux), "
                             f"got {self.timestep_multiplier}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        low, high = MODE_SCALE_RANGE
        if not low <= self.mode_scale <= high:
            raise ValueError(f"mode_scale {self.mode_scale} leaves σ outside [0, 1]; "
                             f"use a value in [{low}, {high:.3f}]")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0 (1 for none, 3 for SD3.5), got {self.shift}")
        if not 0 <= self.sigma_range[0] < self.sigma_range[1] <= 1:
            raise ValueError(f"sigma_range {self.sigma_range} is not an interval of [0, 1]")
        if self.resolution_shift and self.shift != 1:
            raise ValueError(f"shift {self.shift} and resolution_shift both shift σ; set shift 1 for Flux's "
                             "resolution-dependent shift, or resolution_shift False for a fixed shift")

    def metadata(self) -> dict[str, object]:
        """kohya's `ss_*` names (`flux_train_utils.add_flux_train_arguments`) of the objective's settings."""
        sampling = {"logit_normal": {"logit_mean": self.logit_mean, "logit_std": self.logit_std},
                    "mode": {"mode_scale": self.mode_scale}}.get(self.sampling, {})
        if self.schedule is not None:
            shift = {"flow_schedule": "the base model's own (ComfyUI's model_sampling)"}
        elif self.resolution_shift:
            shift = {"base_shift": self.base_shift, "max_shift": self.max_shift}
            if self.shift_seq_lens != FLUX_SEQ_LENS:
                shift["shift_seq_lens"] = list(self.shift_seq_lens)
        else:
            shift = {"discrete_flow_shift": self.shift}
        trained = {} if self.sigma_range == (0.0, 1.0) else {"min_timestep": round(self.sigma_range[0] * 1000),
                                                              "max_timestep": round(self.sigma_range[1] * 1000)}
        return {"timestep_sampling": self.sampling, "weighting_scheme": self.weighting,
                "precondition_outputs": self.precondition_outputs, **sampling, **shift, **trained}

    def stratified(self, count: int) -> torch.Tensor:
        """Fixed times for the validation loss: `count` noise levels at the centres of equal strata of (0, 1) (of
        `sigma_range`), unshifted, so that every level counts alike and the times do not depend on the image size."""
        low, high = self.sigma_range
        return low + (high - low) * stratified_sigmas(count)

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, part: slice = slice(None)
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and shifted noise levels σ for a global batch of `shape`, drawn on the CPU; only `part` kept. With a
        `sigma_range`, σ outside it are drawn again (from the same generator) until all lie in it: the shifted
        distribution restricted to the range, as one expert of a model split at a σ boundary sees it."""
        if self.resolution_shift and len(shape) != 4:
            raise ValueError(f"Flux's resolution shift needs unpacked latents (B, C, H, W), got shape {tuple(shape)}")
        noise = torch.randn(shape, generator=generator)
        sigma = self.shifted(shape, shape[0], generator)
        low, high = self.sigma_range
        for _ in range(1000):
            outside = (sigma < low) | (sigma > high)
            if not outside.any():
                break
            sigma[outside] = self.shifted(shape, int(outside.sum()), generator)
        else:
            raise ValueError(f"σ drawn by {self.sampling} with this shift almost never falls in {self.sigma_range}; "
                             "widen the range or change the sampling")
        return noise[part], sigma[part]

    def shifted(self, shape: tuple[int, ...], count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` noise levels drawn by `sampling` and shifted (for latents of `shape`)."""
        sigma = sample_sigmas(self.sampling, count, generator, self.logit_mean, self.logit_std, self.mode_scale)
        if self.schedule is not None:
            return self.schedule(sigma)
        if self.resolution_shift:
            mu = flux_mu((shape[2] // 2) * (shape[3] // 2), self.base_shift, self.max_shift, self.shift_seq_lens)
            return flux_shifted_sigmas(sigma, mu)
        return shifted_sigmas(sigma, self.shift) if self.shift != 1 else sigma

    def loss(self, predict: Predict, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted MSE between `predict`'s velocity and ε − x0 (preconditioned: between x_σ − σ·velocity and x0),
        one value per sample (fp32); each latent value's error times `mask`'s weight where given."""
        noise, sigmas = noise.to(latents.device), sigmas.to(latents.device, torch.float32)
        per_sample = sigmas.reshape(-1, *[1] * (latents.dim() - 1))
        noisy, target = flow_noised_and_target(latents, noise, per_sample)
        prediction = predict(noisy, sigmas * self.timestep_multiplier).float()
        if self.precondition_outputs:
            prediction, target = prediction * -per_sample + noisy.float(), latents.float()
        error = F.mse_loss(prediction, target, reduction="none")
        if mask is not None:
            error = error * mask
        return error.flatten(1).mean(dim=1) * sd3_loss_weight(sigmas, self.weighting)


Objective = DiscreteObjective | FlowMatchingObjective
