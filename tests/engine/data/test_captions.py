"""Caption augmentation: tag shuffling, keep_tokens, caption and tag dropout."""
from __future__ import annotations

import torch

from lora_core import DatasetConfig
from lora_core.data.dataset import augment_caption


def test_caption_augmentation_keeps_leading_tags_and_drops_as_asked() -> None:
    caption = "sks, red, circle, white, background"
    generator = torch.Generator().manual_seed(0)
    shuffled = {augment_caption(caption, DatasetConfig(shuffle_tags=True, keep_tokens=1), generator) for _ in range(30)}
    assert len(shuffled) > 5 and all(c.startswith("sks, ") and sorted(c.split(", ")) == sorted(caption.split(", "))
                                     for c in shuffled)
    assert augment_caption(caption, DatasetConfig(caption_dropout=1.0), generator) == ""
    assert augment_caption(caption, DatasetConfig(tag_dropout=1.0, keep_tokens=2), generator) == "sks, red"
    first = augment_caption(caption, DatasetConfig(shuffle_tags=True), torch.Generator().manual_seed(3))
    assert first == augment_caption(caption, DatasetConfig(shuffle_tags=True), torch.Generator().manual_seed(3))
