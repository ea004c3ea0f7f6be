"""Decoding training video clips (mp4, webm, mov, gif…) through PyAV, which ComfyUI itself requires: the frames a clip
gives at the dataset's frame stride or frame rate, and the windows of `frames` frames cut from them."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif")
FRAME_EXTRACTIONS = ("head", "uniform", "all")


def read_frames(path: Path, frame_stride: int, target_fps: float, max_image_pixels: int,
                fit: Callable[[Image.Image], Image.Image]) -> tuple[list[Image.Image], float]:
    """The clip's frames (RGB, each through `fit` as it is decoded, so a long clip never holds full-size frames), every
    `frame_stride`-th, or with `target_fps` the first frame at or after each multiple of 1 / target_fps seconds
    (by the frames' own times: variable frame rates keep their timing); and the clip's frame rate. Raises ValueError
    for a file PyAV cannot decode, without a video stream, or with frames larger than `max_image_pixels`."""
    try:
        import av
    except ImportError as error:
        raise ValueError("PyAV is needed to read video clips (ComfyUI installs it; elsewhere: pip install av)") from error
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_image_pixels:
                raise ValueError(f"its {width}x{height} frames exceed max_image_pixels={max_image_pixels}; downscale it")
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            frames, next_time = [], 0.0
            for index, frame in enumerate(container.decode(stream)):
                if target_fps:
                    time = frame.time if frame.time is not None else index / (rate or target_fps)
                    if time + 1e-6 < next_time:
                        continue
                    while next_time <= time + 1e-6:  # the next multiple of 1 / target_fps after this frame
                        next_time += 1 / target_fps
                elif index % frame_stride:
                    continue
                frames.append(fit(frame.to_image().convert("RGB")))
    except av.error.FFmpegError as error:
        raise ValueError(f"PyAV cannot decode it ({error})") from error
    if not frames:
        raise ValueError("it has no frames")
    return frames, rate


def window_starts(count: int, frames: int, extraction: str, windows: int) -> list[int]:
    """First frames of the windows of `frames` frames cut from `count`: the first (head), `windows` spread evenly
    from the first to the last possible (uniform), or every consecutive one (all)."""
    last = count - frames
    if extraction == "head" or last == 0:
        return [0]
    if extraction == "uniform":
        if windows == 1:
            return [0]
        return sorted({round(last * index / (windows - 1)) for index in range(windows)})
    if extraction == "all":
        return list(range(0, last + 1, frames))
    raise ValueError(f"frame_extraction {extraction!r} is not one of {', '.join(FRAME_EXTRACTIONS)}")
