"""Save LoRA keeps the graph that made the file in its metadata, as ComfyUI keeps it in images: `prompt` as the server
ran it and `workflow` as the front end sent it, absolute paths and embedded files taken out. test_browser.py drops a
trained file on the canvas of each front end and gets the training workflow back."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from lora_core.formats.files import read_safetensors

from .harness import ComfyServer

SOURCE = "lora_lab_graph_source.safetensors"
PICTURES = "/home/someone/pictures"
EMBEDDED = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
# the front end's graph of that prompt, as far as the test needs it: a node holding a path, one holding a picture
UI_WORKFLOW = {"version": 0.4, "links": [], "nodes": [
    {"id": 1, "type": "LoraLab_LoadLoRA", "widgets_values": [SOURCE]},
    {"id": 2, "type": "LoraLab_SaveLoRA", "widgets_values": ["lora_lab_graph", "float32", True]},
    {"id": 8, "type": "CLIPTextEncode", "widgets_values": [f"a photo like those in {PICTURES}/cats"]},
    {"id": 10, "type": "LoadImage", "widgets_values": [EMBEDDED, "image"]}]}


@pytest.fixture(scope="module")
def source(comfy: ComfyServer):
    """A small LoRA file in models/loras for Load LoRA to read; removed with what the tests saved."""
    generator = torch.Generator().manual_seed(0)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8, generator=generator),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4, generator=generator),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}, comfy.loras_dir / SOURCE)
    yield SOURCE
    for created in [comfy.loras_dir / SOURCE, *comfy.loras_dir.glob("lora_lab_graph*_.safetensors")]:
        created.unlink(missing_ok=True)


def save_graph(lora_name: str, prefix: str, **save_inputs) -> dict:
    """Load LoRA → Save LoRA, and a text encoder that nothing runs, its text naming a folder of the user's."""
    return {"1": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": lora_name}},
            "2": {"class_type": "LoraLab_SaveLoRA", "inputs": {"lora": ["1", 0], "filename_prefix": prefix,
                                                               "precision": "float32", **save_inputs}},
            "8": {"class_type": "CLIPTextEncode", "inputs": {"text": f"a photo like those in {PICTURES}/cats",
                                                             "clip": ["9", 1]}},
            "9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "absent.safetensors"}}}


def saved(comfy: ComfyServer, entry: dict) -> tuple[dict, list[str], bytes]:
    """The saved file's metadata, Save LoRA's node text, and the file's bytes."""
    output = entry["outputs"]["2"]
    path = comfy.loras_dir / output["lora_lab_saved"][0]["filename"]
    return read_safetensors(path)[1], output["text"], path.read_bytes()


def test_save_lora_stores_the_prompt_and_the_workflow_without_absolute_paths_or_embedded_files(comfy, source) -> None:
    graph = save_graph(source, "lora_lab_graph")
    metadata, text, data = saved(comfy, comfy.run(graph, extra_pnginfo={"workflow": UI_WORKFLOW}))

    expected_prompt = copy.deepcopy(graph)
    expected_prompt["8"]["inputs"]["text"] = "a photo like those in [absolute path removed]"
    expected_workflow = copy.deepcopy(UI_WORKFLOW)
    expected_workflow["nodes"][2]["widgets_values"] = ["a photo like those in [absolute path removed]"]
    expected_workflow["nodes"][3]["widgets_values"][0] = "[embedded file removed]"
    assert json.loads(metadata["prompt"]) == expected_prompt
    assert json.loads(metadata["workflow"]) == expected_workflow
    assert text[1] == ("stored the workflow (drop the file on the canvas to load it); took out absolute paths from "
                       "node 8 (CLIPTextEncode); took out embedded files from node 10 (LoadImage)")
    for private in (PICTURES, EMBEDDED[30:], str(comfy.comfy_dir), str(comfy.loras_dir)):
        assert private.encode() not in data, private


def test_a_loaded_files_graph_is_replaced_or_left_out_never_passed_on(comfy, source) -> None:
    first = comfy.run(save_graph(source, "lora_lab_graph_first"), extra_pnginfo={"workflow": UI_WORKFLOW})
    first_name = first["outputs"]["2"]["lora_lab_saved"][0]["filename"]
    assert {"prompt", "workflow"} <= read_safetensors(comfy.loras_dir / first_name)[1].keys()

    off = save_graph(first_name, "lora_lab_graph_off", store_workflow=False)
    metadata, text, _ = saved(comfy, comfy.run(off, extra_pnginfo={"workflow": UI_WORKFLOW}))
    assert "prompt" not in metadata and "workflow" not in metadata
    assert text[1] == "stored no workflow: store_workflow is off"

    api_only = save_graph(first_name, "lora_lab_graph_api")  # queued by a script: no UI workflow comes with it
    metadata, text, _ = saved(comfy, comfy.run(api_only))
    assert "workflow" not in metadata, "the loaded file's workflow is not this file's"
    assert json.loads(metadata["prompt"])["1"]["inputs"]["lora_name"] == first_name
    assert text[1] == ("stored the prompt (drop the file on the canvas to load it); the front end sent no UI workflow; "
                       "took out absolute paths from node 8 (CLIPTextEncode)")
