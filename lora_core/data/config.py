"""How a dataset is read: its settings and their allowed values (the dataset itself is in `dataset`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoRALabError


class DatasetError(LoRALabError, ValueError):
    """Raised for a dataset that cannot be used; the message names the path and the fix."""


@dataclass(frozen=True)
class DatasetConfig:
    """How images are found, captioned, sized and repeated."""

    resolution: int = 512
    caption_extension: str = ".txt"
    default_caption: str = "a photo of {token}"
    token: str = "sks"
    repeats: int = 1
    flip: bool = False
    max_image_pixels: int = 64_000_000
    bucketing: bool = False  # kohya aspect-ratio buckets of about resolution² pixels, instead of square crops
    no_upscale: bool = False  # with bucketing: never enlarge; each image's bucket is its size (downscaled to
    # about resolution² pixels if larger) rounded down to bucket_step, min/max_bucket_size unused (kohya)
    min_bucket_size: int = 256
    max_bucket_size: int = 1024
    bucket_step: int = 64
    shuffle_tags: bool = False  # shuffle comma-separated tags on every draw...
    keep_tokens: int = 0  # ...keeping this many leading tags in place
    caption_dropout: float = 0.0  # chance that a drawn caption is empty (unconditional)
    tag_dropout: float = 0.0  # chance that each shuffled tag is left out
    regularization_caption: str = ""  # caption of class images without a caption file; "": the N_name folder's name

    @property
    def augments_captions(self) -> bool:
        return self.shuffle_tags or self.caption_dropout > 0 or self.tag_dropout > 0

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise DatasetError(
                f"resolution={self.resolution} is invalid; use a multiple of 8 that is >= 8 (e.g. 512, 768, 1024)."
            )
        if self.repeats < 1:
            raise DatasetError(f"repeats={self.repeats} is invalid; use an integer >= 1.")
        if self.max_image_pixels < 1:
            raise DatasetError(f"max_image_pixels={self.max_image_pixels} is invalid; use an integer >= 1.")
        if self.bucketing and not (
            self.bucket_step > 0 and self.bucket_step % 8 == 0 and 0 < self.min_bucket_size <= self.max_bucket_size
        ):
            raise DatasetError(
                f"buckets from {self.min_bucket_size} to {self.max_bucket_size} px in steps of {self.bucket_step} are "
                "invalid; use a step that is a multiple of 8 and 0 < min_bucket_size <= max_bucket_size."
            )
        if self.no_upscale and not self.bucketing:
            raise DatasetError(
                "no_upscale=True needs bucketing=True (square training scales every image to resolution²); turn "
                "bucketing on or no_upscale off."
            )
        for name in ("caption_dropout", "tag_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise DatasetError(f"{name}={getattr(self, name)} is invalid; use a probability from 0 to 1.")
        if self.keep_tokens < 0:
            raise DatasetError(f"keep_tokens={self.keep_tokens} is invalid; use 0 or more leading tags.")
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise DatasetError(
                f"caption_extension={self.caption_extension!r} is invalid; use a dotted extension such as '.txt'."
            )
