"""The dataset as the denoiser sees it: latents of every (image, flip) (and of its reference images, for edit pairs)
and the conditioning of every caption, encoded once before the first step (kohya's `cache_latents`)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_tensors

from ..backend import (
    REFERENCE_LATENTS,
    SIZE_CONDITIONING,
    Conditioning,
    TrainingBackend,
    concatenated,
)
from ..data.dataset import Batch, ImageFolderDataset
from ..formats.files import save_file, tensor_bytes


def latent_grid(mask: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """A [1, H, W] pixel mask averaged over each latent cell: [1, h, w], or [1, 1, h, w] for a video latent's frame."""
    mask = F.interpolate(mask[None], size=latent.shape[-2:], mode="area")[0].to(latent.device)
    return mask.reshape(1, *[1] * (latent.dim() - 3), *mask.shape[-2:])


class EncodedDataset:
    """Later epochs never run the VAE, nor the text encoder while it is frozen. Each image's VAE sample is drawn
    from a generator seeded by the run's seed and the image's pixels, so a latent is the same whatever the order,
    and with `cache_dir` it is read back from disk by later runs instead of encoded again.
    """

    def __init__(
        self, backend: TrainingBackend, dataset: ImageFolderDataset, seed: int, cache_text: bool,
        cache_dir: str | None = None,
    ) -> None:
        self.backend, self.dataset = backend, dataset
        flips = (False, True) if dataset.config.flip else (False,)
        vae = backend.vae_fingerprint() if cache_dir else ""
        with torch.no_grad():
            self.latents = {
                (image, flip): self.encode(dataset.image_pixels(image, flip), seed, vae, cache_dir)
                for image in range(dataset.num_images)
                for flip in flips
            }
            self.reference_latents = {  # edit pairs: each image's references, [R, C, H, W]
                (image, flip): torch.stack([self.encode(pixels, seed, vae, cache_dir, reference=True)
                                            for pixels in dataset.reference_pixels(image, flip)])
                for image in range(dataset.num_images) if dataset.examples[image].references
                for flip in flips
            }
            # loss masks averaged down to each latent's grid, [1, (frames,) h, w] (kohya's masked loss)
            self.masks = {key: latent_grid(mask, self.latents[key]) for key in self.latents
                          if (mask := dataset.image_mask(*key)) is not None}
            # edit pairs whose text encoder sees the references (Qwen-Image-Edit): the text of each (image, flip)
            self.text_per_image = backend.text_sees_references and bool(self.reference_latents)
            if not cache_text:
                self.text_cache = {}
            elif self.text_per_image:
                self.text_cache = {key: backend.encode_text_with_references(
                    [dataset.examples[key[0]].caption], [dataset.reference_pixels(*key)])
                    for key in self.reference_latents}
            else:
                captions = sorted({example.caption for example in dataset.examples})
                self.text_cache = {caption: backend.encode_text([caption]) for caption in captions}

    def encode(self, pixels: torch.Tensor, seed: int, vae: str, cache_dir: str | None, reference: bool = False
               ) -> torch.Tensor:
        """The latent of one image: a VAE sample, or for a reference image the posterior's mean, as the edit
        pipelines encode their input image."""
        kind = "reference" if reference else f"{seed}"
        image_key = hashlib.sha256(f"{kind}:{tuple(pixels.shape)}".encode() + tensor_bytes(pixels)).hexdigest()
        cached = None
        if cache_dir:
            cached = Path(cache_dir) / f"{hashlib.sha256(f'{image_key}:{vae}'.encode()).hexdigest()}.safetensors"
            if cached.is_file():
                return load_tensors(cached)["latent"].to(self.backend.device)
        if reference:
            latent = self.backend.encode_reference_images(pixels[None].to(self.backend.device))[0].float()
        else:
            generator = torch.Generator().manual_seed(int(image_key[:15], 16))
            latent = self.backend.encode_images(pixels[None].to(self.backend.device), generator)[0].float()
        if cached is not None:
            save_file(cached, {"latent": latent}, {"lora_lab": "cached latent"}, overwrite=True)
        return latent

    def largest_latent_values(self) -> int:
        """Values per channel of the largest item the denoiser sees: its latent (frames × height × width) and its
        reference latents', which edit models take in the same sequence."""
        return max(math.prod(latent.shape[1:]) + sum(math.prod(reference.shape[1:]) for reference in
                                                     self.reference_latents.get(key, []))
                   for key, latent in self.latents.items())

    def longest_text(self) -> int:
        """Tokens of the longest cached caption's context (0 where captions are encoded at each step)."""
        return max((conditioning["context"].shape[1] for conditioning in self.text_cache.values()), default=0)

    def batch_latents(self, batch: Batch) -> torch.Tensor:
        return self.stacked(list(zip(batch.images, batch.flipped)))

    def batch_masks(self, batch: Batch) -> torch.Tensor | None:
        return self.stacked_masks(list(zip(batch.images, batch.flipped)))

    def stacked_masks(self, keys: list[tuple[int, bool]]) -> torch.Tensor | None:
        """The loss masks of these (image, flipped) pairs as one batch (ones for an image without one); None where
        the dataset has none."""
        if not self.masks:
            return None
        return torch.stack([self.masks[key] if key in self.masks else
                            torch.ones_like(self.latents[key][:1]) for key in keys])

    def batch_conditioning(self, batch: Batch) -> Conditioning:
        return self.conditioning(list(zip(batch.images, batch.flipped)), batch.captions)

    def conditioning(self, keys: list[tuple[int, bool]], captions: list[str]) -> Conditioning:
        """The text conditioning of `captions` with each (image, flipped)'s size and crop (SDXL's micro-conditioning)
        and, for edit pairs, its reference images' latents."""
        sizes = [self.dataset.examples[image].size_conditioning(flipped) for image, flipped in keys]
        conditioning = {**self.text(captions, keys), SIZE_CONDITIONING: torch.tensor(sizes, device=self.backend.device)}
        if self.reference_latents:  # [B, R, C, H, W]
            conditioning[REFERENCE_LATENTS] = torch.stack([self.reference_latents[key] for key in keys])
        return conditioning

    def stacked(self, keys: list[tuple[int, bool]]) -> torch.Tensor:
        """The latents of these (image, flipped) pairs, as one batch."""
        return torch.stack([self.latents[key] for key in keys])

    def text(self, captions: list[str], keys: list[tuple[int, bool]]) -> Conditioning:
        """The text conditioning of `captions` (of the (image, flipped) `keys`): cached while the text encoder is
        frozen and the captions are not augmented, else encoded (with gradients); with each pair's references where
        the text encoder sees them."""
        if self.text_cache:
            return concatenated([self.text_cache[key if self.text_per_image else caption]
                                 for key, caption in zip(keys, captions)])
        if self.text_per_image:
            return self.backend.encode_text_with_references(
                captions, [self.dataset.reference_pixels(*key) for key in keys])
        return self.backend.encode_text(captions)
