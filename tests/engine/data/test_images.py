"""Tests for lora_core.data.images: images as cameras, scanners and phones write them, through the dataset."""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from lora_core.data.config import DatasetConfig
from lora_core.data.dataset import ImageFolderDataset
from lora_core.data.images import DatasetWarning, load_image

SIZE = 64  # images are saved at the training resolution, so what the dataset holds is the decoded image itself
CONFIG = DatasetConfig(resolution=SIZE)
D50 = (0.9642, 1.0, 0.8249)  # the ICC connection space's white
# Colorants (D50-adapted XYZ of the red, green and blue primaries) and tone-curve gamma of two wide-gamut spaces.
ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446), 563 / 256)
DISPLAY_P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841), 2.2)


def rgb_icc_profile(red, green, blue, gamma: float) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix + gamma curves), built here so no profile file is needed."""

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + struct.pack(">3i", *(round(v * 65536) for v in (x, y, z)))

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    description = b"desc" + bytes(4) + struct.pack(">I", 5) + b"test\0" + bytes(78)
    tags = [(b"desc", description), (b"wtpt", xyz(*D50)), (b"rXYZ", xyz(*red)), (b"gXYZ", xyz(*green)),
            (b"bXYZ", xyz(*blue)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    table, data, offset = struct.pack(">I", len(tags)), b"", 128 + 4 + 12 * len(tags)
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">II", offset + len(data), 0) + bytes.fromhex("02100000") + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(28) + xyz(*D50)[8:] + bytes(48))
    return header + table + data


def dataset_pixels(root: Path) -> torch.Tensor:
    """The uint8 [3, H, W] pixels the dataset holds for the only image in `root`, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [example] = ImageFolderDataset(root, CONFIG).examples
    return example.pixels


def test_16_bit_png_keeps_its_range(tmp_path: Path) -> None:
    levels = np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 16  # 0 .. 65520, a dark-to-light ramp
    Image.fromarray(levels).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode == "I;16"

    pixels = dataset_pixels(tmp_path)
    expected = torch.from_numpy(np.round(levels / 65535 * 255).astype(np.uint8))
    assert torch.equal(pixels, expected.expand(3, SIZE, SIZE))
    assert (pixels == 255).float().mean() < 0.01  # Pillow's own convert("RGB") makes 99.6 % of them 255


@pytest.mark.parametrize("mode, full_scale", [("I", 65535), ("F", 1.0)])
def test_32_bit_integer_and_float_images_keep_their_range(tmp_path: Path, mode: str, full_scale: float) -> None:
    ramp = np.linspace(0, 1, SIZE * SIZE).reshape(SIZE, SIZE)
    values = (ramp * full_scale).astype(np.int32 if mode == "I" else np.float32)
    Image.fromarray(values).save(tmp_path / "deep.tif")  # TIFF holds both modes; PNG holds neither
    assert Image.open(tmp_path / "deep.tif").mode == mode

    grey = np.asarray(load_image(tmp_path / "deep.tif", SIZE * SIZE))
    expected = np.round(values.astype(np.float64) / full_scale * 255)
    assert np.array_equal(grey, np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize("space", [ADOBE_RGB, DISPLAY_P3], ids=["adobe_rgb", "display_p3"])
def test_embedded_icc_profile_is_converted_to_srgb(tmp_path: Path, space) -> None:
    profile = rgb_icc_profile(*space)
    image = Image.effect_noise((SIZE, SIZE), 100).convert("RGB")
    image.paste((0, 200, 0), (0, 0, 16, 16))  # a saturated green that sRGB cannot hold as it is
    image.save(tmp_path / "photo.png", icc_profile=profile)

    pixels = dataset_pixels(tmp_path)
    srgb = ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                     ImageCms.createProfile("sRGB"), outputMode="RGB")
    assert torch.equal(pixels, torch.from_numpy(np.asarray(srgb).copy()).permute(2, 0, 1))
    assert not torch.equal(pixels, torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))


def test_profile_is_applied_before_transparency_is_composited_over_white(tmp_path: Path) -> None:
    profile = rgb_icc_profile(*ADOBE_RGB)
    image = Image.new("RGBA", (SIZE, SIZE), (0, 200, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, SIZE // 2, SIZE))
    image.save(tmp_path / "cutout.png", icc_profile=profile)

    pixels = dataset_pixels(tmp_path)
    green = ImageCms.profileToProfile(Image.new("RGB", (1, 1), (0, 200, 0)),
                                      ImageCms.ImageCmsProfile(io.BytesIO(profile)), ImageCms.createProfile("sRGB"))
    assert pixels[:, 5, 5].tolist() == [255, 255, 255]
    assert pixels[:, 5, -5].tolist() == list(green.getpixel((0, 0))) != [0, 200, 0]


def test_unusable_icc_profile_skips_the_image_with_a_warning(tmp_path: Path) -> None:
    Image.new("RGB", (SIZE, SIZE), (10, 20, 30)).save(tmp_path / "good.png")
    Image.new("RGB", (SIZE, SIZE), (10, 20, 30)).save(tmp_path / "broken.png", icc_profile=b"not a profile" * 10)

    with pytest.warns(DatasetWarning, match="broken.png.*ICC profile"):
        dataset = ImageFolderDataset(tmp_path, CONFIG)
    assert [example.path.name for example in dataset.examples] == ["good.png"]


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_grey_photo_with_an_rgb_profile_is_read_as_it_is_with_one_warning(tmp_path: Path, mode: str) -> None:
    """Pillow keeps an RGB photo's sRGB profile when converting it to grey; such a profile cannot describe grey
    pixels, so it is ignored (one warning naming the file) and the image trains, as kohya and diffusers read it."""
    ramp = np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 251
    grey = Image.fromarray((ramp * 257).astype(np.uint16) if mode == "I;16" else ramp.astype(np.uint8))
    assert grey.mode == mode
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    (tmp_path / "plain").mkdir()
    (tmp_path / "tagged").mkdir()
    grey.save(tmp_path / "plain" / "grey.png")
    grey.save(tmp_path / "tagged" / "grey.png", icc_profile=srgb)
    assert Image.open(tmp_path / "tagged" / "grey.png").info["icc_profile"] == srgb

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [example] = ImageFolderDataset(tmp_path / "tagged", CONFIG).examples
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, DatasetWarning)]
    assert len(messages) == 1 and "grey.png" in messages[0] and "describes RGB pixels, not L" in messages[0], messages
    assert torch.equal(example.pixels, dataset_pixels(tmp_path / "plain"))
