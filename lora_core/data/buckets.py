"""kohya's aspect-ratio buckets (sd-scripts `BucketManager`): the bucket sizes, the bucket and scaled size of each
image, and the scale-to-cover + centre crop that fits it (`trim_and_resize_if_required`). No aspect is stretched."""
from __future__ import annotations

import math

from PIL import Image

from .config import DatasetConfig

Size = tuple[int, int]  # (width, height)


def bucket_sizes(config: DatasetConfig) -> list[Size]:
    """kohya's `make_bucket_resolutions`: sizes in steps of `bucket_step` of at most resolution² pixels, sides
    within [min_bucket_size, max_bucket_size], plus the square; sorted by width, then height."""
    area, step = config.resolution**2, config.bucket_step
    sizes = {(config.resolution // step * step,) * 2}
    for width in range(config.min_bucket_size, config.max_bucket_size + 1, step):
        height = min(config.max_bucket_size, area // width // step * step)
        if height >= config.min_bucket_size:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The image's own size if it is a bucket, else the bucket whose aspect ratio is closest (first on ties)."""
    if (width, height) in buckets:
        return width, height
    ratio = width / height
    return min(buckets, key=lambda size: abs(size[0] / size[1] - ratio))


def select_bucket(width: int, height: int, buckets: list[Size], config: DatasetConfig) -> tuple[Size, Size]:
    """(bucket, scaled size) of a width × height image, as kohya's `BucketManager.select_bucket`.

    With `buckets` (the predefined sizes; square training has the one R×R), the image is scaled to cover the nearest
    bucket. With `config.no_upscale` (buckets unused), it is only ever scaled down, to about resolution² pixels, and
    its bucket is that size rounded down to `bucket_step`.
    """
    if not config.no_upscale:
        bucket = nearest_bucket(width, height, buckets)
        scale = bucket[1] / height if width / height > bucket[0] / bucket[1] else bucket[0] / width
        return bucket, (int(width * scale + 0.5), int(height * scale + 0.5))
    scaled = _downscaled_size(width, height, config.resolution**2, config.bucket_step)
    bucket = (scaled[0] - scaled[0] % config.bucket_step, scaled[1] - scaled[1] % config.bucket_step)
    if min(bucket) == 0:
        raise ValueError(
            f"{width}x{height} is too small or too narrow for buckets in steps of {config.bucket_step} px without "
            "upscaling; enlarge or crop the image, or turn no_upscale off"
        )
    return bucket, scaled


def _downscaled_size(width: int, height: int, area: int, step: int) -> Size:
    """The image's size if it has at most `area` pixels, else kohya's size of about `area` pixels and the same
    aspect ratio whose width or height (the one that keeps the aspect better) is a multiple of `step`."""
    if width * height <= area:
        return width, height
    ratio = width / height
    scaled_width = math.sqrt(area * ratio)

    def round_to_step(value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % step

    step_width, step_height = round_to_step(scaled_width), round_to_step(area / scaled_width)
    by_width = (step_width, int(step_width / ratio + 0.5))
    by_height = (int(step_height * ratio + 0.5), step_height)
    width_error = abs(step_width / max(round_to_step(step_width / ratio), 1) - ratio)
    height_error = abs(round_to_step(step_height * ratio) / max(step_height, 1) - ratio)
    return by_width if width_error < height_error else by_height


def fit(image: Image.Image, bucket: Size, scaled: Size) -> Image.Image:
    """`image` scaled to `scaled` (Lanczos) and centre-cropped to `bucket`."""
    left, top = (scaled[0] - bucket[0]) // 2, (scaled[1] - bucket[1]) // 2
    if scaled == image.size:
        return image.crop((left, top, left + bucket[0], top + bucket[1]))
    scale_x, scale_y = scaled[0] / image.width, scaled[1] / image.height
    # Resizing only the source region under the crop gives resize-then-crop (to within one level) without the large
    # intermediate image.
    box = (left / scale_x, top / scale_y, (left + bucket[0]) / scale_x, (top + bucket[1]) / scale_y)
    return image.resize(bucket, Image.Resampling.LANCZOS, box=box)
