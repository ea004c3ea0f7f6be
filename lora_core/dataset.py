"""Kohya-style image+caption folder dataset for LoRA training."""
from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_WHITE = (255, 255, 255, 255)


class DatasetError(ValueError):
    """Raised for a dataset that cannot be used; the message names the path and the fix."""


class DatasetWarning(UserWarning):
    """Warns about an image that was skipped while loading a dataset."""


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

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise DatasetError(
                f"resolution={self.resolution} is invalid; use a multiple of 8 that is >= 8 (e.g. 512, 768, 1024)."
            )
        if self.repeats < 1:
            raise DatasetError(f"repeats={self.repeats} is invalid; use an integer >= 1.")
        if self.max_image_pixels < 1:
            raise DatasetError(f"max_image_pixels={self.max_image_pixels} is invalid; use an integer >= 1.")
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise DatasetError(
                f"caption_extension={self.caption_extension!r} is invalid; use a dotted extension such as '.txt'."
            )


@dataclass(frozen=True)
class Example:
    """One distinct image with its caption and folder repeat count."""

    path: Path
    caption: str
    pixels: torch.Tensor  # uint8 [3, R, R]
    repeats: int
    captioned: bool


@dataclass(frozen=True)
class Batch:
    """A training batch: pixels float32 [B, 3, R, R] in [-1, 1], captions, dataset indices, and for each item the
    distinct image it shows and whether it is mirrored (what a latent cache is keyed by)."""

    pixels: torch.Tensor
    captions: list[str]
    indices: list[int]
    images: list[int]
    flipped: list[bool]


class ImageFolderDataset:
    """Images in `root` and its `N_name` subfolders, square-cropped, with captions and repeats."""

    def __init__(self, root: str | os.PathLike, config: DatasetConfig = DatasetConfig()) -> None:
        self.root = Path(root)
        self.config = config
        if not self.root.exists():
            raise DatasetError(f"Dataset folder {self.root} does not exist; check the path.")
        if not self.root.is_dir():
            raise DatasetError(
                f"Dataset path {self.root} is not a folder; point it at the folder that holds the images."
            )
        self.skipped: list[tuple[Path, str]] = []
        self.examples: list[Example] = []
        self._folder_names: list[str] = []
        for folder, folder_name, repeats in self._image_folders():
            for path in _image_files(folder):
                example = self._load_example(path, repeats)
                if example is not None:
                    self.examples.append(example)
                    self._folder_names.append(folder_name)
        if not self.examples:
            raise DatasetError(
                f"No usable images in {self.root} ({len(self.skipped)} skipped as unreadable or oversized). "
                f"Add {', '.join(IMAGE_EXTENSIONS)} images to it or to subfolders such as '10_name'."
            )
        self._expanded: list[int] = [
            example_index
            for example_index, example in enumerate(self.examples)
            for _ in range(example.repeats * config.repeats)
        ]

    def __len__(self) -> int:
        return len(self._expanded)

    @property
    def num_images(self) -> int:
        """Number of distinct images."""
        return len(self.examples)

    @property
    def captioned_count(self) -> int:
        """Distinct images whose caption came from a caption file."""
        return sum(example.captioned for example in self.examples)

    @property
    def defaulted_count(self) -> int:
        """Distinct images that use the default caption."""
        return self.num_images - self.captioned_count

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Per-folder counts of comma-separated caption tags (kohya's `ss_tag_frequency`)."""
        frequency: dict[str, Counter[str]] = {}
        for folder_name, example in zip(self._folder_names, self.examples):
            tags = (tag.strip() for tag in example.caption.split(","))
            frequency.setdefault(folder_name, Counter()).update(tag for tag in tags if tag)
        return {folder_name: dict(counts) for folder_name, counts in frequency.items()}

    def pixel_values(self, index: int, flip: bool = False) -> torch.Tensor:
        """Float32 [3, R, R] pixels in [-1, 1] for a repeat-expanded index, optionally mirrored."""
        return self.image_pixels(self._expanded[index], flip)

    def image_pixels(self, image: int, flip: bool = False) -> torch.Tensor:
        """Float32 [3, R, R] pixels in [-1, 1] of distinct image `image`, optionally mirrored."""
        pixels = self.examples[image].pixels.float() / 127.5 - 1.0
        return pixels.flip(-1) if flip else pixels

    def caption(self, index: int) -> str:
        """Caption for a repeat-expanded index."""
        return self.examples[self._expanded[index]].caption

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Endless full batches over shuffled epochs; leftovers carry into the next epoch."""
        if batch_size < 1:
            raise DatasetError(f"batch_size={batch_size} is invalid for dataset {self.root}; use an integer >= 1.")
        return self._iterate_batches(batch_size, generator)

    def _iterate_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        pending: list[int] = []
        while True:
            pending.extend(torch.randperm(len(self), generator=generator).tolist())
            while len(pending) >= batch_size:
                indices, pending = pending[:batch_size], pending[batch_size:]
                yield self._make_batch(indices, generator)

    def _make_batch(self, indices: list[int], generator: torch.Generator) -> Batch:
        if self.config.flip:
            flips = (torch.rand(len(indices), generator=generator) < 0.5).tolist()
        else:
            flips = [False] * len(indices)
        return Batch(
            pixels=torch.stack([self.pixel_values(index, flip) for index, flip in zip(indices, flips)]),
            captions=[self.caption(index) for index in indices],
            indices=indices,
            images=[self._expanded[index] for index in indices],
            flipped=flips,
        )

    def _image_folders(self) -> list[tuple[Path, str, int]]:
        """(folder, name, repeats) for the root and then each visible subfolder, sorted."""
        folders = [(self.root, self.root.resolve().name, 1)]
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                folders.append((child, child.name, _folder_repeats(child.name)))
        return folders

    def _load_example(self, path: Path, repeats: int) -> Example | None:
        """Load one image and its caption, or record why it was skipped."""
        caption_path = path.with_suffix(self.config.caption_extension)
        try:
            caption_text = _read_caption(caption_path)
        except (OSError, UnicodeDecodeError) as error:
            return self._skip(path, f"caption file {caption_path} is unreadable or not UTF-8 ({error})")
        try:
            pixels = _load_square_pixels(path, self.config.resolution, self.config.max_image_pixels)
        except Exception as error:  # PIL raises many exception types for broken files
            return self._skip(path, str(error) or type(error).__name__)
        captioned = bool(caption_text)
        caption = (caption_text if captioned else self.config.default_caption).replace("{token}", self.config.token)
        return Example(path=path, caption=caption, pixels=pixels, repeats=repeats, captioned=captioned)

    def _skip(self, path: Path, reason: str) -> None:
        """Record and warn about an image that cannot be used."""
        self.skipped.append((path, reason))
        warnings.warn(f"Skipping {path}: {reason}", DatasetWarning, stacklevel=4)


def _folder_repeats(folder_name: str) -> int:
    """Repeat count from a kohya `N_name` folder name (N >= 1), else 1."""
    match = _REPEAT_FOLDER.match(folder_name)
    return max(int(match.group(1)), 1) if match else 1


def _image_files(folder: Path) -> list[Path]:
    """Visible files in `folder` with an accepted image extension, sorted."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_caption(caption_path: Path) -> str:
    """Caption file text on one line, or "" when the file is missing."""
    if not caption_path.is_file():
        return ""
    return " ".join(caption_path.read_text(encoding="utf-8-sig").split())


def _load_square_pixels(path: Path, resolution: int, max_image_pixels: int) -> torch.Tensor:
    """Decode to RGB, scale the short side to `resolution`, center-crop; uint8 [3, R, R]."""
    with Image.open(path) as image:
        if image.width * image.height > max_image_pixels:
            raise DatasetError(
                f"{image.width}x{image.height} exceeds max_image_pixels={max_image_pixels}; downscale the image"
            )
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image.convert("RGBA"))
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    scaled_width = max(resolution, round(image.width * scale))
    scaled_height = max(resolution, round(image.height * scale))
    left = (scaled_width - resolution) // 2
    top = (scaled_height - resolution) // 2
    scale_x = scaled_width / image.width
    scale_y = scaled_height / image.height
    # Resizing only the source region under the crop equals resize-then-crop without the large intermediate.
    source_box = (left / scale_x, top / scale_y, (left + resolution) / scale_x, (top + resolution) / scale_y)
    square = image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=source_box)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1).contiguous()
