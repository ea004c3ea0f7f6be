"""Aspect buckets in training: one shape per batch."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, train
from lora_core.data.dataset import bucket_sizes
from lora_core.families.sd1 import DiffusersBackend


def test_buckets_train_mixed_aspect_images_in_one_shape_per_batch(pipeline, tmp_path) -> None:
    sizes = [(192, 128), (120, 180), (100, 100), (200, 130), (128, 192), (90, 90)]
    for index, (width, height) in enumerate(sizes):
        image = Image.new("RGB", (width, height), (200, 30, 30))
        image.paste((30, 30, 200), (width // 2, 0, width, height))  # left half red, right half blue
        image.save(tmp_path / f"{index}.png")
    config = DatasetConfig(resolution=128, bucketing=True, min_bucket_size=64, max_bucket_size=256, bucket_step=32)
    dataset = ImageFolderDataset(tmp_path, config)
    assert all(w * h <= 128 * 128 and w % 32 == 0 and h % 32 == 0 for w, h in bucket_sizes(config))
    assert [example.bucket for example in dataset.examples] == [
        (160, 96), (96, 160), (128, 128), (160, 96), (96, 160), (128, 128)]
    for example, (width, height) in zip(dataset.examples, sizes):
        bucket_width, bucket_height = example.bucket
        assert abs(bucket_width / bucket_height - width / height) < 0.2  # the nearest of 32-px steps
        pixels = example.pixels  # covered and centre-cropped: both halves reach the edges, the border in the middle
        assert pixels[0, :, 0].min() > 150 and pixels[2, :, -1].min() > 150
        border = int((pixels[0, bucket_height // 2] > 115).sum())
        assert abs(border - bucket_width / 2) <= 2
    batches = dataset.batches(2, torch.Generator().manual_seed(0))
    for _ in range(12):
        batch = next(batches)
        assert len({dataset.examples[image].bucket for image in batch.images}) == 1

    backend = DiffusersBackend(pipeline)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4)
    result = train(backend, network, dataset, TrainingConfig(steps=6, batch_size=2, gradient_accumulation=1))
    assert result.steps == 6 and np.isfinite(result.losses).all()
