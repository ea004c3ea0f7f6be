"""Tests for lora_core.data.dataset."""
from __future__ import annotations

import codecs
import itertools
import os
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from lora_core.data.config import DatasetConfig, DatasetError
from lora_core.data.dataset import IMAGE_EXTENSIONS, ImageFolderDataset
from lora_core.data.images import DatasetWarning

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)
SMALL = DatasetConfig(resolution=16)


def save_image(path: Path, size: tuple[int, int] = (24, 24), color: tuple[int, ...] = GREEN, mode: str = "RGB") -> Path:
    """Write a solid-colour image, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def save_split_image(path: Path, size: tuple[int, int], first: tuple[int, int, int], second: tuple[int, int, int]) -> Path:
    """Write an image whose left (or, if tall, top) half is `first` and the other half is `second`."""
    width, height = size
    image = Image.new("RGB", size, first)
    second_half = (width // 2, 0, width, height) if width >= height else (0, height // 2, width, height)
    image.paste(second, second_half)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def load_quietly(root: Path, config: DatasetConfig = SMALL) -> ImageFolderDataset:
    """Build a dataset, failing the test on any unexpected warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ImageFolderDataset(root, config)


def test_folder_repeats_and_global_repeats_are_counted(tmp_path: Path) -> None:
    save_image(tmp_path / "root.png")
    save_image(tmp_path / "3_person" / "a.png")
    save_image(tmp_path / "3_person" / "b.jpg")
    save_image(tmp_path / "style" / "c.webp")
    save_image(tmp_path / "0_zero" / "d.png")

    dataset = load_quietly(tmp_path)
    assert dataset.num_images == 5
    assert len(dataset) == 1 + 3 + 3 + 1 + 1
    assert {example.path.name: example.repeats for example in dataset.examples} == {
        "root.png": 1, "a.png": 3, "b.jpg": 3, "c.webp": 1, "d.png": 1,
    }
    assert len(load_quietly(tmp_path, DatasetConfig(resolution=16, repeats=2))) == 2 * 9


def test_scan_is_sorted_case_insensitive_and_skips_hidden_and_other_files(tmp_path: Path) -> None:
    save_image(tmp_path / "b.PNG")
    save_image(tmp_path / "a.JpEg")
    save_image(tmp_path / ".hidden.png")
    save_image(tmp_path / ".2_hidden" / "x.png")
    save_image(tmp_path / "1_sub" / "deeper" / "nested.png")
    (tmp_path / "notes.md").write_text("not an image")

    dataset = load_quietly(tmp_path)
    assert [example.path.name for example in dataset.examples] == ["a.JpEg", "b.PNG"]
    assert dataset.skipped == []


def test_captions_are_read_defaulted_and_token_substituted(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  {token} woman,\n red hat \n", encoding="utf-8")
    save_image(tmp_path / "b.png")
    save_image(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text(" \n ", encoding="utf-8")
    save_image(tmp_path / "d.png")
    (tmp_path / "d.caption").write_text("ignored: wrong extension", encoding="utf-8")

    dataset = load_quietly(tmp_path, DatasetConfig(resolution=16, token="ohwx"))
    captions = {example.path.name: example.caption for example in dataset.examples}
    assert captions == {
        "a.png": "ohwx woman, red hat",
        "b.png": "a photo of ohwx",
        "c.png": "a photo of ohwx",
        "d.png": "a photo of ohwx",
    }
    assert [example.captioned for example in dataset.examples] == [True, False, False, False]
    assert (dataset.captioned_count, dataset.defaulted_count) == (1, 3)
    assert dataset.caption(0) == "ohwx woman, red hat"


def test_custom_caption_extension_and_default_caption(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("by {token}", encoding="utf-8")
    save_image(tmp_path / "b.png")

    config = DatasetConfig(resolution=16, caption_extension=".caption", default_caption="art, {token} style")
    dataset = load_quietly(tmp_path, config)
    assert [example.caption for example in dataset.examples] == ["by sks", "art, sks style"]


def test_wide_image_is_resized_then_center_cropped(tmp_path: Path) -> None:
    save_split_image(tmp_path / "wide.png", (40, 20), RED, BLUE)

    dataset = load_quietly(tmp_path)
    pixels = dataset.examples[0].pixels
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16)
    # The 40x20 image scales to 32x16; the crop keeps columns 8..23, so the red/blue edge sits at column 8.
    assert pixels[:, :, :6].tolist() == [[[255] * 6] * 16, [[0] * 6] * 16, [[0] * 6] * 16]
    assert pixels[:, :, 10:].tolist() == [[[0] * 6] * 16, [[0] * 6] * 16, [[255] * 6] * 16]

    values = dataset.image_pixels(0)
    assert values.dtype == torch.float32 and values.shape == (3, 16, 16)
    assert values[:, 5, 1].tolist() == [1.0, -1.0, -1.0]
    assert values[:, 5, 14].tolist() == [-1.0, -1.0, 1.0]
    assert values.min() >= -1.0 and values.max() <= 1.0


def test_tall_image_is_center_cropped_vertically(tmp_path: Path) -> None:
    save_split_image(tmp_path / "tall.png", (20, 40), RED, BLUE)

    pixels = load_quietly(tmp_path).examples[0].pixels
    assert pixels[:, 1, 5].tolist() == list(RED)
    assert pixels[:, 14, 5].tolist() == list(BLUE)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left (red) half ends up on top
    image.save(tmp_path / "rotated.png", exif=exif)

    pixels = load_quietly(tmp_path).examples[0].pixels
    assert pixels[:, 1, 5].tolist() == list(RED)
    assert pixels[:, 14, 5].tolist() == list(BLUE)


def test_rgba_is_composited_onto_white_and_other_modes_become_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (8, 0, 16, 16))
    rgba.save(tmp_path / "a_rgba.png")
    save_image(tmp_path / "b_grey.png", mode="L", color=100)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    palette.save(tmp_path / "c_palette.png")

    rgba_pixels, grey_pixels, palette_pixels = (example.pixels for example in load_quietly(tmp_path).examples)
    assert rgba_pixels[:, 3, 2].tolist() == [255, 0, 0]
    assert rgba_pixels[:, 3, 13].tolist() == [255, 255, 255]
    assert grey_pixels[:, 3, 3].tolist() == [100, 100, 100]
    assert palette_pixels[:, 3, 3].tolist() == list(BLUE)


def test_flip_mirrors_horizontally(tmp_path: Path) -> None:
    save_split_image(tmp_path / "wide.png", (40, 20), RED, BLUE)

    dataset = load_quietly(tmp_path)
    plain, flipped = dataset.image_pixels(0), dataset.image_pixels(0, flip=True)
    assert torch.equal(flipped, plain.flip(-1))
    assert flipped[:, 5, 1].tolist() == [-1.0, -1.0, 1.0]
    assert flipped[:, 5, 14].tolist() == [1.0, -1.0, -1.0]


def make_numbered_dataset(root: Path, count: int, config: DatasetConfig) -> ImageFolderDataset:
    """Dataset of `count` solid images whose red channel encodes their number."""
    for number in range(count):
        save_image(root / f"{number:02d}.png", color=(number * 10, 0, 0))
    return load_quietly(root, config)


def batch_sequence(dataset: ImageFolderDataset, seed: int, batch_count: int, batch_size: int) -> list[list[int]]:
    """Image lists of the first `batch_count` batches for a seed."""
    batches = dataset.batches(batch_size, torch.Generator().manual_seed(seed))
    return [batch.images for batch in itertools.islice(batches, batch_count)]


def test_batches_are_reproducible_per_seed(tmp_path: Path) -> None:
    dataset = make_numbered_dataset(tmp_path, 6, SMALL)

    assert batch_sequence(dataset, 1, 8, 4) == batch_sequence(dataset, 1, 8, 4)
    assert batch_sequence(dataset, 1, 8, 4) != batch_sequence(dataset, 2, 8, 4)


def test_batches_are_full_and_cover_each_epoch_across_boundaries(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", color=RED)
    save_image(tmp_path / "2_two" / "b.png", color=BLUE)
    dataset = load_quietly(tmp_path, DatasetConfig(resolution=16, repeats=2))
    assert len(dataset) == 6

    batches = list(itertools.islice(dataset.batches(4, torch.Generator().manual_seed(0)), 6))
    for batch in batches:
        assert len(batch.captions) == len(batch.images) == len(batch.flipped) == 4
        assert batch.captions == [dataset.examples[image].caption for image in batch.images]
    drawn = [image for batch in batches for image in batch.images]
    assert len(drawn) == 24
    for epoch in range(4):  # a.png twice (repeats=2), b.png four times (2_two × repeats=2)
        assert sorted(drawn[epoch * 6:(epoch + 1) * 6]) == [0, 0, 1, 1, 1, 1]


def test_batch_larger_than_dataset_spans_epochs(tmp_path: Path) -> None:
    dataset = make_numbered_dataset(tmp_path, 2, SMALL)

    batch = next(dataset.batches(5, torch.Generator().manual_seed(0)))
    assert len(batch.images) == 5
    assert sorted(batch.images[:4]) == [0, 0, 1, 1]


def test_batches_flip_with_generator_only_when_enabled(tmp_path: Path) -> None:
    save_split_image(tmp_path / "wide.png", (40, 20), RED, BLUE)
    plain = load_quietly(tmp_path)
    flipping = load_quietly(tmp_path, DatasetConfig(resolution=16, flip=True))

    def orientations(dataset: ImageFolderDataset, seed: int) -> list[bool]:
        batches = dataset.batches(8, torch.Generator().manual_seed(seed))
        return [flipped for batch in itertools.islice(batches, 4) for flipped in batch.flipped]

    assert not any(orientations(plain, 0))
    flips = orientations(flipping, 0)
    assert 0 < sum(flips) < len(flips)
    assert flips == orientations(flipping, 0)


def test_invalid_batch_size_raises_immediately(tmp_path: Path) -> None:
    dataset = make_numbered_dataset(tmp_path, 1, SMALL)
    with pytest.raises(DatasetError, match="batch_size"):
        dataset.batches(0, torch.Generator())


def test_corrupt_image_is_skipped_with_warning(tmp_path: Path) -> None:
    save_image(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(os.urandom(256))

    with pytest.warns(DatasetWarning, match="corrupt.png"):
        dataset = ImageFolderDataset(tmp_path, SMALL)
    assert [example.path.name for example in dataset.examples] == ["good.png"]
    assert [path for path, _ in dataset.skipped] == [corrupt]


def test_truncated_image_is_skipped(tmp_path: Path) -> None:
    save_image(tmp_path / "good.png")
    truncated = tmp_path / "truncated.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:400])

    with pytest.warns(DatasetWarning, match="truncated.jpg"):
        dataset = ImageFolderDataset(tmp_path, SMALL)
    assert dataset.num_images == 1
    assert [path for path, _ in dataset.skipped] == [truncated]


def test_oversized_image_is_skipped_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_image(tmp_path / "small.png", size=(20, 20))
    big = save_image(tmp_path / "big.png", size=(40, 40))
    decoded_sizes: list[tuple[int, int]] = []
    original_load = ImageFile.ImageFile.load

    def recording_load(image: ImageFile.ImageFile) -> object:
        decoded_sizes.append(image.size)
        return original_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    with pytest.warns(DatasetWarning, match="big.png.*max_image_pixels"):
        dataset = ImageFolderDataset(tmp_path, DatasetConfig(resolution=16, max_image_pixels=1000))
    assert [example.path.name for example in dataset.examples] == ["small.png"]
    [(skipped_path, reason)] = dataset.skipped
    assert skipped_path == big and "40x40" in reason
    assert (40, 40) not in decoded_sizes and (20, 20) in decoded_sizes


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_unicode_captions_are_read_with_or_without_a_byte_order_mark(tmp_path: Path, encoding: str) -> None:
    save_image(tmp_path / "a.png")
    text = "{token} café, naïve – 東京, 🙂"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data  # Python's "utf-16" writes the little-endian mark; test the other one too
    (tmp_path / "a.txt").write_bytes(data)

    assert load_quietly(tmp_path).examples[0].caption == "sks café, naïve – 東京, 🙂"


@pytest.mark.parametrize("data, text", [
    ("café – naïve “quoted”".encode("cp1252"), "café – naïve “quoted”"),
    (b"\xff\xfe\xfa", "ÿþú"),  # a UTF-16 mark before bytes that are not UTF-16: cp1252 after all
    (b"caf\xe9 \x81\x8d", "café \x81\x8d"),  # bytes cp1252 leaves undefined: latin-1
])
def test_legacy_caption_is_kept_with_a_warning_naming_the_file(tmp_path: Path, data: bytes, text: str) -> None:
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes(data)

    with pytest.warns(DatasetWarning, match=r"b\.txt is not UTF-8") as warned:
        dataset = ImageFolderDataset(tmp_path, SMALL)
    assert len(warned) == 1
    assert [example.caption for example in dataset.examples] == ["a photo of sks", text]
    assert dataset.skipped == []


def test_empty_folder_raises_with_path_and_extensions(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError) as raised:
        ImageFolderDataset(tmp_path, SMALL)
    assert str(tmp_path) in str(raised.value)
    assert all(extension in str(raised.value) for extension in IMAGE_EXTENSIONS)


def test_folder_with_only_broken_images_reports_skip_count(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(DatasetWarning), pytest.raises(DatasetError, match="2 skipped") as raised:
        ImageFolderDataset(tmp_path, SMALL)
    assert str(tmp_path) in str(raised.value)


def test_missing_folder_raises_with_path(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    with pytest.raises(DatasetError) as raised:
        ImageFolderDataset(missing, SMALL)
    assert str(missing) in str(raised.value)


def test_file_as_root_raises_with_path(tmp_path: Path) -> None:
    image_file = save_image(tmp_path / "single.png")
    with pytest.raises(DatasetError) as raised:
        ImageFolderDataset(image_file, SMALL)
    assert str(image_file) in str(raised.value)


def test_tag_frequency_counts_per_folder_over_distinct_images(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    save_image(root / "10_sks" / "a.png")
    (root / "10_sks" / "a.txt").write_text("{token}, red hat, smiling", encoding="utf-8")
    save_image(root / "10_sks" / "b.png")
    (root / "10_sks" / "b.txt").write_text("sks , smiling,, ", encoding="utf-8")
    save_image(root / "loose.png")

    dataset = load_quietly(root)
    assert dataset.tag_frequency() == {
        "10_sks": {"sks": 2, "red hat": 1, "smiling": 2},
        "dataset": {"a photo of sks": 1},
    }


@pytest.mark.parametrize("resolution", [0, 4, 12, 513, -8])
def test_bad_resolution_raises(resolution: int) -> None:
    with pytest.raises(DatasetError, match="multiple of 8"):
        DatasetConfig(resolution=resolution)


@pytest.mark.parametrize(
    "overrides",
    [{"repeats": 0}, {"max_image_pixels": 0}, {"caption_extension": "txt"}, {"caption_extension": "."}],
)
def test_other_bad_config_values_raise(overrides: dict[str, object]) -> None:
    with pytest.raises(DatasetError, match=next(iter(overrides))):
        DatasetConfig(**overrides)
