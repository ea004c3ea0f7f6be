"""The shipped example workflows, converted from UI format with `/object_info` and run in the real server."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lora_core.demo import make_concept_images

from .harness import TEST_CHECKPOINT, ComfyServer, output_images, ui_to_api

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SHIPPED_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
TRAINED = "lora_lab_00001_.safetensors"
# Only sizes change for this 2-core CPU (1000 steps at 512 px would take hours; 512 px sampling of the shipped
# generate and sweep workflows alone took 9 minutes): wiring, names, prompts, seeds and strengths run as shipped.
SAMPLING_OVERRIDES = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 4}}
TRAINING_OVERRIDES = {
    **SAMPLING_OVERRIDES,
    "LoraLab_LoadDataset": {"resolution": 64},
    "LoraLab_TrainLoRA": {"steps": 12, "lr_warmup_steps": 2, "learning_rate": 1e-3, "sample_every": 6,
                          "sample_steps": 4},
}


@pytest.fixture(scope="module")
def shipped_names(comfy: ComfyServer):
    """The checkpoint and dataset names the workflows use, backed by the test checkpoint and generated images."""
    checkpoints = comfy.comfy_dir / "models" / "checkpoints"
    alias = checkpoints / SHIPPED_CHECKPOINT
    assert not alias.exists() or alias.is_symlink(), f"{alias} is a real file; the test will not replace it"
    alias.unlink(missing_ok=True)
    alias.symlink_to(checkpoints / TEST_CHECKPOINT)
    make_concept_images(comfy.input_dir / "lora_lab_dataset", count=4, resolution=64)
    for stale in comfy.loras_dir.glob("lora_lab_[0-9]*_.safetensors"):
        stale.unlink()
    yield
    alias.unlink()
    for created in comfy.loras_dir.glob("lora_lab_[0-9]*_.safetensors"):
        created.unlink()


def load(name: str, comfy_object_info: dict, overrides: dict | None = None) -> dict:
    graph = ui_to_api(json.loads((WORKFLOWS / name).read_text()), comfy_object_info)
    for node in graph.values():
        node["inputs"].update((overrides or {}).get(node["class_type"], {}))
    return graph


def saved_pixels(comfy: ComfyServer, entry: dict, graph: dict, prefix: str) -> np.ndarray:
    [node_id] = [i for i, n in graph.items() if n["class_type"] == "SaveImage" and n["inputs"]["filename_prefix"] == prefix]
    [image] = output_images(entry, node_id)
    return np.asarray(comfy.fetch_image(image), dtype=np.float32)


def test_train_workflow_writes_a_lora_that_the_other_workflows_use(comfy, comfy_object_info, shipped_names) -> None:
    graph = load("train_lora.json", comfy_object_info, TRAINING_OVERRIDES)
    assert {n["class_type"] for n in graph.values()} >= {
        "CheckpointLoaderSimple", "LoraLab_LoadDataset", "LoraLab_InjectLoRA", "LoraLab_TrainLoRA", "LoraLab_SaveLoRA",
        "KSampler", "SaveImage"}
    entry = comfy.run(graph, timeout=600)
    assert (comfy.loras_dir / TRAINED).is_file()
    assert saved_pixels(comfy, entry, graph, "lora_lab_preview").shape == (64, 64, 3)
    [samples_node] = [i for i, n in graph.items() if n["class_type"] == "PreviewImage"
                      and n["inputs"]["images"][1] == 4 and graph[n["inputs"]["images"][0]]["class_type"] == "LoraLab_TrainLoRA"]
    assert len(output_images(entry, samples_node)) == 2, "samples after steps 6 and 12"

    generated = load("generate_with_lora.json", comfy_object_info, SAMPLING_OVERRIDES)
    entry = comfy.run(generated, timeout=600)
    assert saved_pixels(comfy, entry, generated, "lora_lab").shape == (64, 64, 3)

    sweep = load("strength_sweep.json", comfy_object_info, SAMPLING_OVERRIDES)
    entry = comfy.run(sweep, timeout=900)
    images = {s: saved_pixels(comfy, entry, sweep, f"lora_lab_strength_{s}") for s in ("0", "0.5", "1")}
    change_half = np.abs(images["0.5"] - images["0"]).mean()
    change_full = np.abs(images["1"] - images["0"]).mean()
    assert 0 < change_half < change_full, "the image must move further from the base as the strength rises"
