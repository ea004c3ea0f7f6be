"""Caption files as people save them (UTF-8 with or without a BOM, UTF-16/32 with a BOM, legacy 8-bit), and kohya's
caption augmentation."""
from __future__ import annotations

import codecs

import torch

from .config import DatasetConfig

UNICODE_ENCODINGS = (  # by byte-order mark; UTF-32 first, as its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"), (b"", "utf-8"),
)
LEGACY_ENCODINGS = ("cp1252", "latin-1")  # Windows' Western default, then latin-1 for the 5 bytes cp1252 lacks


def decode_caption(data: bytes) -> tuple[str, str]:
    """The text of a caption file on one line, and the encoding it was read with: the Unicode encoding its byte-order
    mark names (UTF-8 without one), or else the first legacy encoding that decodes it."""
    unicode = next(encoding for mark, encoding in UNICODE_ENCODINGS if data.startswith(mark))
    for encoding in (unicode, *LEGACY_ENCODINGS):
        try:
            return " ".join(data.decode(encoding).split()), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("unreachable: latin-1 decodes any bytes")


def augment_caption(caption: str, config: DatasetConfig, generator: torch.Generator) -> str:
    """kohya's caption augmentation: dropout of the whole caption, then tag dropout and shuffling after the first
    `keep_tokens` comma-separated tags."""
    if config.caption_dropout and torch.rand(1, generator=generator).item() < config.caption_dropout:
        return ""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[: config.keep_tokens], tags[config.keep_tokens :]
    if config.tag_dropout:
        rest = [tag for tag, draw in zip(rest, torch.rand(len(rest), generator=generator).tolist())
                if draw >= config.tag_dropout]
    if config.shuffle_tags:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return ", ".join(kept + rest)
