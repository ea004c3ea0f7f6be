"""Tests for lora_core.data.buckets: kohya's buckets scale each image to cover its bucket and centre-crop it, never
stretching it; with no_upscale an image is never enlarged."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_core.data.buckets import bucket_sizes
from lora_core.data.config import DatasetConfig, DatasetError
from lora_core.data.dataset import ImageFolderDataset
from lora_core.data.images import DatasetWarning

# 64² pixels in 16 px steps: (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32) and transposes.
BUCKETS = DatasetConfig(resolution=64, bucketing=True, min_bucket_size=32, max_bucket_size=128, bucket_step=16)
NO_UPSCALE = DatasetConfig(resolution=64, bucketing=True, no_upscale=True, bucket_step=16)


def noise_image(path: Path, size: tuple[int, int]) -> Image.Image:
    """Write an RGB noise image (every pixel differs, so any misplaced crop or stretch shows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.effect_noise(size, 80).convert("RGB")
    image.save(path)
    return image


def held_pixels(root: Path, config: DatasetConfig) -> np.ndarray:
    """The [H, W, 3] pixels the dataset holds for the only image in `root`, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [example] = ImageFolderDataset(root, config).examples
    return example.pixels.permute(1, 2, 0).numpy().astype(int)


def test_bucket_sizes_are_kohyas() -> None:
    assert bucket_sizes(BUCKETS) == [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32),
                                     (112, 32), (128, 32)]


@pytest.mark.parametrize("size, bucket, scaled, crop", [
    ((90, 40), (80, 48), (108, 48), (14, 0)),  # aspect 2.25 → bucket 5:3; height fits, 28 columns cropped
    ((40, 90), (32, 96), (43, 96), (5, 0)),  # aspect 0.44: 1:3 is nearer than 3:5; width fits
    ((50, 61), (64, 64), (64, 78), (0, 7)),  # the square bucket: enlarged to cover it
    ((300, 150), (80, 48), (96, 48), (8, 0)),  # aspect 2: 5:3 is nearer than 3:1
])
def test_image_is_scaled_to_cover_its_bucket_and_centre_cropped(tmp_path: Path, size, bucket, scaled, crop) -> None:
    image = noise_image(tmp_path / "image.png", size)

    pixels = held_pixels(tmp_path, BUCKETS)
    left, top = crop
    expected = image.resize(scaled, Image.Resampling.LANCZOS).crop((left, top, left + bucket[0], top + bucket[1]))
    assert pixels.shape == (bucket[1], bucket[0], 3)
    assert np.abs(pixels - np.asarray(expected, dtype=int)).max() <= 1  # Lanczos of the cropped region only
    stretched = np.asarray(image.resize(bucket, Image.Resampling.LANCZOS), dtype=int)
    assert np.abs(pixels - stretched).mean() > 10


def test_split_image_keeps_its_aspect_in_a_bucket(tmp_path: Path) -> None:
    image = Image.new("RGB", (90, 40), (0, 0, 255))
    image.paste((0, 255, 0), (40, 15, 50, 25))  # a 10x10 green square in the middle
    image.save(tmp_path / "shapes.png")

    pixels = held_pixels(tmp_path, BUCKETS)  # 108x48 cropped to 80x48 from column 14: the square is 12x12 at 34, 18
    green = np.argwhere((pixels[..., 1] > 128) & (pixels[..., 0] < 128) & (pixels[..., 2] < 128))
    (top, left), (bottom, right) = green.min(axis=0), green.max(axis=0)
    assert (top, left, bottom, right) == (18, 34, 29, 45)  # still square: a stretch makes it about 9 wide


@pytest.mark.parametrize("size, bucket, scaled", [
    ((70, 50), (64, 48), (70, 50)),  # smaller than 64²: not scaled, only cropped to 16 px steps
    ((150, 100), (64, 48), (72, 48)),  # larger: scaled down to about 64² keeping the aspect (kohya's rounding)
    ((200, 100), (64, 32), (64, 32)),
])
def test_no_upscale_never_enlarges_and_only_crops_to_the_step(tmp_path: Path, size, bucket, scaled) -> None:
    image = noise_image(tmp_path / "image.png", size)

    pixels = held_pixels(tmp_path, NO_UPSCALE)
    left, top = (scaled[0] - bucket[0]) // 2, (scaled[1] - bucket[1]) // 2
    resized = image if scaled == size else image.resize(scaled, Image.Resampling.LANCZOS)
    expected = np.asarray(resized.crop((left, top, left + bucket[0], top + bucket[1])), dtype=int)
    assert pixels.shape == (bucket[1], bucket[0], 3)
    assert np.abs(pixels - expected).max() <= (0 if scaled == size else 1)


def test_no_upscale_skips_an_image_smaller_than_one_step(tmp_path: Path) -> None:
    noise_image(tmp_path / "good.png", (40, 40))
    noise_image(tmp_path / "sliver.png", (100, 12))

    with pytest.warns(DatasetWarning, match="sliver.png.*100x12.*no_upscale"):
        dataset = ImageFolderDataset(tmp_path, NO_UPSCALE)
    assert [example.bucket for example in dataset.examples] == [(32, 32)]


def test_no_upscale_needs_bucketing() -> None:
    with pytest.raises(DatasetError, match="no_upscale=True needs bucketing=True"):
        DatasetConfig(no_upscale=True)
