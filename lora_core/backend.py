"""The small interface through which the trainer talks to a model (diffusers here, ComfyUI in `nodes/`)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class TrainingBackend(ABC):
    """A diffusion model seen by the trainer: encoders, the denoiser, its noise schedule and its layers."""

    prediction_type: str = "epsilon"
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t of the model's own schedule, one fp32 entry per training timestep."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents as the denoiser sees them (scaled) for `pixels` [B, 3, H, W] in [-1, 1]."""

    @abstractmethod
    def encode_text(self, captions: list[str]) -> Any:
        """The denoiser's conditioning for `captions`; runs with gradients when a text-encoder LoRA trains."""

    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        """The denoiser's output (ε or v, per `prediction_type`) for latents noised to `timesteps`."""

    @abstractmethod
    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        """kohya name → layer for a target preset of the denoiser, plus the text encoder's layers if asked."""

    @abstractmethod
    def loadable_modules(self) -> dict[str, nn.Module]:
        """kohya name → layer for every layer a LoRA file may name."""

    @abstractmethod
    def frozen_modules(self) -> list[nn.Module]:
        """The base models, whose own parameters must get no gradients while the LoRA trains."""

    def compute_dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in (its weights' dtype, or the dtype it casts them to per layer)."""
        return torch.float32

    @contextmanager
    def training(self, train_text_encoder: bool) -> Iterator[None]:
        """The denoiser (and the text encoder, if it trains) ready for training inside the block, as they were after
        it. The trainer enters it after the dataset is encoded, so encoders and denoiser need not be loaded at once."""
        yield

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The denoiser's blocks to recompute in backward when gradient checkpointing is on."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def vae_fingerprint(self) -> str:
        """A string that changes with the VAE's weights: part of the key of latents cached on disk."""
        raise NotImplementedError(f"{type(self).__name__} cannot key a latent cache on disk")

    def sample_images(self, prompts: list[str], seed: int, steps: int) -> list:
        """One image per prompt from the model as it is now (LoRA attached), each from noise of `seed`."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate sample images")

    def model_info(self) -> dict[str, str]:
        """What the file's metadata says about the base: `name`, `hash`, `version` (kohya's `sd_v1`…)."""
        return {}
