"""The harness against a real ComfyUI server, with core nodes only: start-up, txt2img, errors, interrupt."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .harness import (TEST_CHECKPOINT, ComfyError, ComfyServer, output_images, prompt_status, txt2img_graph,
                      ui_to_api)

DATA_DIR = Path(__file__).parent / "data"


def test_object_info_lists_core_nodes_and_the_test_checkpoint(comfy_object_info):
    assert {"CheckpointLoaderSimple", "KSampler", "LoraLoader", "SaveImage"} <= comfy_object_info.keys()
    checkpoints = comfy_object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert TEST_CHECKPOINT in checkpoints


def test_txt2img_saves_a_64px_image(comfy: ComfyServer):
    entry = comfy.run(txt2img_graph(seed=1))

    assert prompt_status(entry).ok
    [image] = output_images(entry, "7")
    picture = comfy.fetch_image(image)
    assert picture.size == (64, 64) and picture.mode == "RGB"
    assert (comfy.output_dir / image["subfolder"] / image["filename"]).is_file()


def test_checkpoint_is_loaded_as_sd15_without_missing_weights(comfy: ComfyServer):
    comfy.run(txt2img_graph(seed=1))

    log = comfy.log_text()
    assert "model_type EPS" in log
    assert "no match" not in log and "Missing VAE keys" not in log
    clip_warnings = [line for line in log.splitlines() if line.startswith("clip missing")]
    # real SD1.5 files give this same line: they carry neither weight
    assert set(clip_warnings) <= {"clip missing: ['clip_l.logit_scale', 'clip_l.transformer.text_projection.weight']"}


def test_same_seed_gives_identical_pixels(comfy: ComfyServer):
    # ComfyUI caches unchanged nodes, so a different seed runs in between to make the sampler run again
    first, other, again = (comfy.run(txt2img_graph(seed=seed)) for seed in (7, 8, 7))
    pixels = [comfy.fetch_image(output_images(entry, "7")[0]).tobytes() for entry in (first, other, again)]

    assert pixels[0] == pixels[2]
    assert pixels[0] != pixels[1]


def test_ui_workflow_converts_to_the_api_graph_and_runs(comfy: ComfyServer, comfy_object_info):
    workflow = json.loads((DATA_DIR / "core_txt2img_ui.json").read_text())

    graph = ui_to_api(workflow, comfy_object_info)

    assert graph == {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple on a wooden table", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 156680208700286, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "core_txt2img_ui", "images": ["8", 0]}},
    }
    [image] = output_images(comfy.run(graph), "9")
    assert comfy.fetch_image(image).size == (64, 64)


def test_refused_prompt_raises_with_the_node_errors(comfy: ComfyServer):
    graph = txt2img_graph()
    graph["5"]["inputs"]["sampler_name"] = "no_such_sampler"

    with pytest.raises(ComfyError, match=r"node 5 \(KSampler\): Value not in list: sampler_name: 'no_such_sampler'"):
        comfy.queue_prompt(graph)


def test_node_exception_is_reported_with_its_message(comfy: ComfyServer):
    broken_lora = comfy.loras_dir / "lora_lab_test_broken.safetensors"
    broken_lora.write_bytes(b"not a safetensors file")
    graph = txt2img_graph()
    graph["8"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": broken_lora.name, "strength_model": 1.0,
        "strength_clip": 1.0}}
    graph["5"]["inputs"]["model"] = ["8", 0]
    try:
        status = prompt_status(comfy.wait(comfy.queue_prompt(graph)))
        with pytest.raises(ComfyError, match="LoraLoader"):
            comfy.run(graph)
    finally:
        broken_lora.unlink()

    assert status.state == "error" and not status.ok
    assert (status.node_id, status.node_type) == ("8", "LoraLoader")
    assert "SafetensorError" in status.exception_type and "header" in status.message
    assert "load_lora" in status.traceback


def test_interrupt_ends_a_running_prompt(comfy: ComfyServer):
    comfy.run(txt2img_graph(seed=3, steps=1))  # caches every node before the sampler
    prompt_id = comfy.queue_prompt(txt2img_graph(seed=3, steps=10000))
    comfy.wait_until_running(prompt_id)

    status = prompt_status(comfy.cancel(prompt_id, timeout=60))

    assert status.state == "interrupted"
    assert (status.node_id, status.node_type) == ("5", "KSampler")
    assert prompt_status(comfy.run(txt2img_graph(seed=4))).ok  # the server goes on working
