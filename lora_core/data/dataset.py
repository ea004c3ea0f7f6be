"""Kohya-style image+caption folder dataset for LoRA training: the folders, the examples and the batch sampler.
Its settings live in `config`, decoding in `images`, bucket geometry in `buckets`, caption reading and
augmentation in `captions`."""
from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import Size, bucket_sizes, fit, select_bucket
from .captions import LEGACY_ENCODINGS, augment_caption, decode_caption
from .config import DatasetConfig, DatasetError
from .images import DatasetWarning, load_image, load_image_and_alpha, to_tensor
from .videos import VIDEO_EXTENSIONS, read_frames, window_starts

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CONTROL_FOLDER = "control"  # with control_images: the reference images of the folder's images, by stem
MASK_FOLDER = "masks"  # with loss_mask "masks": the loss masks of the folder's images, by stem
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Example:
    """One distinct image (or window of a video clip) with its caption and folder repeat count."""

    path: Path
    caption: str
    pixels: torch.Tensor  # uint8 [3, H, W]: R×R, or the bucket's size with bucketing; a clip's [3, frames, H, W]
    repeats: int
    captioned: bool
    original_size: Size  # (width, height) of the image file
    scaled_size: Size  # (width, height) it was scaled to before the centre crop to `bucket`
    regularization: bool = False  # a class image for prior preservation, not an image of the concept
    references: tuple[torch.Tensor, ...] = ()  # uint8 [3, H, W] like `pixels`: edit pairs' reference images
    mask: torch.Tensor | None = None  # uint8 [1, H, W] like `pixels`: the loss mask (None: every pixel counts fully)

    @property
    def bucket(self) -> tuple[int, int]:
        """(width, height) of the training image; batches only mix images of one bucket."""
        return self.pixels.shape[-1], self.pixels.shape[-2]

    @property
    def frames(self) -> int:
        """1 for an image; a clip's frame count."""
        return 1 if self.pixels.dim() == 3 else self.pixels.shape[1]

    def size_conditioning(self, flipped: bool) -> tuple[int, int, int, int, int, int]:
        """SDXL's micro-conditioning of this image: original (height, width), the crop's (top, left) in the scaled
        image, target (height, width), as the SDXL paper and diffusers' `compute_time_ids` order them. Mirroring
        moves what was cut on the right to the left."""
        (width, height), (scaled_width, scaled_height) = self.bucket, self.scaled_size
        left, top = (scaled_width - width) // 2, (scaled_height - height) // 2
        if flipped:
            left = scaled_width - width - left
        return self.original_size[1], self.original_size[0], top, left, height, width


@dataclass(frozen=True)
class Batch:
    """A training batch: for each item its caption, the distinct image it shows and whether it is mirrored (what the
    latents are keyed by); `ImageFolderDataset.image_pixels` gives the pixels."""

    captions: list[str]
    images: list[int]
    flipped: list[bool]
    regularization: list[bool]  # which items are class images (their loss is weighted by prior_loss_weight)


class ImageFolderDataset:
    """Images in `root` and its `N_name` subfolders, scaled and centre-cropped to a square or to their bucket, with
    captions and repeats."""

    def __init__(self, root: str | os.PathLike, config: DatasetConfig = DatasetConfig(),
                 regularization_root: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.regularization_root = Path(regularization_root) if regularization_root is not None else None
        self.config = config
        self.skipped: list[tuple[Path, str]] = []
        self.buckets: list[Size] = bucket_sizes(config) if config.bucketing else [(config.resolution,) * 2]
        self.examples: list[Example] = []
        self._folder_names: list[str] = []
        self._load_folder(self.root, regularization=False)
        self.num_training_images = len(self.examples)  # the concept's images come first in `examples`
        if self.regularization_root is not None:
            if config.control_images:
                raise DatasetError(f"class images ({self.regularization_root}) have no reference images, and every "
                                   "image of an edit pair (control_images) needs one: train edit pairs without a "
                                   "regularization folder")
            self._load_folder(self.regularization_root, regularization=True)
        expanded = [index for index, example in enumerate(self.examples)
                    for _ in range(example.repeats * config.repeats)]
        training = [index for index in expanded if index < self.num_training_images]
        classes = [index for index in expanded if index >= self.num_training_images]
        if len(classes) > len(training):
            warnings.warn(
                f"{len(classes)} regularization examples in {self.regularization_root} and {len(training)} training "
                f"examples: each epoch uses the first {len(training)} of them (as kohya does); add training images or "
                "repeats to use them all", DatasetWarning, stacklevel=2)
        self.num_training_examples = len(training)  # kohya's `num_train_images`: the concept's, with repeats
        # kohya's prior preservation: class images repeated (or cut) to as many examples as the concept has
        self._expanded: list[int] = training + [classes[i % len(classes)] for i in range(len(training))] \
            if classes else training

    def _load_folder(self, root: Path, regularization: bool) -> None:
        """The images of `root` and its `N_name` subfolders, appended to `examples`."""
        what = "Regularization folder" if regularization else "Dataset folder"
        if not root.exists():
            raise DatasetError(f"{what} {root} does not exist; check the path.")
        if not root.is_dir():
            raise DatasetError(f"{what} {root} is not a folder; point it at the folder that holds the images.")
        before = len(self.examples)
        for folder, folder_name, repeats in self._image_folders(root):
            default_caption = self.config.default_caption
            if regularization:
                default_caption = self.config.regularization_caption or _class_name(folder_name)
            for path in _image_files(folder, VIDEO_EXTENSIONS):
                if path.suffix.lower() in VIDEO_EXTENSIONS:
                    examples = self._load_clip(path, repeats, default_caption, regularization)
                else:
                    examples = [example] if (example := self._load_example(path, repeats, default_caption,
                                                                           regularization)) else []
                self.examples += examples
                self._folder_names += [folder_name] * len(examples)
        if len(self.examples) == before:
            raise DatasetError(
                f"No usable images in {root} ({len(self.skipped)} skipped as unreadable or oversized). "
                f"Add {', '.join(IMAGE_EXTENSIONS)} images (or {', '.join(VIDEO_EXTENSIONS)} clips, with frames "
                "above 1) to it or to subfolders such as '10_name'."
            )

    def __len__(self) -> int:
        return len(self._expanded)

    @property
    def num_images(self) -> int:
        """Number of distinct images, regularization images included."""
        return len(self.examples)

    @property
    def num_regularization_images(self) -> int:
        return self.num_images - self.num_training_images

    @property
    def captioned_count(self) -> int:
        """Distinct training images whose caption came from a caption file."""
        return sum(example.captioned for example in self.examples[:self.num_training_images])

    @property
    def defaulted_count(self) -> int:
        """Distinct training images that use the default caption."""
        return self.num_training_images - self.captioned_count

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Per-folder counts of comma-separated caption tags (kohya's `ss_tag_frequency`)."""
        frequency: dict[str, Counter[str]] = {}
        for folder_name, example in zip(self._folder_names, self.examples[:self.num_training_images]):
            tags = (tag.strip() for tag in example.caption.split(","))
            frequency.setdefault(folder_name, Counter()).update(tag for tag in tags if tag)
        return {folder_name: dict(counts) for folder_name, counts in frequency.items()}

    def image_pixels(self, image: int, flip: bool = False) -> torch.Tensor:
        """Float32 [3, H, W] ([3, frames, H, W] for a clip) pixels in [-1, 1] of distinct image `image`, optionally
        mirrored."""
        pixels = self.examples[image].pixels.float() / 127.5 - 1.0
        return pixels.flip(-1) if flip else pixels

    def image_mask(self, image: int, flip: bool = False) -> torch.Tensor | None:
        """Float32 [1, H, W] loss weights in [0, 1] of distinct image `image`, mirrored with it; None: no mask."""
        mask = self.examples[image].mask
        if mask is None:
            return None
        mask = mask.float() / 255
        return mask.flip(-1) if flip else mask

    def reference_pixels(self, image: int, flip: bool = False) -> list[torch.Tensor]:
        """Float32 [3, H, W] pixels in [-1, 1] of each reference image of `image` (edit pairs), mirrored with it."""
        references = [reference.float() / 127.5 - 1.0 for reference in self.examples[image].references]
        return [reference.flip(-1) for reference in references] if flip else references

    def image_index(self, index: int) -> int:
        """The distinct image a repeat-expanded index shows."""
        return self._expanded[index]

    def caption(self, index: int) -> str:
        """Caption for a repeat-expanded index."""
        return self.examples[self._expanded[index]].caption

    def bucket(self, index: int) -> tuple[int, int]:
        """(width, height) of a repeat-expanded index's image."""
        return self.examples[self._expanded[index]].bucket

    def batch_key(self, index: int) -> str:
        """What the items of one batch share: their bucket ("WxH"), and a clip's frame count ("WxHxF")."""
        example = self.examples[self._expanded[index]]
        key = "{}x{}".format(*example.bucket)
        return key if example.frames == 1 else f"{key}x{example.frames}"

    def batches(self, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1,
                exclude: Collection[int] = ()) -> BatchSampler:
        """Endless full batches over shuffled epochs, drawn with `generator`, never showing the distinct images in
        `exclude` (held out for validation); see BatchSampler."""
        return BatchSampler(self, batch_size, generator, rank, world_size, exclude)

    def make_batch(self, indices: list[int], generator: torch.Generator, part: slice = slice(None)) -> Batch:
        """The batch of these repeat-expanded indices, with random flips and caption augmentation from `generator`.

        With `part`, only that slice of it: the randomness is drawn for all `indices` all the same, so the parts
        that data-parallel ranks keep make up the very batch one process draws.
        """
        if self.config.flip:
            flips = (torch.rand(len(indices), generator=generator) < 0.5).tolist()
        else:
            flips = [False] * len(indices)
        captions = [self.caption(index) for index in indices]
        if self.config.augments_captions:
            captions = [augment_caption(caption, self.config, generator) for caption in captions]
        indices, flips, captions = indices[part], flips[part], captions[part]
        images = [self._expanded[index] for index in indices]
        return Batch(captions=captions, images=images, flipped=flips,
                     regularization=[self.examples[image].regularization for image in images])

    def _image_folders(self, root: Path) -> list[tuple[Path, str, int]]:
        """(folder, name, repeats) for the root and then each visible subfolder, sorted (with control_images, not the
        control/ folders of reference images)."""
        folders = [(root, root.resolve().name, 1)]
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                if not ((self.config.control_images and child.name == CONTROL_FOLDER)
                        or (self.config.loss_mask == "masks" and child.name == MASK_FOLDER)):
                    folders.append((child, child.name, _folder_repeats(child.name)))
        return folders

    def _load_example(self, path: Path, repeats: int, default_caption: str, regularization: bool) -> Example | None:
        """Load one image and its caption, or record why it was skipped."""
        caption_path = path.with_suffix(self.config.caption_extension)
        try:
            caption_text = self._read_caption(caption_path)
        except OSError as error:
            return self._skip(path, f"caption file {caption_path} is unreadable ({error})")
        try:
            image, alpha = load_image_and_alpha(path, self.config.max_image_pixels)
            bucket, scaled = select_bucket(image.width, image.height, self.buckets, self.config)
            pixels = to_tensor(fit(image, bucket, scaled))
        except Exception as error:  # PIL raises many exception types for broken files
            return self._skip(path, str(error) or type(error).__name__)
        references = ()
        if self.config.control_images and not regularization:
            references = tuple(self._load_reference(reference, bucket) for reference in _reference_files(path))
        mask = None
        if self.config.loss_mask != "none" and not regularization:
            mask = self._load_mask(path, image.size, alpha, bucket, scaled)
        captioned = bool(caption_text)
        caption = (caption_text if captioned else default_caption).replace("{token}", self.config.token)
        return Example(path=path, caption=caption, pixels=pixels, repeats=repeats, captioned=captioned,
                       original_size=image.size, scaled_size=scaled, regularization=regularization,
                       references=references, mask=mask)

    def _load_clip(self, path: Path, repeats: int, default_caption: str, regularization: bool) -> list[Example]:
        """The windows of `frames` frames of video clip `path` (frame_stride / target_fps, frame_extraction), each an
        example of [3, frames, H, W] pixels, every frame fitted to the bucket of the clip's frame size; none, with the
        reason recorded, for a clip that cannot be read or is shorter than one window."""
        config = self.config
        if config.frames == 1:
            self._skip(path, "a video clip, and frames is 1 (images only): set frames (4k+1 for Wan and "
                             "HunyuanVideo: 17, 33, 81…) to train on clips")
            return []
        if config.control_images:
            self._skip(path, "a video clip: edit pairs (control_images) are images")
            return []
        if config.loss_mask != "none":
            self._skip(path, f"a video clip: loss masks (loss_mask {config.loss_mask}) are for images")
            return []
        caption_path = path.with_suffix(config.caption_extension)
        try:
            caption_text = self._read_caption(caption_path)
        except OSError as error:
            self._skip(path, f"caption file {caption_path} is unreadable ({error})")
            return []
        sizes: dict[str, Size] = {}

        def fitted(frame: Image.Image) -> Image.Image:
            if not sizes:  # the clip's bucket, from its first frame
                sizes["original"] = frame.size
                sizes["bucket"], sizes["scaled"] = select_bucket(frame.width, frame.height, self.buckets, config)
            return fit(frame, sizes["bucket"], sizes["scaled"])

        try:
            frames, _ = read_frames(path, config.frame_stride, config.target_fps, config.max_image_pixels, fitted)
        except Exception as error:  # PyAV raises many exception types for broken files
            self._skip(path, str(error) or type(error).__name__)
            return []
        if len(frames) < config.frames:
            taken = (f" at {config.target_fps:g} fps" if config.target_fps else
                     f" at frame_stride {config.frame_stride}" if config.frame_stride > 1 else "")
            self._skip(path, f"{len(frames)} frames{taken}, fewer than frames={config.frames}: use a longer clip, "
                             "fewer frames, or a smaller frame_stride / target_fps")
            return []
        pixels = torch.stack([to_tensor(frame) for frame in frames], 1)
        captioned = bool(caption_text)
        caption = (caption_text if captioned else default_caption).replace("{token}", config.token)
        return [Example(path=path, caption=caption, pixels=pixels[:, start:start + config.frames].clone(),
                        repeats=repeats, captioned=captioned, original_size=sizes["original"],
                        scaled_size=sizes["scaled"], regularization=regularization)
                for start in window_starts(len(frames), config.frames, config.frame_extraction, config.frame_windows)]

    def _load_reference(self, path: Path, bucket: Size) -> torch.Tensor:
        """A reference image scaled to cover its image's `bucket` and centre-cropped to it, as the image itself."""
        try:
            image = load_image(path, self.config.max_image_pixels)
        except Exception as error:  # an edit pair without its reference cannot train: refused, not skipped
            raise DatasetError(f"Reference image {path} cannot be read ({error or type(error).__name__}); replace "
                               "it or remove its image from the dataset.") from error
        _, scaled = select_bucket(image.width, image.height, [bucket], replace(self.config, no_upscale=False))
        return to_tensor(fit(image, bucket, scaled))

    def _load_mask(self, path: Path, size: Size, alpha: Image.Image | None, bucket: Size, scaled: Size
                   ) -> torch.Tensor | None:
        """The loss mask of image `path` (of `size` before fitting): its masks/ image or its alpha channel, fitted to
        the image's bucket as the image is; None for an image without alpha (every pixel counts)."""
        if self.config.loss_mask == "alpha":
            source, what = alpha, f"the alpha channel of {path}"
            if alpha is None:
                return None
        else:
            mask_path = _mask_file(path)
            what = f"mask {mask_path}"
            try:
                with Image.open(mask_path) as opened:
                    source = ImageOps.exif_transpose(opened).convert("L")
            except Exception as error:  # a mask that cannot be read trains nothing it was meant to
                raise DatasetError(f"{what} cannot be read ({error or type(error).__name__}); replace it, or remove "
                                   "its image from the dataset") from error
            if source.size != size:
                raise DatasetError(f"{what} is {source.width}x{source.height} and its image {path} is "
                                   f"{size[0]}x{size[1]}: make the mask the image's size")
        mask = torch.from_numpy(np.asarray(fit(source, bucket, scaled), dtype=np.uint8).copy())[None]
        if not mask.any():
            raise DatasetError(f"{what} is black everywhere in the {bucket[0]}x{bucket[1]} crop that trains, so the "
                               "image would teach nothing: paint white where it should count, or remove the image")
        return mask

    @staticmethod
    def _read_caption(caption_path: Path) -> str:
        """Caption file text on one line, or "" when the file is missing; warns when it is not Unicode."""
        if not caption_path.is_file():
            return ""
        text, encoding = decode_caption(caption_path.read_bytes())
        if encoding in LEGACY_ENCODINGS:
            warnings.warn(
                f"Caption file {caption_path} is not UTF-8 or UTF-16; read it as {encoding}: {text!r}. Save it as "
                "UTF-8 if that text is wrong.", DatasetWarning, stacklevel=5,
            )
        return text

    def _skip(self, path: Path, reason: str) -> None:
        """Record and warn about an image that cannot be used."""
        self.skipped.append((path, reason))
        warnings.warn(f"Skipping {path}: {reason}", DatasetWarning, stacklevel=4)


def _class_name(folder_name: str) -> str:
    """The class a regularization folder holds, from its name: `100_person` → "person" (kohya's class token)."""
    match = _REPEAT_FOLDER.match(folder_name)
    return (match.group(2) if match else folder_name).replace("_", " ")


def _folder_repeats(folder_name: str) -> int:
    """Repeat count from a kohya `N_name` folder name (N >= 1), else 1."""
    match = _REPEAT_FOLDER.match(folder_name)
    return max(int(match.group(1)), 1) if match else 1


def _reference_files(path: Path) -> list[Path]:
    """The reference images of image `path` (edit pairs): `control/<stem>.<ext>`, else `control/<stem>_0.<ext>`,
    `<stem>_1.<ext>` … in order; a DatasetError naming them when there is none."""
    folder = path.parent / CONTROL_FOLDER
    found = [] if not folder.is_dir() else _image_files(folder)
    single = [reference for reference in found if reference.stem == path.stem]
    numbered = sorted((int(match.group(1)), reference) for reference in found
                      if (match := re.fullmatch(re.escape(path.stem) + r"_(\d+)", reference.stem)))
    if single or numbered:
        return single + [reference for _, reference in numbered]
    raise DatasetError(
        f"{path} has no reference image: with control_images each image needs {folder / path.stem}.png (any of "
        f"{', '.join(IMAGE_EXTENSIONS)}), or {path.stem}_0.png, {path.stem}_1.png … there for several; add it, or "
        "turn control_images off to train on the images alone.")


def _mask_file(path: Path) -> Path:
    """The loss mask of image `path`: `masks/<stem>.<ext>` beside it; a DatasetError naming it when there is none."""
    folder = path.parent / MASK_FOLDER
    found = [mask for mask in ([] if not folder.is_dir() else _image_files(folder)) if mask.stem == path.stem]
    if not found:
        raise DatasetError(f"{path} has no loss mask: with loss_mask masks each image needs {folder / path.stem}.png "
                           f"(any of {', '.join(IMAGE_EXTENSIONS)}), grey, of the image's size; add it, or set "
                           "loss_mask none")
    return found[0]


def _image_files(folder: Path, others: tuple[str, ...] = ()) -> list[Path]:
    """Visible files in `folder` with an accepted image extension (or one of `others`), sorted."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS + others
    )


class BatchSampler:
    """Endless full batches: shuffled epochs whose indices queue up per bucket, a batch taken whenever a bucket's
    queue fills (leftovers carry into the next epoch), random flips and caption augmentation.

    All randomness comes from one generator, and `state_dict()` holds it with the queues, so a run resumed from a
    checkpoint draws exactly the batches an uninterrupted run draws.

    Data-parallel ranks (`world_size` > 1) each seed the same generator and draw the same global batches of
    `batch_size × world_size` (flips and captions included); rank r keeps items [r·batch_size, (r+1)·batch_size).
    Together they train on exactly the batches one process with `batch_size × world_size` draws.
    """

    def __init__(self, dataset: ImageFolderDataset, batch_size: int, generator: torch.Generator, rank: int = 0,
                 world_size: int = 1, exclude: Collection[int] = ()) -> None:
        if batch_size < 1:
            raise DatasetError(f"batch_size={batch_size} is invalid for dataset {dataset.root}; use an integer >= 1.")
        if not 0 <= rank < world_size:
            raise DatasetError(f"rank={rank} is invalid for world_size={world_size}; use 0 <= rank < world_size.")
        self.dataset, self.batch_size, self.generator = dataset, batch_size, generator
        self.global_batch_size = batch_size * world_size
        self.excluded = frozenset(exclude)  # distinct images held out of training
        self.part = slice(rank * batch_size, (rank + 1) * batch_size)  # this rank's share of every global batch
        self.waiting: dict[str, list[int]] = {}  # per bucket "WxH": indices not yet in a batch
        self.ready: list[list[int]] = []  # full global batches of this epoch, in drawing order

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> Batch:
        while not self.ready:
            self._queue_epoch()
        return self.dataset.make_batch(self.ready.pop(0), self.generator, self.part)

    def _queue_epoch(self) -> None:
        for index in torch.randperm(len(self.dataset), generator=self.generator).tolist():
            if self.dataset.image_index(index) in self.excluded:
                continue
            queue = self.waiting.setdefault(self.dataset.batch_key(index), [])
            queue.append(index)
            if len(queue) == self.global_batch_size:
                self.ready.append(queue[:])
                queue.clear()
        if len(self.waiting) > 1:  # batches of several buckets: mix them, so no bucket trains in a long run
            self.ready = [self.ready[i] for i in torch.randperm(len(self.ready), generator=self.generator).tolist()]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "waiting": self.waiting, "ready": self.ready}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.waiting = {key: list(value) for key, value in state["waiting"].items()}
        self.ready = [list(batch) for batch in state["ready"]]
