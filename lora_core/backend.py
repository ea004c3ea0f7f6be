"""The small interface through which the trainer talks to a model (diffusers here, ComfyUI in `nodes/`)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .training.config import TrainingError
from .training.objectives import DiscreteObjective, Objective

if TYPE_CHECKING:
    from .training.config import TrainingConfig

Conditioning = dict[str, torch.Tensor]
"""What the denoiser is conditioned on, each entry batched along dim 0: what `encode_text` returns (the text
encoders' hidden states, pooled outputs…) and, added by the trainer, `SIZE_CONDITIONING` and, for edit pairs,
`REFERENCE_LATENTS`."""
SIZE_CONDITIONING = "size_and_crop"  # [B, 6]: original (h, w), crop (top, left), target (h, w) of each image
REFERENCE_LATENTS = "reference_latents"  # [B, R, C, H, W]: edit pairs' reference images, as latents


def concatenated(parts: list[Conditioning]) -> Conditioning:
    """One batch of conditioning from several, entry by entry; sequences of different lengths (Qwen-Image's prompts)
    zero-padded along dim 1 to the longest, their mask entry (`context_mask`) with them, so padding is masked out."""
    batch = {}
    for name in parts[0]:
        tensors = [part[name] for part in parts]
        longest = max(tensor.shape[1] if tensor.dim() > 1 else 0 for tensor in tensors)
        batch[name] = torch.cat([
            torch.cat([tensor, tensor.new_zeros(tensor.shape[0], longest - tensor.shape[1], *tensor.shape[2:])], 1)
            if tensor.dim() > 1 and tensor.shape[1] < longest else tensor for tensor in tensors])
    return batch


class TrainingBackend(ABC):
    """A diffusion model seen by the trainer: encoders, the denoiser, its objective and its layers."""

    family: str = "SD1.x"  # a reader's name of the model family, used in messages
    prediction_type: str = "epsilon"  # "epsilon", "v_prediction", or "flow" (velocity ε − x0)
    reference_images: int = 0  # how many of an edit pair's reference images the denoiser takes (REFERENCE_LATENTS)
    text_sees_references: bool = False  # the text encoder reads them too (`encode_text_with_references`)
    sample_frames: int = 1  # frames of each sample: a video family's samples are clips as long as the dataset's
    device: torch.device = torch.device("cpu")

    def objective(self, config: TrainingConfig) -> Objective:
        """The model's own training objective with the run's settings. Discrete-schedule families (SD1.x/2.x, SDXL)
        use their ᾱ_t; flow-matching families override this and `alphas_cumprod`."""
        config.check_discrete(self.family)
        return DiscreteObjective(self.alphas_cumprod().to(self.device, torch.float32), self.prediction_type,
                                 config.min_snr_gamma, config.noise_offset)

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t of the model's own discrete schedule, one fp32 entry per training timestep."""
        raise NotImplementedError(f"{self.family} has no discrete noise schedule")

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents as the denoiser sees them (scaled and shifted) for `pixels` [B, 3, H, W] in [-1, 1]."""

    def encode_reference_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of edit pairs' reference images: the VAE posterior's mean, scaled and shifted as `encode_images`."""
        raise NotImplementedError(f"{self.family} takes no reference images")

    @abstractmethod
    def encode_text(self, captions: list[str]) -> Conditioning:
        """The denoiser's text conditioning for `captions`; runs with gradients when a text-encoder LoRA trains."""

    def check_clip_frames(self, frames: int) -> None:
        """Refuse clips of `frames` frames the denoiser cannot take (an image model takes none; see
        `check_frame_step`)."""
        raise TrainingError(f"the dataset has video clips of {frames} frames, and {self.family} is an image model: "
                            "train a video model (Wan, HunyuanVideo) on clips, or set frames to 1 to train on the "
                            "images alone")

    def encode_text_with_references(self, captions: list[str], references: list[list[torch.Tensor]]) -> Conditioning:
        """`encode_text` for edit pairs whose text encoder sees the references (Qwen-Image-Edit's vision tower): each
        caption with its pair's reference images, float [3, H, W] in [-1, 1]."""
        raise NotImplementedError(f"{self.family}'s text encoder sees no reference images")

    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's output (ε, v or velocity, per `prediction_type`) for latents noised to `times` (the
        objective's time input: timestep indices, or σ·multiplier for flow matching)."""

    @abstractmethod
    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        """kohya name → layer for a target preset of the denoiser, plus the text encoder's layers if asked."""

    @abstractmethod
    def loadable_modules(self) -> dict[str, nn.Module]:
        """kohya name → layer for every layer a LoRA file may name."""

    @abstractmethod
    def frozen_modules(self) -> list[nn.Module]:
        """The base models, whose own parameters must get no gradients while the LoRA trains; the denoiser first."""

    def saved_activations(self) -> float | None:
        """The memory plan's values per token and channel autograd keeps of one denoiser block (`Family`'s); None for
        a UNet (`unet_activations`)."""
        return None

    def cpu_offload_problem(self) -> str | None:
        """Why the inputs of the checkpointed blocks cannot be kept in host memory here; None where they can."""
        if self.device.type == "cpu":
            return "the run trains on the CPU, where the activations already are in host memory: leave it off"
        if self.unet_activations() is not None:
            return ("a UNet keeps its skip connections outside its blocks, on the device, so moving the blocks' inputs "
                    "saves little: leave it off and use blocks_to_swap or a lower resolution")
        return None

    def unet_activations(self) -> tuple[float, float] | None:
        """The memory plan's values per latent position a UNet denoiser keeps in a step, without and with gradient
        checkpointing (`Family`'s); None for a transformer."""
        return None

    def parkable_modules(self) -> list[nn.Module]:
        """The models the loop may move off the device while the denoiser trains, once their outputs are cached
        (text encoders, VAE): the frozen models after the denoiser."""
        return self.frozen_modules()[1:]

    def file_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The network's tensors (kohya module names, `.lora_down.weight`…) as this family's LoRA files store them:
        unchanged for SD1.x/2.x and SDXL; renamed or fused where ComfyUI and diffusers read other names."""
        return tensors

    def network_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A LoRA file's tensors as the network on `loadable_modules` names them: `file_tensors` undone."""
        return tensors

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

    def check_block_swap(self, count: int, checkpointing: bool, algorithm: str) -> None:
        """Refuse a swap of `count` blocks that `block_swap` could not do (the count out of range)."""
        from .training.block_swap import check_swap_count

        check_swap_count(self.checkpoint_blocks(), count)

    def block_swap(self, count: int, checkpointing: bool) -> AbstractContextManager:
        """The frozen weights of the denoiser's last `count` blocks kept off the device inside the block (entered
        inside `training()`): lora_core's BlockSwap, each block brought for its forward and backward."""
        from .training.block_swap import swapped_blocks

        return swapped_blocks(self.checkpoint_blocks(), count, self.device)

    def vae_fingerprint(self) -> str:
        """A string that changes with the VAE's weights: part of the key of latents cached on disk."""
        raise NotImplementedError(f"{type(self).__name__} cannot key a latent cache on disk")

    def sample_images(self, prompts: list[str], seed: int, steps: int) -> list:
        """One image per prompt from the model as it is now (LoRA attached), each from noise of `seed`; a video
        family's, with `sample_frames` > 1, a clip (a list of frames)."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate sample images")

    def model_info(self) -> dict[str, str]:
        """What the file's metadata says about the base: `name`, `hash`, `version` (kohya's `sd_v1`…)."""
        return {}


def check_frame_step(family, frames: int) -> None:
    """Refuse clips of `frames` frames unless the video `family` takes them (frame_step·k + 1), naming the nearest."""
    step = family.frame_step
    if (frames - 1) % step:
        below = (frames - 1) // step * step + 1
        examples = ", ".join(str(step * k + 1) for k in (4, 8, 12, 20))
        raise TrainingError(f"{family.name} takes clips of {step}k+1 frames ({examples}…) and the dataset's have "
                            f"{frames}: set frames to {below} or {below + step}")
