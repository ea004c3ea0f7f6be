"""Sweep → Train LoRA in a real ComfyUI server: Cancel keeps the variants already finished; what a sweep cannot do is
refused before anything trains. tests/comfyui/test_workflows.py runs the shipped sweep workflow; tests/engine/training/
test_sweep.py shows each variant equal to its run alone."""
from __future__ import annotations

import time

import pytest
from safetensors import safe_open

from . import test_lora_lab_nodes
from .harness import ComfyServer, prompt_status
from .test_lora_lab_nodes import training_graph
from .test_workflows import with_defaults

dataset, new_loras = test_lora_lab_nodes.dataset, test_lora_lab_nodes.new_loras  # its fixtures, for this module
PREFIX = "lora_lab_sweep_cancel"


def sweep_graph(dataset: str, comfy_object_info: dict, sweep: dict, **options) -> dict:
    """training_graph's nodes, with Train LoRA, Training Options (validating every step) and Sweep."""
    graph = training_graph(dataset)
    old = graph["4"]["inputs"]
    graph["4"] = {"class_type": "LoraLab_Train", "inputs": {
        **{name: old[name] for name in ("network", "dataset", "vae", "steps", "learning_rate", "batch_size",
                                        "optimizer", "seed")},
        "sample_every": 0, "sample_prompts": "a photo of sks", "options": ["6", 0], "sweep": ["7", 0]}}
    graph["6"] = {"class_type": "LoraLab_TrainingOptions2", "inputs": with_defaults(
        {"validation_every": 1, "gradient_accumulation": 1, "lr_warmup_steps": 0, "checkpoint_prefix": PREFIX,
         **options}, comfy_object_info["LoraLab_TrainingOptions2"])}
    graph["7"] = {"class_type": "LoraLab_Sweep", "inputs": with_defaults(sweep, comfy_object_info["LoraLab_Sweep"])}
    return graph


@pytest.mark.parametrize("sampling", [False, True], ids=["between steps", "while sampling"])
def test_cancel_keeps_the_finished_variants(comfy: ComfyServer, comfy_object_info, dataset, new_loras,
                                            sampling) -> None:
    """Seen at a step, or raised by ComfyUI's sampler (a sample every step, 30 sampling steps: most of the time)."""
    graph = sweep_graph(dataset, comfy_object_info, {"sweep_steps": "1, 2, 5000"},
                        **({"sample_steps": 30} if sampling else {}))
    graph["4"]["inputs"]["sample_every"] = int(sampling)
    logged_before = len(comfy.log_text())
    prompt_id = comfy.queue_prompt(graph)
    deadline = time.monotonic() + 300
    while "sweep variant 2/3 (steps 2) finished" not in comfy.log_text()[logged_before:]:
        assert time.monotonic() < deadline, comfy.log_text()[-3000:]
        time.sleep(0.5)
    entry = comfy.cancel(prompt_id)
    assert prompt_status(entry).state == "interrupted", prompt_status(entry)
    kept = sorted(path.name for path in new_loras() if path.name.startswith(PREFIX))
    assert kept == [f"{PREFIX}-steps_1_00001_.safetensors", f"{PREFIX}-steps_2_00001_.safetensors"]
    for name, steps in zip(kept, ("1", "2")):
        with safe_open(comfy.loras_dir / name, "pt") as stream:
            assert stream.metadata()["ss_max_train_steps"] == steps
        (comfy.loras_dir / name).unlink()  # the other case saves under the same names
    assert "the sweep stopped; its finished variant steps 2 is saved as" in comfy.log_text()[logged_before:]


@pytest.mark.parametrize(("sweep", "options", "problem"), [
    ({"sweep_learning_rate": "1e-3, 1e-2"}, {"validation_every": 0}, "picks its best variant by the validation loss"),
    ({"sweep_learning_rate": "1e-3, fast"}, {}, "give numbers separated by commas"),
    ({}, {}, "Sweep lists no value"),
])
def test_what_a_sweep_cannot_do_is_refused_before_training(comfy: ComfyServer, comfy_object_info, dataset, sweep,
                                                           options, problem) -> None:
    status = prompt_status(comfy.wait(comfy.queue_prompt(sweep_graph(dataset, comfy_object_info, sweep, **options))))
    assert status.state == "error" and problem in status.message, status
