"""Train LoRA as a native of ComfyUI: the patched model_sampling, refused families, no second copy of the weights,
continuing a text-encoder LoRA, Cancel while the dataset is encoded. On every server the `comfy` fixture runs."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_core.demo.demo import make_concept_images

from .harness import TEST_CHECKPOINT, ComfyServer, prompt_status
from .test_lora_lab_nodes import saved_name, training_graph

PROBE = Path(__file__).with_name("model_machinery_probe.py")
SUPPORTED = "SD1.x and SD2.x"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def probe(comfy: ComfyServer, tmp_path_factory) -> dict:
    """The probe's results, run once per server in that server's ComfyUI checkout (its own process)."""
    checkpoint = comfy.comfy_dir / "models" / "checkpoints" / TEST_CHECKPOINT
    scratch = tmp_path_factory.mktemp("machinery")
    completed = subprocess.run([str(comfy.python), str(PROBE), str(comfy.comfy_dir), str(checkpoint), str(scratch)],
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def result(probe: dict, check: str) -> dict:
    outcome = probe[check]
    assert "error" not in outcome, f"{check}: {outcome['error']}\n{outcome['traceback']}"
    return outcome


@pytest.mark.parametrize(("check", "prediction_type"), [
    ("targets_v_prediction", "v_prediction"), ("targets_v_prediction_zsnr", "v_prediction"), ("targets_eps", "epsilon"),
])
def test_loss_is_the_one_comfys_patched_model_sampling_defines(probe: dict, check: str, prediction_type: str) -> None:
    """ModelSamplingDiscrete (v_prediction, zsnr) applied before training sets the target and the noise levels:
    the trainer's loss per sample equals the one computed by hand from `apply_model` and `model_sampling`."""
    outcome = result(probe, check)
    assert outcome["prediction_type"] == prediction_type
    assert outcome["alpha_bar_last"] == pytest.approx(outcome["comfy_alpha_bar_last"], rel=1e-6)
    if check.endswith("zsnr"):
        assert outcome["alpha_bar_last"] < 1e-7, "zero terminal SNR"
    np.testing.assert_allclose(outcome["trainer_loss"], outcome["hand_loss"], rtol=1e-5)


def test_training_holds_no_second_copy_and_hands_back_the_same_weights(probe: dict) -> None:
    outcome = result(probe, "training_without_copies")
    assert outcome["copied_bytes"] == 0 and outcome["weight_bytes"] > 100e6
    assert outcome["inference_weights_during"] == 0
    assert outcome["adapters"] > 0 and outcome["adapters_without_gradient"] == []
    assert outcome["same_weights_after"]


def test_blocks_to_swap_trains_the_same_lora_through_comfys_partial_loading(probe: dict) -> None:
    """SD1.5 at full size (ComfyUI's classes): blocks_to_swap 4 has ComfyUI's partial loading leave at least the 4 last
    blocks' bytes of weights off the device (cast per layer, the MODEL's weight patches applied per use) during
    training, also after each step's sample (KSampler's load brings them back; the swap is made again); the losses
    and the LoRA are bit for bit those of training without swap. Refused before encoding: without gradient
    checkpointing (autograd would keep every cast copy), and DoRA (it normalizes by the base weight). The March 2024
    ComfyUI has no partial unloading: refused, naming what to do."""
    outcome = result(probe, "block_swap")
    if outcome["refused"] is not None:
        assert "needs ComfyUI's partial loading" in outcome["refused"] and "update it" in outcome["refused"]
        return
    assert outcome["off_device_bytes_0"] == [0, 0]
    assert all(off >= outcome["block_bytes_4"] > 50e6 for off in outcome["off_device_bytes_4"]), outcome
    assert outcome["lowvram_after"]
    assert outcome["same_losses"] and outcome["same_lora"], outcome["losses"]
    assert "needs gradient_checkpointing on" in outcome["refused_without_checkpointing"]
    assert "does not train DoRA" in outcome["refused_dora"]


def test_sdxl_refiner_is_refused_naming_the_family_and_what_is_supported(probe: dict) -> None:
    refused = result(probe, "refuses_sdxl_refiner")["refused"]
    assert refused is not None and "SDXL Refiner" in refused and SUPPORTED in refused


@pytest.mark.parametrize(("channels", "family"), [(9, "inpainting"), (8, "instruct-pix2pix")])
def test_image_conditioned_checkpoints_are_refused_before_any_encoding(comfy: ComfyServer, channels: int,
                                                                       family: str, tmp_path: Path) -> None:
    """An SD1.5 checkpoint whose UNet takes 9 (inpainting) or 8 (instruct-pix2pix) input channels fails in
    Inject LoRA, so Train LoRA never encodes the dataset."""
    checkpoint = load_file(comfy.comfy_dir / "models" / "checkpoints" / TEST_CHECKPOINT)
    conv_in = checkpoint[CONV_IN]
    checkpoint[CONV_IN] = torch.cat([conv_in, torch.zeros(conv_in.shape[0], channels - 4, *conv_in.shape[2:],
                                                           dtype=conv_in.dtype)], dim=1)
    name = f"lora_lab_test_{family}.safetensors"
    path = comfy.comfy_dir / "models" / "checkpoints" / name
    save_file(checkpoint, str(path))
    make_concept_images(comfy.input_dir / "lora_lab_refused", count=2, resolution=64)
    graph = training_graph("lora_lab_refused", steps=1)
    graph["1"]["inputs"]["ckpt_name"] = name
    try:
        status = prompt_status(comfy.wait(comfy.queue_prompt(graph), timeout=300))
    finally:
        path.unlink()
    if channels == 8 and status.node_type == "CheckpointLoaderSimple":  # the 2024 ComfyUI has no instruct-pix2pix
        pytest.skip(f"this ComfyUI reads an 8-channel SD1.5 UNet as another family: {status.message}")
    assert status.state == "error" and status.node_type == "LoraLab_InjectLoRA", status
    assert f"SD1.x {family}" in status.message and SUPPORTED in status.message, status.message


def test_continuing_a_text_encoder_lora_trains_with_train_text_encoder_off(comfy: ComfyServer, new_loras) -> None:
    make_concept_images(comfy.input_dir / "lora_lab_te", count=2, resolution=64)
    first = saved_name(comfy.run(training_graph("lora_lab_te", steps=1, prefix="lora_lab_te_first",
                                                train_text_encoder=True), timeout=300))
    graph = training_graph("lora_lab_te", steps=2, prefix="lora_lab_te_continued", learning_rate=5e-3)
    graph["6"] = {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": first}}
    graph["3"]["inputs"].update(lora=["6", 0], train_text_encoder=False)
    continued = saved_name(comfy.run(graph, timeout=300))
    before, after = load_file(comfy.loras_dir / first), load_file(comfy.loras_dir / continued)
    assert before.keys() == after.keys() and any(key.startswith("lora_te_") for key in after)
    assert any(not torch.equal(before[key], after[key]) for key in before if key.startswith("lora_unet_"))


@pytest.fixture
def new_loras(comfy: ComfyServer):
    before = set(comfy.loras_dir.glob("**/*.safetensors"))
    yield
    for path in set(comfy.loras_dir.glob("**/*.safetensors")) - before:
        path.unlink()


class NodeStartWatcher:
    """Listens on the server's websocket (as the browser does) for ComfyUI's "executing" event of one node."""

    def __init__(self, comfy: ComfyServer, node_id: str) -> None:
        self.url = comfy.url.replace("http", "ws", 1) + f"/ws?clientId={comfy.client_id}"
        self.node_id, self.connected, self.started = node_id, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self.listen(),), daemon=True)
        self.thread.start()
        assert self.connected.wait(30), "the websocket did not connect"

    async def listen(self) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as socket:
            self.connected.set()
            async for message in socket:
                if message.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(message.data)
                    if event["type"] == "executing" and event["data"].get("node") == self.node_id:
                        self.started.set()
                        return


def test_cancel_while_the_dataset_is_encoded_stops_within_an_image(comfy: ComfyServer) -> None:
    """40 images take the VAE seconds on the CPU; Cancel ends the prompt after the image being encoded."""
    make_concept_images(comfy.input_dir / "lora_lab_cancel", count=40, resolution=64)
    graph = training_graph("lora_lab_cancel", steps=1)
    watcher = NodeStartWatcher(comfy, "4")
    prompt_id = comfy.queue_prompt(graph)
    assert watcher.started.wait(300), "Train LoRA did not start"
    time.sleep(0.5)  # it loads the models and starts encoding image after image
    cancelled = time.monotonic()
    status = prompt_status(comfy.cancel(prompt_id))
    assert status.state == "interrupted" and status.node_type == "LoraLab_TrainLoRA", status
    assert time.monotonic() - cancelled < 5.0


def test_train_memory_benchmark_small_variant(comfy: ComfyServer, comfy_object_info: dict) -> None:
    """bench/train_memory.py on this server, tiny: both methods train and report memory; timings not asserted."""
    if "TrainLoraNode" not in comfy_object_info:
        pytest.skip("this ComfyUI has no TrainLoraNode to compare with")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from train_memory import METHODS, compare, measure_method

    results = {method: measure_method(comfy, method, count=2, resolution=64, steps=1) for method in METHODS}
    for outcome in results.values():
        assert outcome["peak_rss_mib"] >= outcome["loaded_rss_mib"] > 0 and outcome["lora_parameters"] > 0
    assert compare(results)["peak_rss_ratio"] > 0
