"""The training loop: a reader follows one optimizer step from batch to noise, prediction, loss and update."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backend import PREDICTION_TYPES, TrainingBackend
from .dataset import Batch, ImageFolderDataset
from .network import LoRANetwork
from .optim import make_optimizer, make_scheduler


class TrainingError(ValueError):
    """A training setting out of its allowed range; the message names it and the range."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf. The network keeps the weights of the last good step."""

    def __init__(self, message: str, result: TrainingResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class TrainingConfig:
    """Defaults follow common advice for SD1.x concept LoRAs: lr 1e-4, 1000 steps, batch 1 × accumulation 4."""

    steps: int = 1000
    learning_rate: float = 1e-4
    batch_size: int = 1
    gradient_accumulation: int = 4
    optimizer: str = "AdamW"
    optimizer_options: dict = field(default_factory=dict)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    early_stopping_patience: int = 0
    loss_smoothing: float = 0.9

    def validate(self) -> None:
        checks = [
            ("steps", self.steps >= 1, "a whole number ≥ 1"),
            ("learning_rate", 0 < self.learning_rate < 1, "between 0 and 1 (typically 1e-4)"),
            ("batch_size", self.batch_size >= 1, "a whole number ≥ 1"),
            ("gradient_accumulation", self.gradient_accumulation >= 1, "a whole number ≥ 1"),
            ("min_snr_gamma", self.min_snr_gamma >= 0, "0 (off) or more (5 is usual)"),
            ("noise_offset", 0 <= self.noise_offset <= 1, "from 0 (off) to 1 (0.05–0.1 is usual)"),
            ("max_grad_norm", self.max_grad_norm >= 0, "0 (no clipping) or more"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, "0 (off) or a number of steps"),
            ("loss_smoothing", 0 <= self.loss_smoothing < 1, "from 0 to below 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise TrainingError(f"{name} = {getattr(self, name)!r} is out of range: use {allowed}")

    def metadata(self) -> dict[str, object]:
        """kohya's `ss_*` names for these settings (without the prefix)."""
        return {
            "learning_rate": self.learning_rate,
            "unet_lr": self.learning_rate,
            "max_train_steps": self.steps,
            "batch_size_per_device": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation,
            "optimizer": f"torch.optim.{self.optimizer}" if hasattr(torch.optim, self.optimizer) else self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "lr_warmup_steps": self.lr_warmup_steps,
            "min_snr_gamma": self.min_snr_gamma or None,
            "noise_offset": self.noise_offset or None,
            "max_grad_norm": self.max_grad_norm,
            "seed": self.seed,
        }


@dataclass
class StepReport:
    """What the progress callback gets after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    smoothed_loss: float
    learning_rate: float
    elapsed: float


@dataclass
class TrainingResult:
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    steps: int = 0
    best_step: int = 0
    best_loss: float = math.inf
    stop_reason: str = "completed"
    seconds: float = 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "seconds_per_step": self.seconds_per_step}


ProgressCallback = Callable[[StepReport], bool | None]


@contextmanager
def frozen(modules: list[nn.Module]) -> Iterator[None]:
    """Base parameters get no gradients inside the block; their `requires_grad` flags are restored after it.

    (Inference tensors are left alone: autograd cannot use them, and their flag cannot be set back to True.)
    """
    parameters = [p for module in modules for p in module.parameters() if not p.is_inference()]
    flags = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


def noised_and_target(
    latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = √ᾱ·x0 + √(1−ᾱ)·ε and the target: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0 (DDPM's `add_noise`, `get_velocity`)."""
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    if prediction_type == "epsilon":
        return noisy, noise
    return noisy, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


class EncodedDataset:
    """Latents of every (image, flip) and the conditioning of every caption, encoded once before the first step.

    Later epochs never run the VAE, nor the text encoder while it is frozen (kohya's `cache_latents`, in memory).
    """

    def __init__(self, backend: TrainingBackend, dataset: ImageFolderDataset, seed: int, cache_text: bool) -> None:
        generator = torch.Generator().manual_seed(seed)
        flips = (False, True) if dataset.config.flip else (False,)
        with torch.no_grad():
            self.latents = {
                (image, flip): backend.encode_images(
                    dataset.image_pixels(image, flip)[None].to(backend.device), generator
                )[0].float()
                for image in range(dataset.num_images)
                for flip in flips
            }
            captions = sorted({example.caption for example in dataset.examples}) if cache_text else []
            self.conditioning = {caption: backend.encode_text([caption]) for caption in captions}

    def batch_latents(self, batch: Batch) -> torch.Tensor:
        return torch.stack([self.latents[key] for key in zip(batch.images, batch.flipped)])

    def batch_conditioning(self, batch: Batch, backend: TrainingBackend) -> Any:
        if self.conditioning:
            return torch.cat([self.conditioning[caption] for caption in batch.captions])
        return backend.encode_text(batch.captions)


def diffusion_loss(
    backend: TrainingBackend,
    latents: torch.Tensor,
    conditioning: Any,
    alphas_cumprod: torch.Tensor,
    config: TrainingConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """MSE between the denoiser's prediction and the ε (or v) target of the model's own schedule."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator).to(latents.device)
    timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator).to(latents.device)
    alpha_bar = alphas_cumprod[timesteps]
    noisy_latents, target = noised_and_target(latents, noise, alpha_bar.reshape(-1, 1, 1, 1), backend.prediction_type)

    prediction = backend.predict(noisy_latents, timesteps, conditioning)
    loss = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if config.min_snr_gamma:
        loss = loss * min_snr_weight(alpha_bar, config.min_snr_gamma, backend.prediction_type)
    return loss.mean()


def train(
    backend: TrainingBackend,
    network: LoRANetwork,
    dataset: ImageFolderDataset,
    config: TrainingConfig,
    callback: ProgressCallback | None = None,
) -> TrainingResult:
    """Train `network` on `dataset` through `backend`; the callback may return False to stop after any step.

    The base models are frozen and the network attached only for the run: afterwards both are as they were,
    with the network's new weights (the best ones if early stopping is on).
    """
    config.validate()
    if backend.prediction_type not in PREDICTION_TYPES:
        raise TrainingError(f"prediction type {backend.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    generator = torch.Generator().manual_seed(config.seed)
    parameters = [parameter for parameter in network.parameters() if parameter.requires_grad]
    if any(parameter.is_inference() for parameter in parameters):
        raise TrainingError("the network was created under torch.inference_mode(); create it outside (for example "
                            "inside `with torch.inference_mode(False):`) so that its parameters can be trained")
    optimizer = make_optimizer(config.optimizer, parameters, config.learning_rate, **config.optimizer_options)
    scheduler = make_scheduler(config.lr_scheduler, optimizer, config.steps, config.lr_warmup_steps)
    alphas_cumprod = backend.alphas_cumprod().to(backend.device, torch.float32)
    result = TrainingResult()
    best_weights: dict[str, torch.Tensor] | None = None
    smoothed, steps_without_improvement = 0.0, 0
    started = time.perf_counter()

    with torch.inference_mode(False), frozen(backend.frozen_modules()):
        encoded = EncodedDataset(backend, dataset, config.seed, cache_text=not network.has_text_encoder)
    batches = dataset.batches(config.batch_size, generator)

    with torch.inference_mode(False), torch.enable_grad(), frozen(backend.frozen_modules()), network.applied(1.0):
        network.train()
        for step in range(1, config.steps + 1):
            learning_rate = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(config.gradient_accumulation):
                batch = next(batches)
                loss = diffusion_loss(
                    backend, encoded.batch_latents(batch), encoded.batch_conditioning(batch, backend),
                    alphas_cumprod, config, generator,
                )
                if not torch.isfinite(loss):
                    raise diverged(result, step, "loss", started)
                (loss / config.gradient_accumulation).backward()
                step_loss += loss.item() / config.gradient_accumulation
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm or math.inf)
            if not torch.isfinite(grad_norm):
                raise diverged(result, step, "gradient", started)
            optimizer.step()
            scheduler.step()

            result.steps = step
            result.losses.append(step_loss)
            result.learning_rates.append(learning_rate)
            smoothed = config.loss_smoothing * smoothed + (1 - config.loss_smoothing) * step_loss
            debiased = smoothed / (1 - config.loss_smoothing**step)
            if debiased < result.best_loss:
                result.best_loss, result.best_step, steps_without_improvement = debiased, step, 0
                if config.early_stopping_patience:
                    best_weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
            elif step > config.lr_warmup_steps:
                steps_without_improvement += 1
            report = StepReport(step, config.steps, step_loss, debiased, learning_rate, time.perf_counter() - started)
            if callback is not None and callback(report) is False:
                result.stop_reason = "cancelled"
                break
            if config.early_stopping_patience and steps_without_improvement >= config.early_stopping_patience:
                result.stop_reason = "early_stopping"
                break
        network.eval()
    if best_weights is not None:
        network.load_state_dict(best_weights)
    result.seconds = time.perf_counter() - started
    return result


def diverged(result: TrainingResult, step: int, what: str, started: float) -> TrainingDiverged:
    result.stop_reason = "diverged"
    result.seconds = time.perf_counter() - started
    return TrainingDiverged(
        f"the {what} became NaN or infinite at step {step}; training stopped and the network keeps the weights "
        f"of step {step - 1}. Lower the learning rate (or raise max_grad_norm clipping), or train in fp32/bf16 "
        "instead of fp16",
        result,
    )
