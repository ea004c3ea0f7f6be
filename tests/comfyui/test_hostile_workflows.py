"""Workflows from strangers against the live server: paths outside ComfyUI's folders are refused and nothing is
read or written there; a long series of train / cancel / generate prompts leaves memory and the base model as they were."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from lora_core import LoRANetwork, save_lora
from lora_core.demo.demo import make_concept_images
from lora_core.targets import UNET_PREFIX, kohya_name

from .harness import ComfyError, ComfyServer, prompt_status
from .test_lora_lab_nodes import pixels, sampling_nodes, training_graph

DATASET = "lora_lab_hostile"


@pytest.fixture(scope="module")
def places(comfy: ComfyServer, tmp_path_factory):
    """A dataset, a LoRA file, and an outside folder that links inside input/ and models/loras point to."""
    make_concept_images(comfy.input_dir / DATASET, count=2, resolution=64)
    outside = tmp_path_factory.mktemp("outside")
    make_concept_images(outside / "secret_images", count=2, resolution=64)
    (comfy.input_dir / "linked_out").symlink_to(outside / "secret_images")
    (comfy.loras_dir / "linked_out").unlink(missing_ok=True)  # left by a run that was killed
    (comfy.loras_dir / "linked_out").symlink_to(outside, target_is_directory=True)
    layers = {kohya_name(UNET_PREFIX, "x.to_q"): __import__("torch").nn.Linear(8, 8)}
    lora = save_lora(comfy.loras_dir / "hostile_source.safetensors", LoRANetwork.create(layers, rank=2), {},
                     overwrite=True)
    yield outside
    (comfy.input_dir / "linked_out").unlink()
    (comfy.loras_dir / "linked_out").unlink()
    lora.unlink()
    for created in comfy.loras_dir.glob("hostile_ok_*.safetensors"):
        created.unlink()


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


DATASET_PATHS = ["../" + DATASET, "/etc", "..\\..\\Windows", "C:\\Users", "a\x00b", "x" * 5000,
                 DATASET + "/../..", "linked_out", "", "."]
PREFIXES = ["../escape", "/tmp/lora_lab_escape", "a\\b", "x\x00y", "C:/x", "y" * 300, "sub/../../x",
            "linked_out/x", "", "./x"]


def test_dataset_paths_outside_input_are_refused(comfy: ComfyServer, places) -> None:
    offered = comfy.object_info()["LoraLab_LoadDataset"]["input"]["required"]["folder"][0]
    assert DATASET in offered and "linked_out" not in offered, "a link leading out of input/ is not even offered"
    for folder in DATASET_PATHS:
        with pytest.raises(ComfyError, match="LoraLab_LoadDataset.*Value not in list"):
            comfy.queue_prompt(training_graph(folder))


def test_save_prefixes_outside_models_loras_are_refused_and_nothing_is_written(comfy: ComfyServer, places) -> None:
    outside_before, loras_before = files_under(places), files_under(comfy.loras_dir)
    for prefix in PREFIXES:
        graph = {"1": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": "hostile_source.safetensors"}},
                 "2": {"class_type": "LoraLab_SaveLoRA", "inputs": {"lora": ["1", 0], "filename_prefix": prefix,
                                                                    "precision": "float16"}}}
        status = prompt_status(comfy.wait(comfy.queue_prompt(graph)))
        assert status.state == "error" and status.node_type == "LoraLab_SaveLoRA", prefix
        assert "filename prefix" in status.message and any(fix in status.message for fix in ("such as", "use "))
    assert files_under(places) == outside_before and files_under(comfy.loras_dir) == loras_before
    assert not Path("/tmp/lora_lab_escape_00001_.safetensors").exists()

    graph = training_graph(DATASET, steps=1, prefix="hostile_ok")
    graph["4"]["inputs"].update(checkpoint_every=1, checkpoint_prefix="../escape_checkpoint")
    status = prompt_status(comfy.wait(comfy.queue_prompt(graph), timeout=300))
    assert status.state == "error" and "checkpoint prefix" in status.message
    assert files_under(places) == outside_before


def server_memory_kib(comfy: ComfyServer) -> int:
    for line in Path(f"/proc/{comfy._process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_twenty_train_cancel_generate_prompts_end_cleanly_and_leave_no_trace(comfy: ComfyServer, places) -> None:
    loader = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "lora_lab_test_sd15.safetensors"}}}
    base_before = pixels(comfy, comfy.run({**loader, **sampling_nodes(80, ["1", 0], ["1", 1], ["1", 2], 11, "b0")}), "85")

    def cycle(index: int) -> str:
        kind = ("train", "cancel", "generate")[index % 3]
        if kind == "train":
            graph = training_graph(DATASET, steps=2, prefix=f"hostile_ok_{index}")
            graph["4"]["inputs"]["seed"] = index
            return prompt_status(comfy.wait(comfy.queue_prompt(graph), timeout=300)).state
        if kind == "cancel":
            graph = training_graph(DATASET, steps=5000, prefix="hostile_never")
            graph["4"]["inputs"]["seed"] = index
            prompt_id = comfy.queue_prompt(graph)
            comfy.wait_until_running(prompt_id)
            time.sleep(1.0)
            return prompt_status(comfy.cancel(prompt_id, timeout=30)).state
        graph = {**loader, "2": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": f"hostile_ok_{index - 2}_00001_.safetensors"}},
                 "3": {"class_type": "LoraLab_ApplyLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["2", 0],
                                                                     "strength_model": 0.8, "strength_clip": 0.8}},
                 **sampling_nodes(90, ["3", 0], ["3", 1], ["1", 2], index, f"g{index}")}
        return prompt_status(comfy.wait(comfy.queue_prompt(graph), timeout=300)).state

    states = [cycle(index) for index in range(3)]  # one of each first: what stays loaded is the baseline
    baseline = server_memory_kib(comfy)
    states += [cycle(index) for index in range(3, 20)]
    after = server_memory_kib(comfy)
    expected = [("success", "interrupted", "success")[index % 3] for index in range(20)]
    assert states == expected
    assert after < baseline * 1.10 + 100_000, f"memory grew from {baseline} KiB to {after} KiB"
    assert not list(comfy.loras_dir.glob("hostile_never*")), "cancelled runs write nothing"
    base_after = pixels(comfy, comfy.run({**loader, **sampling_nodes(95, ["1", 0], ["1", 1], ["1", 2], 11, "b1")}), "100")
    assert np.array_equal(base_after, base_before), "the base model is unchanged after all of it"
    print(f"server memory: {baseline} KiB after the first three prompts, {after} KiB after twenty")
