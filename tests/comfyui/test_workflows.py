"""The shipped example workflows, converted from UI format with `/object_info` and run in the real server."""
from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_core.demo.demo import make_concept_images

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
    "LoraLab_Train": {"steps": 12, "learning_rate": 1e-3, "sample_every": 6},
    "LoraLab_TrainingOptions2": {"lr_warmup_steps": 2, "sample_steps": 4},
    # Train LoRA's layout before Training Options, in workflows saved then (tests/comfyui/data)
    "LoraLab_TrainLoRA": {"steps": 12, "lr_warmup_steps": 2, "learning_rate": 1e-3, "sample_every": 6,
                          "sample_steps": 4},
}
TRAIN_NODES = {"LoraLab_Train", "LoraLab_TrainLoRA"}
DATA = Path(__file__).resolve().parent / "data"


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


def load(name: str, comfy_object_info: dict, overrides: dict | None = None, folder: Path = WORKFLOWS) -> dict:
    graph = ui_to_api(json.loads((folder / name).read_text()), comfy_object_info)
    for node in graph.values():
        node["inputs"].update((overrides or {}).get(node["class_type"], {}))
    return graph


def saved_pixels(comfy: ComfyServer, entry: dict, graph: dict, prefix: str) -> np.ndarray:
    [node_id] = [i for i, n in graph.items() if n["class_type"] == "SaveImage" and n["inputs"]["filename_prefix"] == prefix]
    [image] = output_images(entry, node_id)
    return np.asarray(comfy.fetch_image(image), dtype=np.float32)


def samples_preview(graph: dict) -> str:
    """The PreviewImage that shows Train LoRA's samples output."""
    [node_id] = [i for i, n in graph.items() if n["class_type"] == "PreviewImage" and n["inputs"]["images"][1] == 4
                 and graph[n["inputs"]["images"][0]]["class_type"] in TRAIN_NODES]
    return node_id


def test_train_workflow_writes_a_lora_that_the_other_workflows_use(comfy, comfy_object_info, shipped_names) -> None:
    graph = load("train_lora.json", comfy_object_info, TRAINING_OVERRIDES)
    assert {n["class_type"] for n in graph.values()} >= {
        "CheckpointLoaderSimple", "LoraLab_LoadDataset", "LoraLab_InjectLoRA", "LoraLab_Train",
        "LoraLab_TrainingOptions2", "LoraLab_SaveLoRA", "KSampler", "SaveImage"}
    entry = comfy.run(graph, timeout=600)
    assert (comfy.loras_dir / TRAINED).is_file()
    assert saved_pixels(comfy, entry, graph, "lora_lab_preview").shape == (64, 64, 3)
    assert len(output_images(entry, samples_preview(graph))) == 2, "samples after steps 6 and 12"

    generated = load("generate_with_lora.json", comfy_object_info, SAMPLING_OVERRIDES)
    entry = comfy.run(generated, timeout=600)
    assert saved_pixels(comfy, entry, generated, "lora_lab").shape == (64, 64, 3)

    sweep = load("strength_sweep.json", comfy_object_info, SAMPLING_OVERRIDES)
    entry = comfy.run(sweep, timeout=900)
    images = {s: saved_pixels(comfy, entry, sweep, f"lora_lab_strength_{s}") for s in ("0", "0.5", "1")}
    change_half = np.abs(images["0.5"] - images["0"]).mean()
    change_full = np.abs(images["1"] - images["0"]).mean()
    assert 0 < change_half < change_full, "the image must move further from the base as the strength rises"


def test_a_workflow_saved_before_training_options_loads_and_trains_the_same_lora(comfy, comfy_object_info,
                                                                                 shipped_names) -> None:
    """UI workflows keep widget values by position: the old layout stays as LoraLab_TrainLoRA, and the shipped
    workflow's settings there (accumulation 4, cosine, min-SNR 5, text-encoder lr -1, ...) train what the new
    layout with the same settings in Training Options trains."""
    old = load("train_lora_before_options.json", comfy_object_info, TRAINING_OVERRIDES, folder=DATA)
    assert {n["class_type"] for n in old.values()} & TRAIN_NODES == {"LoraLab_TrainLoRA"}
    new = load("train_lora.json", comfy_object_info, TRAINING_OVERRIDES)
    files = []
    for graph in (old, new):
        entry = comfy.run(graph, timeout=600)
        assert len(output_images(entry, samples_preview(graph))) == 2
        [saved] = [output["lora_lab_saved"][0]["filename"] for output in entry["outputs"].values() if "lora_lab_saved" in output]
        files.append(load_file(comfy.loras_dir / saved))
    assert files[0].keys() == files[1].keys()
    assert all(np.array_equal(files[0][key].numpy(), files[1][key].numpy()) for key in files[0])


# 3 learning rates × 4 steps, evaluated at steps 2 and 4, sampled at step 4
SWEEP_OVERRIDES = {**TRAINING_OVERRIDES, "LoraLab_Train": {"steps": 4, "sample_every": 4},
                   "LoraLab_TrainingOptions2": {"lr_warmup_steps": 0, "sample_steps": 4, "validation_every": 2}}


def test_the_sweep_workflow_trains_a_variant_per_learning_rate_and_outputs_the_best(comfy, comfy_object_info,
                                                                                   shipped_names) -> None:
    graph = load("sweep_learning_rate.json", comfy_object_info, SWEEP_OVERRIDES)
    [train_id] = [i for i, node in graph.items() if node["class_type"] == "LoraLab_Train"]
    saves = {node["inputs"]["lora"][1]: i for i, node in graph.items() if node["class_type"] == "LoraLab_SaveLoRA"}
    entry = comfy.run(graph, timeout=900)
    summary = entry["outputs"][train_id]["lora_lab_training"][0]
    rates = ["0.0001", "0.0003", "0.001"]
    assert [variant["variant"] for variant in summary["sweep"]] == [f"learning_rate {rate}" for rate in rates]
    best = min(range(3), key=lambda index: summary["sweep"][index]["validation_loss"])
    assert [variant["best"] for variant in summary["sweep"]] == [index == best for index in range(3)]

    every = [saved["filename"] for saved in entry["outputs"][saves[5]]["lora_lab_saved"]]  # the `loras` list output
    assert len(every) == 3
    files = [load_file(comfy.loras_dir / name) for name in every]
    assert all(float(safe_open(comfy.loras_dir / name, "pt").metadata()["ss_learning_rate"]) == float(rate)
               for name, rate in zip(every, rates))
    [best_name] = [saved["filename"] for saved in entry["outputs"][saves[0]]["lora_lab_saved"]]
    best_file = load_file(comfy.loras_dir / best_name)
    assert all(torch.equal(best_file[key], files[best][key]) for key in best_file)
    assert not all(torch.equal(files[0][key], files[2][key]) for key in files[0]), "the variants differ"
    assert len(output_images(entry, samples_preview(graph))) == 3, "one sample per variant, at its step 4"
    [curve] = [i for i, node in graph.items() if node["class_type"] == "PreviewImage"
               and node["inputs"]["images"] == [train_id, 3]]
    assert len(output_images(entry, curve)) == 1, "one chart of every variant's validation loss"


def with_defaults(inputs: dict, node_info: dict) -> dict:
    """A node's API inputs with the widgets the workflow left out at their defaults, as the server fills them."""
    specs = {**node_info["input"]["required"], **node_info["input"].get("optional", {})}
    return {**{name: spec[1]["default"] for name, spec in specs.items() if len(spec) > 1 and "default" in spec[1]},
            **inputs}


# The SD3/Flux settings of the Flux workflow saved before Flow Matching Options, as its Training Options held them
# (tests/comfyui/data: the shipped workflow then, these settings changed from their defaults)
SAVED_FLOW_MATCHING = {"timestep_sampling": "uniform", "flow_shift": 3.1, "logit_mean": 0.2, "logit_std": 1.3,
                       "loss_weighting": "cosmap", "flux_guidance": 2.5}
# Flow Matching Options' settings added after that layout, which the old node never had: Train LoRA uses their defaults
NEWER_THAN_THE_OLD_LAYOUT = ("edit_prompt", "min_sigma", "max_sigma")
OPTIONS_NEWER_THAN_THE_OLD_LAYOUT = ("blocks_to_swap", "cpu_offload_checkpointing", "ema_decay", "ema_start_step")  # Training Options' likewise


def test_a_workflow_saved_before_flow_matching_options_keeps_every_setting(comfy_object_info) -> None:
    """Training Options with the SD3/Flux settings on the node stays loadable as LoraLab_TrainingOptions: its widget
    values by position reach the same settings, and the others equal those of Training Options in today's Flux
    workflow, whose Flow Matching Options holds the defaults; nothing else in the workflow differs."""
    if "FluxGuidance" not in comfy_object_info:
        pytest.skip("this ComfyUI predates Flux")
    old = load("train_lora_flux_before_flow_matching_options.json", comfy_object_info, folder=DATA)
    new = load("train_lora_flux.json", comfy_object_info)
    by_type = {graph_name: {node["class_type"]: (node_id, node["inputs"]) for node_id, node in graph.items()}
               for graph_name, graph in (("old", old), ("new", new))}
    old_id, old_options = by_type["old"].pop("LoraLab_TrainingOptions")
    new_id, options = by_type["new"].pop("LoraLab_TrainingOptions2")
    flow_id, flow_matching = by_type["new"].pop("LoraLab_FlowMatchingOptions")
    assert options.pop("flow_matching") == [flow_id, 0] and old_id == new_id
    old_options = with_defaults(old_options, comfy_object_info["LoraLab_TrainingOptions"])
    flow_defaults = with_defaults({}, comfy_object_info["LoraLab_FlowMatchingOptions"])
    assert {name: old_options.pop(name) for name in SAVED_FLOW_MATCHING} == SAVED_FLOW_MATCHING
    assert with_defaults(flow_matching, comfy_object_info["LoraLab_FlowMatchingOptions"]) == flow_defaults
    current = with_defaults(options, comfy_object_info["LoraLab_TrainingOptions2"])
    assert old_options == {**{name: value for name, value in current.items()
                              if name not in OPTIONS_NEWER_THAN_THE_OLD_LAYOUT},
                           **{name: value for name, value in flow_defaults.items()
                              if name not in (*SAVED_FLOW_MATCHING, *NEWER_THAN_THE_OLD_LAYOUT)}}
    save_id, save = by_type["new"]["LoraLab_SaveLoRA"]  # its check's MODEL and CLIP came later: as the loader's
    assert (save.pop("model"), save.pop("clip")) == ([by_type["new"]["UNETLoader"][0], 0],
                                                     [by_type["new"]["DualCLIPLoader"][0], 0])
    assert save.pop("store_workflow") is True  # added later still: the old node's file stores it too (its default)
    assert by_type["old"] == by_type["new"]


# The family workflows name base models that cannot exist here (full-size SDXL, Flux.1, Qwen-Image and Chroma); tests/comfyui/
# test_families.py trains tiny models of those families through the same nodes.
FAMILY_WORKFLOWS = {"train_lora_sdxl.json": {"ckpt_name", "folder"},
                    "train_lora_flux.json": {"unet_name", "clip_name1", "clip_name2", "vae_name", "folder"},
                    "train_lora_qwen_image.json": {"unet_name", "clip_name", "vae_name", "folder"},
                    "train_lora_chroma.json": {"unet_name", "clip_name", "vae_name", "folder"},
                    "train_lora_lumina2.json": {"unet_name", "clip_name", "vae_name", "folder"},
                    # QuadrupleCLIPLoader's combos are ComfyUI's newer schema, which 0.3.64 does not check against
                    # its file list before running: its four missing encoders pass validation
                    "train_lora_hidream.json": {"unet_name", "vae_name", "folder"},
                    # and the reference image to edit, which LoadImage refuses by its own check
                    "train_lora_flux_kontext.json": {"unet_name", "clip_name1", "clip_name2", "vae_name", "folder",
                                                     "image"},
                    "train_lora_qwen_image_edit.json": {"unet_name", "clip_name", "vae_name", "folder", "image"},
                    "train_lora_wan.json": {"unet_name", "clip_name", "vae_name", "folder"},
                    "train_lora_wan22_a14b.json": {"unet_name", "clip_name", "vae_name", "folder"},
                    "train_lora_hunyuan_video.json": {"unet_name", "clip_name1", "clip_name2", "vae_name", "folder"}}
REFUSED_AS_MISSING = ("value_not_in_list", "custom_validation_failed")
FAMILY_CLIP_TYPES = {"flux": ("DualCLIPLoader", "flux"), "qwen_image": ("CLIPLoader", "qwen_image"),
                     "chroma": ("CLIPLoader", "chroma"), "lumina2": ("CLIPLoader", "lumina2"),
                     "hidream": ("QuadrupleCLIPLoader", None),  # a loader of its own: no type to choose
                     "wan": ("CLIPLoader", "wan"), "hunyuan_video": ("DualCLIPLoader", "hunyuan_video")}


@pytest.mark.parametrize("name", sorted(FAMILY_WORKFLOWS))
def test_family_workflows_are_valid_on_the_server_but_for_the_base_model_files(comfy, comfy_object_info,
                                                                                name) -> None:
    """ComfyUI's own validation of the shipped SDXL/Flux/Qwen-Image/Chroma/Lumina 2/HiDream workflows refuses only the
    model file names this test server lacks (and the dataset folder): every node, link and other widget value is one
    the server accepts."""
    for family, (loader, clip_type) in FAMILY_CLIP_TYPES.items():
        types = comfy_object_info.get(loader, {}).get("input", {}).get("required", {}).get("type", [[]])[0]
        if f"_{family}" in name and (loader not in comfy_object_info or clip_type not in (*types, None)):
            pytest.skip(f"this ComfyUI predates {family}")
    graph = load(name, comfy_object_info, {"LoraLab_LoadDataset": {"folder": "lora_lab_no_such_dataset"}})
    assert "LoraLab_Train" in {node["class_type"] for node in graph.values()}
    with pytest.raises(urllib.error.HTTPError) as refused:
        comfy._request("POST", "/prompt", {"prompt": graph, "client_id": comfy.client_id})
    errors = json.loads(refused.value.read().decode())["node_errors"]
    refused_inputs = {error["extra_info"]["input_name"] for node in errors.values() for error in node["errors"]
                      if error["type"] in REFUSED_AS_MISSING}
    others = [error for node in errors.values() for error in node["errors"] if error["type"] not in REFUSED_AS_MISSING]
    assert refused_inputs == FAMILY_WORKFLOWS[name] and not others, errors


def test_the_wan22_pair_trains_each_expert_on_its_side_of_the_boundary(comfy_object_info) -> None:
    """train_lora_wan22_a14b.json: the high-noise expert's file trains with min_sigma 0.875, the low-noise one's with
    max_sigma 0.875, each into its own LoRA file, from one dataset (as the UI workflow's widget values reach the
    server)."""
    if "ModelSamplingSD3" not in comfy_object_info:
        pytest.skip("this ComfyUI predates Wan")
    graph = load("train_lora_wan22_a14b.json", comfy_object_info)

    def upstream(node_id: str, input_name: str) -> dict:
        return graph[graph[node_id]["inputs"][input_name][0]]

    experts = {}
    for node_id, node in graph.items():
        if node["class_type"] == "LoraLab_Train":
            model = upstream(node["inputs"]["network"][0], "model")
            unet = graph[model["inputs"]["model"][0]]["inputs"]["unet_name"]
            flow = upstream(node["inputs"]["options"][0], "flow_matching")["inputs"]
            saved = [other["inputs"]["filename_prefix"] for other in graph.values()
                     if other["class_type"] == "LoraLab_SaveLoRA" and other["inputs"]["lora"][0] == node_id]
            experts[unet] = (flow["min_sigma"], flow["max_sigma"], node["inputs"]["dataset"][0], saved)
    high, low = (experts[name] for name in sorted(experts))  # "high_noise" sorts before "low_noise"
    assert [name.split("_")[2] for name in sorted(experts)] == ["high", "low"]
    assert high[:2] == (0.875, 1.0) and low[:2] == (0.0, 0.875) and high[2] == low[2]
    assert high[3] != low[3] and len(high[3]) == len(low[3]) == 1
