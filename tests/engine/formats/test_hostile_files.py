"""Hostile inputs: malformed or malicious LoRA files, training states and images give clear errors and nothing else."""
from __future__ import annotations

import json
import pickle
import resource
import struct
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_core import DatasetConfig, ImageFolderDataset, LoRAFileError, LoRANetwork, NetworkError, load_file, save_lora
from lora_core.adapters import AdapterError
from lora_core.data.config import DatasetError
from lora_core.data.images import DatasetWarning
from lora_core.targets import UNET_PREFIX, kohya_name
from lora_core.training.checkpoints import load_state

LAYERS = {kohya_name(UNET_PREFIX, f"block.{i}.to_q"): torch.nn.Linear(16, 16) for i in range(3)}


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> bytes:
    network = LoRANetwork.create(LAYERS, rank=2)
    path = save_lora(tmp_path_factory.mktemp("valid") / "ok.safetensors", network, {"ss_network_dim": "2"})
    return path.read_bytes()


def load_and_build(path) -> None:
    """What a user does with a file: read it, then build adapters from it."""
    try:
        tensors, _ = load_file(path)
    except LoRAFileError:
        return
    try:
        LoRANetwork.from_tensors(tensors, LAYERS, strict=False)
    except (NetworkError, AdapterError):
        pass


def header_of(data: bytes) -> dict:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length])


def with_header(data: bytes, header: dict) -> bytes:
    old_length = struct.unpack("<Q", data[:8])[0]
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + old_length :]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_files_give_clear_errors_and_bounded_memory(tmp_path, valid_file, data) -> None:
    damage = data.draw(st.sampled_from(["truncate", "flip", "length", "random", "shape", "dtype", "offsets"]))
    blob = bytearray(valid_file)
    header = header_of(valid_file)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    if damage == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif damage == "flip":
        for position in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=20)):
            blob[position] ^= data.draw(st.integers(1, 255))
    elif damage == "length":
        blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    elif damage == "random":
        blob = bytearray(data.draw(st.binary(max_size=4096)))
    elif damage == "shape":
        header[name]["shape"] = data.draw(st.lists(st.integers(0, 2**40), min_size=0, max_size=4))
        blob = bytearray(with_header(valid_file, header))
    elif damage == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["I8", "U8", "BOOL", "F64", "I64", "X99", ""]))
        blob = bytearray(with_header(valid_file, header))
    else:
        header[name]["data_offsets"] = data.draw(st.lists(st.integers(0, 2**62), min_size=2, max_size=2))
        blob = bytearray(with_header(valid_file, header))
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(blob))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_and_build(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no huge allocation


def test_declared_huge_tensor_is_refused_without_allocating(tmp_path, valid_file) -> None:
    header = header_of(valid_file)
    name = next(k for k in header if k != "__metadata__")
    header[name].update(shape=[1 << 20, 1 << 20], data_offsets=[0, 4 << 40])
    path = tmp_path / "huge.safetensors"
    path.write_bytes(with_header(valid_file, header))
    with pytest.raises(LoRAFileError, match="huge.safetensors is not a valid safetensors file"):
        load_file(path)


def test_wrong_dtypes_and_values_name_the_module(tmp_path) -> None:
    name = next(iter(LAYERS))
    tensors = {f"{name}.lora_down.weight": torch.zeros(2, 99, dtype=torch.int8),
               f"{name}.lora_up.weight": torch.zeros(16, 2)}
    with pytest.raises(NetworkError, match=f"{name}.*shape"):
        LoRANetwork.from_tensors(tensors, LAYERS)


class Planted:
    """Unpickling this would create the marker file: proof that a pickle was executed."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.ckpt", "evil.safetensors", "evil.bin"])
def test_a_malicious_pickle_is_never_executed(tmp_path, name) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(LoRAFileError, match="never unpickles"):
        load_file(tmp_path / name)
    assert not marker.exists()


def test_a_broken_training_state_is_a_clear_error(tmp_path, valid_file) -> None:
    from lora_core.formats.files import save_file

    for index, encoded in enumerate(['{"dict": {"step": {"tensor": "missing"}}}', "not json", '{"weird": 1}']):
        path = tmp_path / f"s{index}.state.safetensors"
        save_file(path, {"t": torch.zeros(1)}, {"lora_lab_training_state": encoded})
        with pytest.raises(LoRAFileError, match="not a readable training state"):
            load_state(path)
    (tmp_path / "cut.state.safetensors").write_bytes(valid_file[:50])
    with pytest.raises(LoRAFileError, match="not a readable training state"):
        load_state(tmp_path / "cut.state.safetensors")


def test_decompression_bomb_is_refused_by_size_before_decoding(tmp_path) -> None:
    Image.new("1", (12_000, 12_000)).save(tmp_path / "bomb.png")  # 144 M pixels in a file of a few kB
    Image.new("RGB", (64, 64), "red").save(tmp_path / "fine.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolderDataset(tmp_path, DatasetConfig(resolution=64))
    assert dataset.num_images == 1 and dataset.skipped[0][0].name == "bomb.png"
    assert "exceeds max_image_pixels" in dataset.skipped[0][1]
    assert any(issubclass(w.category, DatasetWarning) and "bomb.png" in str(w.message) for w in caught)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: never decoded
    (tmp_path / "fine.png").unlink()
    with pytest.raises(DatasetError, match="No usable images.*1 skipped"):
        ImageFolderDataset(tmp_path, DatasetConfig(resolution=64))
