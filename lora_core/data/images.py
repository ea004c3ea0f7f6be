"""Decoding training images as people have them into 8-bit sRGB: a size guard before decoding, EXIF rotation,
16-bit and float modes at their full range, embedded ICC profiles, transparency over white."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
WHITE = (255, 255, 255)
PROFILE_SPACES = {"L": "GRAY", "RGB": "RGB", "CMYK": "CMYK"}  # colour mode → the ICC colour space that describes it
ICC_MODES = tuple(PROFILE_SPACES)  # the colour modes an embedded profile is applied to
GREY_MODES = ("1", "L", "LA", "La")


class DatasetWarning(UserWarning):
    """An image skipped, or an image or caption read in a way its owner should know about, while loading a dataset
    (exported by `lora_core.data.dataset`; defined here, where images are read)."""


def load_image(path: Path, max_image_pixels: int) -> Image.Image:
    """The image at `path` as RGB in sRGB, upright; raises ValueError for one larger than `max_image_pixels`
    (checked from the header, before decoding) or one whose ICC profile cannot be applied."""
    return load_image_and_alpha(path, max_image_pixels)[0]


def load_image_and_alpha(path: Path, max_image_pixels: int) -> tuple[Image.Image, Image.Image | None]:
    """`load_image`'s RGB (transparent pixels composited on white) and the image's alpha channel (None: opaque)."""
    with Image.open(path) as image:
        if image.width * image.height > max_image_pixels:
            raise ValueError(
                f"{image.width}x{image.height} exceeds max_image_pixels={max_image_pixels}; downscale the image"
            )
        image.load()
        profile = image.info.get("icc_profile")
        image = ImageOps.exif_transpose(image)
    colour, alpha = split_alpha(image)
    profile = profile and embedded_profile(colour, profile, path)
    rgb = to_srgb(colour, profile) if profile else colour.convert("RGB")
    return (rgb, None) if alpha is None else (Image.composite(rgb, Image.new("RGB", rgb.size, WHITE), alpha), alpha)


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The colour of `image` as 8-bit L, RGB or CMYK (what a profile applies to), and its alpha mask or None.

    16-bit (`I;16*`, `I`) and float (`F`) greys keep their full range: 65535 and 1.0 become 255 (Pillow's own
    conversion clips them at 255, so a 16-bit photo turns almost white).
    """
    if image.mode.startswith("I") or image.mode == "F":
        full_scale = 1.0 if image.mode == "F" else 65535.0
        grey = np.clip(np.asarray(image, dtype=np.float64) / full_scale, 0.0, 1.0)
        return Image.fromarray(np.round(grey * 255).astype(np.uint8)), None
    if image.mode in ICC_MODES and not image.has_transparency_data:
        return image, None
    with_alpha = image.convert("LA" if image.mode in GREY_MODES else "RGBA")
    alpha = with_alpha.getchannel("A") if image.has_transparency_data else None
    return with_alpha.convert(with_alpha.mode[:-1]), alpha


def embedded_profile(colour: Image.Image, icc_profile: bytes, path: Path) -> ImageCms.ImageCmsProfile | None:
    """The embedded profile, or None with one warning naming the file where it describes another colour space than
    the pixels' (Pillow keeps an RGB image's profile when converting it to grey, so grey photos with an sRGB profile
    are common; kohya and diffusers read their pixels as they are, and so does this)."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    except (OSError, ImageCms.PyCMSError) as error:
        raise ValueError(f"its embedded ICC profile cannot be read ({error}); re-save the image in sRGB or with a "
                         "valid profile") from error
    space = profile.profile.xcolor_space.strip()
    if space != PROFILE_SPACES[colour.mode]:
        warnings.warn(f"{path}: its embedded ICC profile describes {space} pixels, not {colour.mode}; the profile is "
                      "ignored and the pixels read as they are (re-save the image without it to silence this)",
                      DatasetWarning, stacklevel=4)
        return None
    return profile


def to_srgb(colour: Image.Image, profile: ImageCms.ImageCmsProfile) -> Image.Image:
    """RGB in sRGB from an L/RGB/CMYK image encoded in the embedded ICC profile (Adobe RGB, Display P3, ...)."""
    try:
        return ImageCms.profileToProfile(colour, profile, SRGB, outputMode="RGB")
    except (OSError, ImageCms.PyCMSError) as error:
        raise ValueError(
            f"its embedded ICC profile cannot convert {colour.mode} pixels to sRGB ({error}); re-save the image "
            "in sRGB or with a valid profile"
        ) from error


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] pixels of an RGB image."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
