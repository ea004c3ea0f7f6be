"""LoRA Lab's nodes in a real ComfyUI server: listing, training, saving, applying, isolation, cancel, errors."""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from lora_core.demo.demo import make_concept_images

from .harness import TEST_CHECKPOINT, ComfyError, ComfyServer, output_images, prompt_status

NODES = ["LoraLab_LoadDataset", "LoraLab_InjectLoRA", "LoraLab_Train", "LoraLab_TrainingOptions2", "LoraLab_FlowMatchingOptions",
         "LoraLab_TrainingOptions", "LoraLab_TrainLoRA", "LoraLab_Sweep",
         "LoraLab_SaveLoRA", "LoraLab_LoadLoRA", "LoraLab_ApplyLoRA", "LoraLab_CheckLoRA"]
DATASET = "lora_lab_concept"


@pytest.fixture(scope="module")
def dataset(comfy: ComfyServer) -> str:
    make_concept_images(comfy.input_dir / DATASET, count=4, resolution=64)
    return DATASET


@pytest.fixture(scope="module")
def new_loras(comfy: ComfyServer):
    """Names of the LoRA files this module's prompts wrote; they are deleted afterwards."""
    before = set(comfy.loras_dir.glob("**/*.safetensors"))
    created: list[Path] = []

    def collect() -> list[Path]:
        created[:] = sorted(set(comfy.loras_dir.glob("**/*.safetensors")) - before)
        return created

    yield collect
    for path in collect():
        path.unlink()


def training_graph(dataset: str, steps: int = 4, prefix: str = "lora_lab_test", algorithm: str = "lora",
                   learning_rate: float = 1e-3, target: str = "attention", train_text_encoder: bool = False) -> dict:
    """Checkpoint → Load Dataset → Inject → Train → Save, node ids "1" to "5"."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "LoraLab_LoadDataset", "inputs": {
            "folder": dataset, "resolution": 64, "caption_extension": ".txt", "default_caption": "a photo of {token}",
            "token": "sks", "repeats": 1, "flip": False}},
        "3": {"class_type": "LoraLab_InjectLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "algorithm": algorithm, "rank": 8, "alpha": 8.0, "target": target,
            "train_text_encoder": train_text_encoder}},
        "4": {"class_type": "LoraLab_TrainLoRA", "inputs": {
            "network": ["3", 0], "dataset": ["2", 0], "vae": ["1", 2], "steps": steps, "learning_rate": learning_rate,
            "batch_size": 2, "gradient_accumulation": 1, "optimizer": "AdamW", "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "min_snr_gamma": 0.0, "noise_offset": 0.0, "seed": 3, "early_stopping_patience": 0}},
        "5": {"class_type": "LoraLab_SaveLoRA", "inputs": {"lora": ["4", 0], "filename_prefix": prefix,
                                                            "precision": "float32"}},
    }


def sampling_nodes(first_id: int, model: list, clip: list, vae: list, seed: int, prefix: str,
                   save: str = "SaveImage") -> dict:
    """Prompt → KSampler (64 px, 4 steps) → save an image (or with save="SaveLatent", the latent)."""
    i = first_id
    nodes = {
        str(i): {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a photo of sks"}},
        str(i + 1): {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        str(i + 2): {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        str(i + 3): {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [str(i), 0], "negative": [str(i + 1), 0], "latent_image": [str(i + 2), 0],
            "seed": seed, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    }
    if save == "SaveLatent":
        nodes[str(i + 4)] = {"class_type": "SaveLatent", "inputs": {"samples": [str(i + 3), 0], "filename_prefix": prefix}}
    else:
        nodes[str(i + 4)] = {"class_type": "VAEDecode", "inputs": {"samples": [str(i + 3), 0], "vae": vae}}
        nodes[str(i + 5)] = {"class_type": "SaveImage", "inputs": {"images": [str(i + 4), 0], "filename_prefix": prefix}}
    return nodes


def pixels(comfy: ComfyServer, entry: dict, node_id: str) -> np.ndarray:
    """The saved image's pixels (its PNG bytes also hold the prompt, which differs between graphs)."""
    [image] = output_images(entry, node_id)
    return np.asarray(comfy.fetch_image(image))


def saved_name(entry: dict, node_id: str = "5") -> str:
    return entry["outputs"][node_id]["lora_lab_saved"][0]["filename"]


def test_the_nodes_are_listed_with_tooltips_and_the_extension_is_served(comfy: ComfyServer, comfy_object_info) -> None:
    for name in NODES:
        info = comfy_object_info[name]
        assert info["category"] == "LoRA Lab" and info["description"]
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert inputs and all(options.get("tooltip") for _, options in inputs.values()), name
    assert "/extensions/comfyui-lora-lab/lora_lab.js" in comfy.extensions()


def test_trained_lora_is_read_by_comfys_own_loraloader_like_apply_lora(comfy: ComfyServer, dataset, new_loras) -> None:
    entry = comfy.run(training_graph(dataset, prefix="lora_lab_loader"), timeout=300)
    name = saved_name(entry)
    assert re.fullmatch(r"lora_lab_loader_\d{5}_\.safetensors", name)
    tensors = load_file(comfy.loras_dir / name)
    modules = {key.partition(".")[0] for key in tensors}
    assert all(re.fullmatch(r"lora_unet_(down|mid|up)_blocks?_.*_attn[12]_to_(q|k|v|out_0)", m) for m in modules)
    assert len(tensors) == 3 * len(modules) and len(modules) % 8 == 0  # down, up, alpha; q/k/v/out × attn1/attn2

    log_before = len(comfy.log_text())
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                     "strength_model": 0.8, "strength_clip": 0.8}},
        "3": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": name}},
        "4": {"class_type": "LoraLab_ApplyLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["3", 0],
                                                            "strength_model": 0.8, "strength_clip": 0.8}},
        **sampling_nodes(10, ["2", 0], ["2", 1], ["1", 2], seed=5, prefix="loraloader"),
        **sampling_nodes(20, ["4", 0], ["4", 1], ["1", 2], seed=5, prefix="applylora"),
        **sampling_nodes(30, ["1", 0], ["1", 1], ["1", 2], seed=5, prefix="base"),
    }
    entry = comfy.run(graph)
    assert "lora key not loaded" not in comfy.log_text()[log_before:]
    assert np.array_equal(pixels(comfy, entry, "15"), pixels(comfy, entry, "25"))
    assert not np.array_equal(pixels(comfy, entry, "15"), pixels(comfy, entry, "35")), "the LoRA must change the image"


def test_strength_zero_is_the_base_and_the_shared_model_stays_unchanged(comfy: ComfyServer, dataset, new_loras) -> None:
    loader = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}}}
    before = comfy.run({**loader, **sampling_nodes(40, ["1", 0], ["1", 1], ["1", 2], seed=9, prefix="before")})

    # node "1" is cached, so the same MODEL object trains, gets a LoRA applied, and then samples again
    graph = training_graph(dataset, steps=3, prefix="lora_lab_isolation")
    for strength, first in ((0.0, 50), (1.0, 60)):
        graph[str(first)] = {"class_type": "LoraLab_ApplyLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora": ["4", 0], "strength_model": strength, "strength_clip": strength}}
        graph.update(sampling_nodes(first + 1, [str(first), 0], [str(first), 1], ["1", 2], seed=9, prefix=f"s{strength:g}"))
    graph.update(sampling_nodes(70, ["1", 0], ["1", 1], ["1", 2], seed=9, prefix="after"))
    graph["80"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 4]}}  # samples, with sampling off
    after = comfy.run(graph, timeout=300)
    [no_samples] = output_images(after, "80")
    no_samples = np.asarray(comfy.fetch_image(no_samples))
    assert no_samples.shape == (32, 64, 3) and no_samples.max() > 150, "sampling off shows a note, not a black square"

    base = pixels(comfy, before, "45")
    assert np.array_equal(pixels(comfy, after, "56"), base), "strength 0 must give the base image, pixel for pixel"
    assert np.array_equal(pixels(comfy, after, "75"), base), "the base MODEL must be unchanged after training and applying"
    assert not np.array_equal(pixels(comfy, after, "66"), base), "strength 1 must differ"


def test_training_in_comfy_learns_the_concept(comfy: ComfyServer, dataset, new_loras) -> None:
    graph = training_graph(dataset, steps=60, prefix="lora_lab_learns", target="transformer")
    graph["6"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 1], "vae": ["1", 2]}}
    graph["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "train"}}
    for strength, first in ((0.0, 10), (1.0, 20)):
        graph[str(first)] = {"class_type": "LoraLab_ApplyLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora": ["4", 0], "strength_model": strength, "strength_clip": strength}}
        for seed in range(3):
            graph.update(sampling_nodes(first * 10 + seed * 5, [str(first), 0], [str(first), 1], ["1", 2], seed=seed,
                                        prefix=f"learn_{strength:g}_{seed}", save="SaveLatent"))
    entry = comfy.run(graph, timeout=600)

    losses = entry["outputs"]["4"]["lora_lab_training"][0]["losses"]
    assert len(losses) == 60 and np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15]), losses

    def latents(node_id: str):
        [latent] = entry["outputs"][node_id]["latents"]
        return load_file(comfy.output_dir / latent["subfolder"] / latent["filename"])["latent_tensor"]

    training = latents("7")

    def distance(strength_first: int) -> float:
        samples = [latents(str(strength_first * 10 + seed * 5 + 4))[0] for seed in range(3)]
        return float(np.mean([((training - s[None]) ** 2).mean(dim=(1, 2, 3)).sqrt().min() for s in samples]))

    assert distance(20) < 0.9 * distance(10), "samples at strength 1 must move toward the training latents"


def test_cancel_ends_training_quickly_without_a_file_and_the_next_prompt_works(comfy: ComfyServer, dataset,
                                                                                new_loras) -> None:
    files_before = set(new_loras())
    prompt_id = comfy.queue_prompt(training_graph(dataset, steps=5000, prefix="lora_lab_cancelled"))
    comfy.wait_until_running(prompt_id)
    time.sleep(3)  # well inside the training loop
    started = time.monotonic()
    entry = comfy.cancel(prompt_id, timeout=30)
    assert time.monotonic() - started < 5
    status = prompt_status(entry)
    assert status.state == "interrupted" and status.node_type == "LoraLab_TrainLoRA"
    assert set(new_loras()) == files_before, "a cancelled run writes no file"
    assert not list(comfy.loras_dir.glob(".*.tmp")), "no temporary file is left behind"
    assert prompt_status(comfy.run(training_graph(dataset, steps=1, prefix="lora_lab_after_cancel"))).ok


def test_bad_inputs_are_clear_node_errors_and_the_server_stays_up(comfy: ComfyServer, dataset, new_loras) -> None:
    for folder in ("../" + DATASET, "/etc", DATASET + "/../../.."):
        with pytest.raises(ComfyError, match="LoraLab_LoadDataset.*Value not in list"):
            comfy.queue_prompt(training_graph(folder))
    with pytest.raises(ComfyError, match="LoraLab_LoadLoRA.*Value not in list"):
        comfy.queue_prompt({"1": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": "missing.safetensors"}},
                            "2": {"class_type": "LoraLab_SaveLoRA", "inputs": {
                                "lora": ["1", 0], "filename_prefix": "x", "precision": "float16"}}})

    broken = comfy.input_dir / "lora_lab_broken"
    broken.mkdir(exist_ok=True)
    (broken / "noise.png").write_bytes(b"not an image at all")
    entry = comfy.wait(comfy.queue_prompt(training_graph("lora_lab_broken")))
    status = prompt_status(entry)
    assert status.state == "error" and status.node_type == "LoraLab_LoadDataset"
    assert "No usable images" in status.message and "lora_lab_broken" in status.message

    for prefix in ("../escape", "/tmp/escape", "a\\b"):
        graph = training_graph(dataset, steps=1, prefix=prefix)
        status = prompt_status(comfy.wait(comfy.queue_prompt(graph), timeout=120))
        assert status.state == "error" and status.node_type == "LoraLab_SaveLoRA" and "filename prefix" in status.message
    assert comfy.object_info()["LoraLab_TrainLoRA"]


def test_extra_dataset_roots_are_offered_and_other_folders_are_not(comfy: ComfyServer) -> None:
    make_concept_images(comfy.datasets_dir / "from_extra_root", count=2, resolution=64)
    make_concept_images(comfy.run_dir / "elsewhere" / "not_offered", count=2, resolution=64)
    offered = comfy.object_info()["LoraLab_LoadDataset"]["input"]["required"]["folder"][0]
    assert "from_extra_root" in offered and "not_offered" not in offered
    graph = {"1": {"class_type": "LoraLab_LoadDataset", "inputs": {
        "folder": "from_extra_root", "resolution": 64, "caption_extension": ".txt", "default_caption": "a {token}",
        "token": "sks", "repeats": 3, "flip": True}}, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}
    entry = comfy.run(graph)
    assert entry["outputs"]["1"]["lora_lab_dataset"] == [
        {"images": 2, "captioned": 1, "defaulted": 1, "regularization": 0, "examples": 6, "skipped": 0,
         "references": 0, "clips": 0}]


def test_inject_continues_training_from_a_loaded_lora(comfy: ComfyServer, dataset, new_loras) -> None:
    first = saved_name(comfy.run(training_graph(dataset, steps=2, prefix="lora_lab_first"), timeout=300))
    graph = training_graph(dataset, steps=2, prefix="lora_lab_continued", learning_rate=5e-3)
    graph["6"] = {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": first}}
    graph["3"]["inputs"].update(lora=["6", 0], target="full", rank=2)  # layout and rank come from the file
    continued = saved_name(comfy.run(graph, timeout=300))
    before, after = load_file(comfy.loras_dir / first), load_file(comfy.loras_dir / continued)
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(not np.allclose(before[k].numpy(), after[k].numpy()) for k in before if k.endswith("lora_up.weight"))


def test_text_encoder_lora_matches_comfys_loraloader_at_clip_strength(comfy: ComfyServer, dataset, new_loras) -> None:
    graph = training_graph(dataset, steps=3, prefix="lora_lab_text", train_text_encoder=True, learning_rate=1e-2)
    name = saved_name(comfy.run(graph, timeout=300))
    assert any(key.startswith("lora_te_") for key in load_file(comfy.loras_dir / name))
    log_before = len(comfy.log_text())
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                     "strength_model": 0.0, "strength_clip": 1.0}},
        "3": {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": name}},
        "4": {"class_type": "LoraLab_ApplyLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["3", 0],
                                                            "strength_model": 0.0, "strength_clip": 1.0}},
        **sampling_nodes(10, ["2", 0], ["2", 1], ["1", 2], seed=2, prefix="te_loader"),
        **sampling_nodes(20, ["4", 0], ["4", 1], ["1", 2], seed=2, prefix="te_apply"),
        **sampling_nodes(30, ["1", 0], ["1", 1], ["1", 2], seed=2, prefix="te_base"),
    }
    entry = comfy.run(graph)
    assert "lora key not loaded" not in comfy.log_text()[log_before:]
    assert np.array_equal(pixels(comfy, entry, "15"), pixels(comfy, entry, "25"))
    assert not np.array_equal(pixels(comfy, entry, "25"), pixels(comfy, entry, "35")), "the text encoder changed"


    # continuing it: train_text_encoder off keeps its text-encoder layers applied as they are, on trains them
    trained = load_file(comfy.loras_dir / name)
    for train_text_encoder in (False, True):
        graph = training_graph(dataset, steps=2, prefix=f"lora_lab_text_more_{train_text_encoder}",
                               train_text_encoder=train_text_encoder, learning_rate=1e-2)
        graph["6"] = {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": name}}
        graph["3"]["inputs"]["lora"] = ["6", 0]
        continued = load_file(comfy.loras_dir / saved_name(comfy.run(graph, timeout=300)))
        changed = {key.split(".")[0].startswith("lora_te_") for key in trained
                   if key.endswith("lora_up.weight") and not np.array_equal(trained[key].numpy(), continued[key].numpy())}
        assert changed == ({False, True} if train_text_encoder else {False}), train_text_encoder


def test_checkpoints_resume_and_memory_options_through_the_node(comfy: ComfyServer, dataset, new_loras) -> None:
    graph = training_graph(dataset, steps=4, prefix="lora_lab_whole")
    whole = load_file(comfy.loras_dir / saved_name(comfy.run(graph, timeout=300)))

    graph = training_graph(dataset, steps=2, prefix="lora_lab_part")  # a run that stops at step 2
    graph["4"]["inputs"].update(checkpoint_every=2, checkpoint_prefix="lora_lab_ckpt", keep_checkpoints=1)
    comfy.run(graph, timeout=300)
    states = comfy.object_info()["LoraLab_TrainLoRA"]["input"]["optional"]["resume_state"][0]
    assert "lora_lab_ckpt-step00000002.state.safetensors" in states
    loras = comfy.object_info()["LoraLab_LoadLoRA"]["input"]["required"]["lora_name"][0]
    assert "lora_lab_ckpt-step00000002.safetensors" in loras and not any(n.endswith(".state.safetensors") for n in loras)

    graph = training_graph(dataset, steps=4, prefix="lora_lab_resumed")
    graph["4"]["inputs"].update(checkpoint_every=2, checkpoint_prefix="lora_lab_ckpt", keep_checkpoints=1,
                                resume_state="lora_lab_ckpt-step00000002.state.safetensors")
    resumed = load_file(comfy.loras_dir / saved_name(comfy.run(graph, timeout=300)))
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert np.allclose(resumed[key].numpy(), whole[key].numpy(), rtol=1e-5, atol=1e-7), key
    assert sorted(p.name for p in comfy.loras_dir.glob("lora_lab_ckpt-*")) == [
        "lora_lab_ckpt-step00000004.safetensors", "lora_lab_ckpt-step00000004.state.safetensors"]

    graph = training_graph(dataset, steps=4, prefix="lora_lab_again")
    graph["4"]["inputs"].update(checkpoint_every=2, checkpoint_prefix="lora_lab_ckpt")
    status = prompt_status(comfy.wait(comfy.queue_prompt(graph), timeout=300))
    assert status.state == "error" and "already holds checkpoints" in status.message, "never overwrite another run"

    graph = training_graph(dataset, steps=4, prefix="lora_lab_memory")
    graph["4"]["inputs"].update(gradient_checkpointing=True, mixed_precision="bf16")
    entry = comfy.run(graph, timeout=300)
    assert np.isfinite(entry["outputs"]["4"]["lora_lab_training"][0]["losses"]).all()
    assert load_file(comfy.loras_dir / saved_name(entry)).keys() == whole.keys()


def test_apply_overhead_benchmark_runs(comfy: ComfyServer, new_loras) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from apply_overhead import measure, train_lora

    report = measure(comfy, train_lora(comfy), rounds=1, runs=2, size=64, steps=2)
    assert report["prompts_per_side"] == 1 and report["apply_ratio"] > 0


def test_the_same_seed_trains_the_same_lora_in_comfy(comfy: ComfyServer, dataset, new_loras) -> None:
    files = []
    for suffix in ("1", "2"):  # other node ids: ComfyUI runs the nodes again instead of serving its cache
        graph = training_graph(dataset, steps=3, prefix=f"lora_lab_same_{suffix}")
        graph["2"]["inputs"]["flip"] = True
        renamed = {node_id + suffix: node for node_id, node in graph.items()}
        for node in renamed.values():
            node["inputs"] = {k: [v[0] + suffix, v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        files.append(load_file(comfy.loras_dir / saved_name(comfy.run(renamed, timeout=300), "5" + suffix)))
    assert files[0].keys() == files[1].keys()
    assert all(np.array_equal(files[0][k].numpy(), files[1][k].numpy()) for k in files[0])


def test_latents_cached_on_disk_give_the_same_training(comfy: ComfyServer, dataset, new_loras) -> None:
    losses = []
    for suffix in ("1", "2", "3"):  # other node ids each time, so the training really runs again
        graph = training_graph(dataset, steps=2, prefix=f"lora_lab_cached_{suffix}")
        graph["4"]["inputs"]["cache_latents_on_disk"] = suffix != "1"
        renamed = {node_id + suffix: node for node_id, node in graph.items()}
        for node in renamed.values():
            node["inputs"] = {k: [v[0] + suffix, v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        losses.append(comfy.run(renamed, timeout=300)["outputs"]["4" + suffix]["lora_lab_training"][0]["losses"])
    cached = list((comfy.output_dir / "lora_lab_latent_cache").glob("*.safetensors"))
    assert len(cached) == 4  # one latent per image of the dataset (no flips)
    assert losses[0] == losses[1] == losses[2]
