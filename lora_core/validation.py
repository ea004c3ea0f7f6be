"""The validation loss: the objective on fixed latents with fixed noise and fixed, stratified timesteps.

The training loss swings 3–30× with the timestep drawn, so its minimum says little about the weights; evaluated on
the same inputs every time, the validation loss moves only when the weights do. Early stopping and keep-best judge
it. A dataset with enough images gives held-out images (a generalisation measure); a small one lends a fixed subset
of its training images (a measure of fit), and the report says which.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dataset import ImageFolderDataset
from .encoded import EncodedDataset
from .objectives import DiscreteObjective, stratified_timesteps

HELD_OUT_FACTOR = 5  # hold images out only when the dataset has at least this many times as many


def validation_images(dataset: ImageFolderDataset, count: int, seed: int) -> tuple[list[int], bool]:
    """`count` distinct images chosen by `seed`, and whether they are held out of training."""
    order = torch.randperm(dataset.num_images, generator=torch.Generator().manual_seed(seed + 2)).tolist()
    return sorted(order[:count]), dataset.num_images >= HELD_OUT_FACTOR * count


@dataclass
class ValidationSet:
    """Each image at `timesteps_per_image` stratified timesteps, with noise fixed by the run's seed."""

    images: list[int]
    captions: list[str]
    held_out: bool
    noise: torch.Tensor
    timesteps: torch.Tensor
    batch_size: int

    @classmethod
    def build(cls, dataset: ImageFolderDataset, images: list[int], held_out: bool, objective: DiscreteObjective,
              encoded: EncodedDataset, seed: int, timesteps_per_image: int, batch_size: int) -> ValidationSet:
        shape = encoded.latents[(images[0], False)].shape
        strata = stratified_timesteps(timesteps_per_image, objective.num_timesteps)
        timesteps = strata.repeat(len(images))  # image-major: image 0 at every stratum, then image 1, …
        noise = torch.randn((len(timesteps), *shape), generator=torch.Generator().manual_seed(seed + 3))
        captions = [dataset.examples[image].caption for image in images]
        return cls(images, captions, held_out, noise, timesteps, batch_size)

    def __len__(self) -> int:
        return len(self.timesteps)

    @torch.no_grad()
    def loss(self, objective: DiscreteObjective, encoded: EncodedDataset, predict) -> float:
        """The mean weighted loss over every (image, timestep), in batches of `batch_size`."""
        per_image = len(self.timesteps) // len(self.images)
        keys = [(image, False) for image in self.images for _ in range(per_image)]
        captions = [caption for caption in self.captions for _ in range(per_image)]
        total = 0.0
        for start in range(0, len(keys), self.batch_size):
            part = slice(start, start + self.batch_size)
            conditioning = encoded.text(captions[part])
            losses = objective.loss(lambda noisy, t: predict(noisy, t, conditioning), encoded.stacked(keys[part]),
                                    self.noise[part], self.timesteps[part])
            total += losses.sum().item()
        return total / len(keys)
