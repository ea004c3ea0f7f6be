"""Masked loss: masks from a masks/ folder or the alpha channel, fitted and mirrored with their image, averaged to
the latent grid; the loss gets no gradient where the mask is zero; bad masks are named and refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, train
from lora_core.data.config import DatasetError
from lora_core.families.sd1 import DiffusersBackend
from lora_core.training.encoded import EncodedDataset
from lora_core.training.objectives import DiscreteObjective, FlowMatchingObjective

SIZE = 64


def half_mask(size: int = SIZE) -> np.ndarray:
    """Black on the left half, white on the right."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2:] = 255
    return mask


def masked_dataset(folder: Path, count: int = 2) -> Path:
    """`count` random images, each with the half mask in masks/."""
    rng = np.random.default_rng(0)
    (folder / "masks").mkdir(parents=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        Image.fromarray(half_mask()).save(folder / "masks" / f"{index}.png")
    return folder


def test_a_masks_folder_gives_each_image_its_mask_mirrored_with_it(tmp_path) -> None:
    dataset = ImageFolderDataset(masked_dataset(tmp_path / "data"), DatasetConfig(resolution=SIZE, loss_mask="masks"))
    assert dataset.num_images == 2, "the masks/ folder is not an image folder"
    mask = dataset.image_mask(0)
    assert mask.shape == (1, SIZE, SIZE) and torch.equal(mask, torch.from_numpy(half_mask() / 255).float()[None])
    assert torch.equal(dataset.image_mask(0, flip=True), mask.flip(-1))
    unmasked = ImageFolderDataset(tmp_path / "data", DatasetConfig(resolution=SIZE))
    assert unmasked.image_mask(0) is None and unmasked.num_images == 2 + 2, "without loss_mask masks/ holds images"


def test_the_alpha_channel_gives_the_same_mask(tmp_path) -> None:
    folder = tmp_path / "alpha"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([pixels, half_mask()]), "RGBA").save(folder / "a.png")
    Image.fromarray(pixels).save(folder / "opaque.png")
    dataset = ImageFolderDataset(folder, DatasetConfig(resolution=SIZE, loss_mask="alpha"))
    by_stem = {example.path.stem: index for index, example in enumerate(dataset.examples)}
    assert torch.equal(dataset.image_mask(by_stem["a"]), torch.from_numpy(half_mask() / 255).float()[None])
    assert dataset.image_mask(by_stem["opaque"]) is None  # no alpha: every pixel counts


def test_the_loss_has_no_gradient_where_the_mask_is_zero(pipeline, tmp_path) -> None:
    """Through the encoded dataset's latent-grid masks, for the ε and the flow-matching objective alike: the gradient
    of the loss by the prediction is zero on the masked half of the latent and not on the other."""
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(masked_dataset(tmp_path / "data"), DatasetConfig(resolution=SIZE, loss_mask="masks",
                                                                                   flip=True))
    encoded = EncodedDataset(backend, dataset, 0, cache_text=True)
    batch = next(dataset.batches(2, torch.Generator().manual_seed(0)))
    latents, masks = encoded.batch_latents(batch), encoded.batch_masks(batch)
    assert masks.shape == (2, 1, SIZE // 8, SIZE // 8)
    objectives = [DiscreteObjective(backend.alphas_cumprod(), "epsilon"), FlowMatchingObjective(timestep_multiplier=1000.0)]
    for objective in objectives:
        prediction = torch.randn(latents.shape, requires_grad=True)
        noise, times = objective.draw(tuple(latents.shape), torch.Generator().manual_seed(1))
        objective.loss(lambda noisy, t: prediction, latents, noise, times, masks).sum().backward()
        for item, flipped in enumerate(batch.flipped):
            masked, kept = (slice(SIZE // 16, None), slice(None, SIZE // 16)) if flipped else \
                           (slice(None, SIZE // 16), slice(SIZE // 16, None))
            assert torch.all(prediction.grad[item, ..., masked] == 0), type(objective).__name__
            assert torch.all(prediction.grad[item, ..., kept] != 0), type(objective).__name__


def test_a_masked_run_trains_on_the_masked_loss(pipeline, tmp_path) -> None:
    folder = masked_dataset(tmp_path / "data")
    losses = {}
    for loss_mask in ("none", "masks"):
        backend = DiffusersBackend(pipeline)
        dataset = ImageFolderDataset(folder, DatasetConfig(resolution=SIZE, loss_mask=loss_mask))
        network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4, seed=1)
        losses[loss_mask] = train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1,
                                                                            validation_every=0)).losses
    assert np.isfinite(losses["masks"]).all() and losses["masks"] != losses["none"]
    assert all(masked < plain for masked, plain in zip(losses["masks"], losses["none"]))  # half the values count


@pytest.mark.parametrize(("make_bad", "message"), [
    (lambda folder: (folder / "masks" / "1.png").unlink(), r"1\.png has no loss mask: .*masks/1\.png"),
    (lambda folder: Image.fromarray(half_mask(32)).save(folder / "masks" / "1.png"),
     r"mask .*masks/1\.png is 32x32 and its image .*1\.png is 64x64"),
    (lambda folder: Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(folder / "masks" / "1.png"),
     r"mask .*masks/1\.png is black everywhere"),
], ids=["missing", "wrong size", "all black"])
def test_a_bad_mask_is_named_and_refused(tmp_path, make_bad, message) -> None:
    folder = masked_dataset(tmp_path / "data")
    make_bad(folder)
    with pytest.raises(DatasetError, match=message):
        ImageFolderDataset(folder, DatasetConfig(resolution=SIZE, loss_mask="masks"))
