"""Video clips in a dataset (mp4, webm, mov, gif beside the images, through PyAV): the frames each gives at a frame
stride or frame rate, the windows cut from it, clips that cannot train skipped and named with why, images as
one-frame items, and batches that never mix frame counts or sizes."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from support.clips import frame_level, levels, write_clip

from lora_core.data.config import DatasetConfig
from lora_core.data.dataset import ImageFolderDataset
from lora_core.data.videos import window_starts

CLIPS = DatasetConfig(resolution=32, frames=5)


def frames_taken(example) -> list[int]:
    """The source frame indices of a clip example, read back from their grey levels."""
    return [round((level - frame_level(0)) / (frame_level(1) - frame_level(0))) for level in levels(example.pixels)]


def test_a_folder_of_clips_and_images_trains_on_the_valid_ones_and_names_the_others(tmp_path) -> None:
    for name in ("a.mp4", "b.webm", "c.mov", "d.gif"):
        write_clip(tmp_path / name, 9)
    write_clip(tmp_path / "short.mp4", 3)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all" * 20)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "e.png")
    with pytest.warns(UserWarning):
        dataset = ImageFolderDataset(tmp_path, CLIPS)
    examples = {example.path.name: example for example in dataset.examples}
    assert sorted(examples) == ["a.mp4", "b.webm", "c.mov", "d.gif", "e.png"]
    for name in ("a.mp4", "b.webm", "c.mov", "d.gif"):
        assert examples[name].pixels.shape == (3, 5, 32, 32) and examples[name].frames == 5
        assert frames_taken(examples[name]) == [0, 1, 2, 3, 4], name
        assert examples[name].caption == "a video of sks"
    assert examples["e.png"].pixels.shape == (3, 32, 32) and examples["e.png"].frames == 1
    skipped = {path.name: reason for path, reason in dataset.skipped}
    assert set(skipped) == {"short.mp4", "broken.mp4"}
    assert "3 frames" in skipped["short.mp4"] and "fewer than frames=5" in skipped["short.mp4"]
    assert "cannot decode" in skipped["broken.mp4"]
    keys = {dataset.batch_key(index) for index in range(len(dataset))}
    assert keys == {"32x32x5", "32x32"}
    sampler = dataset.batches(2, torch.Generator().manual_seed(0))
    for _ in range(6):  # a batch holds clips of one frame count, or images
        batch = next(sampler)
        assert len({dataset.examples[image].frames for image in batch.images}) == 1


def test_frame_stride_target_fps_and_the_windows_of_long_clips(tmp_path) -> None:
    write_clip(tmp_path / "stride" / "a.mp4", 12)
    (example,) = ImageFolderDataset(tmp_path / "stride", DatasetConfig(resolution=32, frames=5, frame_stride=2)).examples
    assert frames_taken(example) == [0, 2, 4, 6, 8]
    write_clip(tmp_path / "fps" / "a.mp4", 16, fps=24)
    (example,) = ImageFolderDataset(tmp_path / "fps", DatasetConfig(resolution=32, frames=5, target_fps=8)).examples
    assert frames_taken(example) == [0, 3, 6, 9, 12]
    write_clip(tmp_path / "long" / "a.mp4", 17)
    for extraction, windows, starts in (("head", 1, [0]), ("uniform", 3, [0, 6, 12]), ("all", 1, [0, 5, 10])):
        config = DatasetConfig(resolution=32, frames=5, frame_extraction=extraction, frame_windows=windows)
        assert [frames_taken(example)[0] for example in ImageFolderDataset(tmp_path / "long", config).examples] == starts
    assert window_starts(5, 5, "all", 1) == [0] and window_starts(9, 5, "uniform", 5) == [0, 1, 2, 3, 4]


def test_clips_are_skipped_by_name_when_frames_is_one(tmp_path) -> None:
    write_clip(tmp_path / "a.mp4", 9)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "b.png")
    with pytest.warns(UserWarning, match="a.mp4: a video clip, and frames is 1"):
        dataset = ImageFolderDataset(tmp_path, DatasetConfig(resolution=32))
    assert [example.path.name for example in dataset.examples] == ["b.png"]
