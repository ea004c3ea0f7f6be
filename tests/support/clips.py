"""Small video clips written the way people have them (mp4/H.264, webm/VP9, mov/MPEG-4, gif), whose frames say their
own index: the top half of frame i is grey level `frame_level(i)` (lossy codecs keep a flat area within a few
levels), the bottom half a red circle moving left to right."""
from __future__ import annotations

from pathlib import Path

import numpy as np

CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".mov": "mpeg4"}


def frame_level(index: int) -> int:
    return 20 + 9 * index


def clip_frames(count: int, size: int = 32) -> list[np.ndarray]:
    frames = []
    rows, columns = np.mgrid[0:size, 0:size]
    for index in range(count):
        frame = np.full((size, size, 3), 245, dtype=np.uint8)
        frame[: size // 2] = frame_level(index)
        centre = (size * (0.2 + 0.6 * index / max(count - 1, 1)), size * 0.75)
        frame[(columns - centre[0]) ** 2 + (rows - centre[1]) ** 2 < (size / 6) ** 2] = (210, 30, 40)
        frames.append(frame)
    return frames


def write_clip(path: Path, count: int, size: int = 32, fps: int = 8, caption: str | None = "a video of sks") -> Path:
    """A clip of `count` frames at `fps` (and its caption file, unless None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = clip_frames(count, size)
    if path.suffix == ".gif":
        from PIL import Image

        first, *rest = [Image.fromarray(frame) for frame in frames]
        first.save(path, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
    else:
        import av

        with av.open(str(path), "w") as container:
            stream = container.add_stream(CODECS[path.suffix], rate=fps)
            stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def levels(pixels) -> list[float]:
    """The top-half grey level of each frame of uint8 clip pixels [3, F, H, W]."""
    top = pixels[:, :, : pixels.shape[2] // 2].float()
    return top.mean(dim=(0, 2, 3)).tolist()
