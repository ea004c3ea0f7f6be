"""The validation loss: the objective on fixed latents with fixed noise and fixed, stratified timesteps.

The training loss swings 3–30× with the timestep drawn, so its minimum says little about the weights; evaluated on
the same inputs every time, the validation loss moves only when the weights do. Early stopping and keep-best judge
it. A dataset with enough images gives held-out images (a generalisation measure); a small one lends a fixed subset
of its training images (a measure of fit), and the report says which.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.dataset import ImageFolderDataset
from .encoded import EncodedDataset
from .objectives import Objective

HELD_OUT_FACTOR = 5  # hold images out only when the dataset has at least this many times as many


def validation_images(dataset: ImageFolderDataset, count: int, seed: int) -> tuple[list[int], bool]:
    """`count` distinct images chosen by `seed`, and whether they are held out of training."""
    images = dataset.num_training_images  # the concept's, never the class images of prior preservation
    order = torch.randperm(images, generator=torch.Generator().manual_seed(seed + 2)).tolist()
    return sorted(order[:count]), images >= HELD_OUT_FACTOR * count


@dataclass
class ValidationSet:
    """Each image at `timesteps_per_image` stratified times (timesteps, or σ for flow matching), with noise fixed by
    the run's seed. Images of one latent shape (bucket) are evaluated together, in batches of `batch_size`."""

    keys: list[tuple[int, bool]]  # (image, flipped) of each evaluation, image-major
    captions: list[str]
    held_out: bool
    noise: list[torch.Tensor]
    timesteps: torch.Tensor
    batch_size: int

    @classmethod
    def build(cls, dataset: ImageFolderDataset, images: list[int], held_out: bool, objective: Objective,
              encoded: EncodedDataset, seed: int, timesteps_per_image: int, batch_size: int) -> ValidationSet:
        strata = objective.stratified(timesteps_per_image)
        keys = [(image, False) for image in images for _ in strata]
        generator = torch.Generator().manual_seed(seed + 3)
        noise = [torch.randn(encoded.latents[key].shape, generator=generator) for key in keys]
        captions = [dataset.examples[image].caption for image, _ in keys]
        return cls(keys, captions, held_out, noise, strata.repeat(len(images)), batch_size)

    @torch.no_grad()
    def loss(self, objective: Objective, encoded: EncodedDataset, predict) -> float:
        """The mean weighted loss over every (image, timestep)."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, noise in enumerate(self.noise):
            by_shape.setdefault(tuple(noise.shape), []).append(index)
        total = 0.0
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                part = indices[start:start + self.batch_size]
                keys = [self.keys[i] for i in part]
                conditioning = encoded.conditioning(keys, [self.captions[i] for i in part])
                losses = objective.loss(lambda noisy, t: predict(noisy, t, conditioning), encoded.stacked(keys),
                                        torch.stack([self.noise[i] for i in part]), self.timesteps[part],
                                        encoded.stacked_masks(keys))
                total += losses.sum().item()
        return total / len(self.keys)
