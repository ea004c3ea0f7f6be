"""The graph stored in a LoRA file: what is taken out of it, and what the front ends can read back."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from lora_core.formats.files import LoRAWeights
from lora_core.formats.workflow import FILE_REMOVED, FRONT_END_READ_BYTES, PATH_REMOVED, with_graph

REMOVED = [
    ("/home/me/datasets/cats", PATH_REMOVED),
    ("/data", PATH_REMOVED),
    ("C:\\Users\\me\\lora.safetensors", PATH_REMOVED),
    ("D:/models/x", PATH_REMOVED),
    ("\\\\server\\share\\x.png", PATH_REMOVED),
    ("~/pictures", PATH_REMOVED),
    ("file:///tmp/x.png", PATH_REMOVED),
    ("a photo like /home/me/x.png, in the style of ~/art", f"a photo like {PATH_REMOVED}, in the style of {PATH_REMOVED}"),
    ("data:image/png;base64,iVBORw0KGgo=", FILE_REMOVED),
    ("C:\\Users\\John Smith\\Pictures\\in.png", PATH_REMOVED),  # a path with spaces, as a whole value
    ("/Volumes/Macintosh HD/Users/jane/cats", PATH_REMOVED),
    ("FILE:///C:/photos/x.png", PATH_REMOVED),
    ("//nas/photos/jane.png", PATH_REMOVED),
    ("models in `/home/jane/ComfyUI/models`\nand more", f"models in `{PATH_REMOVED}`\nand more"),
    ("<lora:/home/jane/x.safetensors:0.8>, a cat", f"<lora:{PATH_REMOVED}>, a cat"),
    ("see ![](data:image/png;base64,AAAA) here", f"see ![]({FILE_REMOVED}) here"),
]
KEPT = ["loras/sks_dog.safetensors", "sks dog and/or cat, 1/2 scale", "https://example.org/a/b.png", "my_dataset",
        "12/05/2026", "w/ friends", "/", "", "text with a : colon", "1girl, blush, /\\/\\/\\, smile",
        "/imagine a cat", "see https://example.org/a and file.txt"]


def lora() -> LoRAWeights:
    tensors = {"lora_unet_a.lora_down.weight": torch.ones(4, 8), "lora_unet_a.lora_up.weight": torch.ones(8, 4),
               "lora_unet_a.alpha": torch.tensor(2.0)}
    return LoRAWeights(tensors, {"ss_network_dim": "4", "prompt": "{}", "workflow": "{}"})


def stored_text(value: str) -> str:
    weights, _ = with_graph(lora(), {"1": {"class_type": "X", "inputs": {"text": value}}}, None)
    return json.loads(weights.metadata["prompt"])["1"]["inputs"]["text"]


@pytest.mark.parametrize(("value", "stored"), REMOVED)
def test_absolute_paths_and_embedded_files_are_taken_out(value: str, stored: str) -> None:
    assert stored_text(value) == stored


@pytest.mark.parametrize("value", KEPT)
def test_names_text_and_urls_stay(value: str) -> None:
    assert stored_text(value) == value


def front_end_metadata(path: Path) -> dict:
    """What the front ends' getLatentMetadata reads: the header in the file's first 4 MiB, its __metadata__."""
    start = path.read_bytes()[:FRONT_END_READ_BYTES]
    (size,) = struct.unpack("<I", start[:4])
    return json.loads(start[8:8 + size].decode())["__metadata__"]


def test_the_front_ends_read_the_stored_workflow_and_a_workflow_too_big_for_them_is_left_out(tmp_path) -> None:
    workflow = {"nodes": [{"id": 3, "type": "LoraLab_Train", "widgets_values": [100, 1e-4]}], "links": []}
    weights, line = with_graph(lora(), {"3": {"class_type": "LoraLab_Train", "inputs": {}}}, workflow)
    assert line == "stored the workflow (drop the file on the canvas to load it)"
    read = front_end_metadata(weights.save(tmp_path / "small.safetensors"))
    assert json.loads(read["workflow"]) == workflow and read["ss_network_dim"] == "4"

    note = "x" * (FRONT_END_READ_BYTES // 2)  # a Note node's text that fills half of what the front ends read
    huge = {"nodes": [{"id": 1, "type": "Note", "widgets_values": [note]}, {"id": 2, "type": "Note",
                                                                          "widgets_values": [note]}]}
    weights, line = with_graph(lora(), {"3": {"class_type": "LoraLab_Train", "inputs": {}}}, huge)
    assert line == ("stored the prompt (drop the file on the canvas to load it); "
                    "left out the workflow (4.2 MB): the front ends read only a file's first 4 MiB")
    read = front_end_metadata(weights.save(tmp_path / "huge.safetensors"))
    assert "workflow" not in read and json.loads(read["prompt"]) == {"3": {"class_type": "LoraLab_Train", "inputs": {}}}
