"""Tests for lora_core.images: images as cameras, scanners and phones write them, through the dataset."""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from lora_core.dataset import DatasetConfig, DatasetWarning, ImageFolderDataset
from lora_core.images import load_image

SIZE = 64  # images are saved at the training resolution, so what the dataset holds is the decoded image itself
CONFIG = DatasetConfig(resolution=SIZE)
D50 = (0.9642, 1.0, 0.8249)  # the ICC connection space's white
# Colorants (D50-adapted XYZ of the red, green and blue primaries) and tone-curve gamma of two wide-gamut spaces.
ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446), 563 / 256)
DISPLAY_P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841), 2.2)


def xyz_tag(x: float, y: float, z: float) -> bytes:
    """An ICC XYZ tag body."""
    return b"XYZ " + bytes(4) + struct.pack(">3i", *(round(v * 65536) for v in (x, y, z)))


def icc_profile(space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A minimal ICC v2 display profile of colour space `space` (b"RGB " or b"GRAY") with a description, D50 white
    and `tags`, built here so no profile file is needed."""
    description = b"desc" + bytes(4) + struct.pack(">I", 5) + b"test\0" + bytes(78)
    tags = [(b"desc", description), (b"wtpt", xyz_tag(*D50)), *tags]
    table, data, offset = struct.pack(">I", len(tags)), b"", 128 + 4 + 12 * len(tags)
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">II", offset + len(data), 0) + bytes.fromhex("02100000") + b"mntr" + space + b"XYZ "
              + bytes(12) + b"acsp" + bytes(28) + xyz_tag(*D50)[8:] + bytes(48))
    return header + table + data


def gamma_curve(gamma: float) -> bytes:
    """An ICC tone curve tag body of a pure gamma."""
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def rgb_icc_profile(red, green, blue, gamma: float) -> bytes:
    """An RGB display profile (matrix + gamma curves)."""
    curve = gamma_curve(gamma)
    return icc_profile(b"RGB ", [(b"rXYZ", xyz_tag(*red)), (b"gXYZ", xyz_tag(*green)), (b"bXYZ", xyz_tag(*blue)),
                                 (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)])


def grey_icc_profile(gamma: float) -> bytes:
    """A grey display profile (one gamma curve)."""
    return icc_profile(b"GRAY", [(b"kTRC", gamma_curve(gamma))])


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


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB"])
def test_profile_of_another_colour_space_is_ignored_with_one_warning(tmp_path: Path, mode: str) -> None:
    """Pillow keeps an RGB photo's sRGB profile when converting it to grey (8- or 16-bit); a profile cannot describe
    pixels of another colour space (nor a grey profile RGB ones), so it is ignored (one warning naming the file) and
    the image trains as it reads without the profile, as kohya and diffusers read it."""
    ramp = np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 251
    image = Image.fromarray({"L": ramp.astype(np.uint8), "I;16": (ramp * 257).astype(np.uint16),
                             "RGB": np.stack([ramp, ramp[::-1], ramp.T], axis=2).astype(np.uint8)}[mode])
    assert image.mode == mode
    if mode == "RGB":
        profile, described = grey_icc_profile(1.0), "GRAY pixels, not RGB"
    else:
        profile, described = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(), "RGB pixels, not L"
    (tmp_path / "plain").mkdir()
    (tmp_path / "tagged").mkdir()
    image.save(tmp_path / "plain" / "photo.png")
    image.save(tmp_path / "tagged" / "photo.png", icc_profile=profile)
    assert Image.open(tmp_path / "tagged" / "photo.png").info["icc_profile"] == profile

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [example] = ImageFolderDataset(tmp_path / "tagged", CONFIG).examples
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, DatasetWarning)]
    assert len(messages) == 1 and "photo.png" in messages[0] and described in messages[0], messages
    assert torch.equal(example.pixels, dataset_pixels(tmp_path / "plain"))


def test_grey_profile_on_a_grey_image_is_applied(tmp_path: Path) -> None:
    profile = grey_icc_profile(1.0)  # linear grey: sRGB brightens its mid-tones
    grey = Image.linear_gradient("L").resize((SIZE, SIZE))
    grey.save(tmp_path / "scan.png", icc_profile=profile)

    pixels = dataset_pixels(tmp_path)
    srgb = ImageCms.profileToProfile(grey, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                     ImageCms.createProfile("sRGB"), outputMode="RGB")
    assert torch.equal(pixels, torch.from_numpy(np.asarray(srgb).copy()).permute(2, 0, 1))
    assert not torch.equal(pixels, torch.from_numpy(np.asarray(grey.convert("RGB")).copy()).permute(2, 0, 1))
