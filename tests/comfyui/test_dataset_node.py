"""Load Dataset in the live server: it reloads after images or captions change, and refuses links inside a dataset
folder that lead out of the dataset roots."""
from __future__ import annotations

import os

from safetensors import safe_open

from lora_core.demo.demo import make_concept_images

from .harness import TEST_CHECKPOINT, ComfyServer, prompt_status


def dataset_graph(folder: str) -> dict:
    return {"1": {"class_type": "LoraLab_LoadDataset", "inputs": {
        "folder": folder, "resolution": 64, "caption_extension": ".txt", "default_caption": "a {token}",
        "token": "sks", "repeats": 1, "flip": False}}, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}


def found(entry: dict) -> dict:
    return entry["outputs"]["1"]["lora_lab_dataset"][0]


def cached_nodes(entry: dict) -> list[str]:
    return [node for event, data in entry["status"]["messages"] if event == "execution_cached" for node in data["nodes"]]


def test_load_dataset_runs_again_after_captions_or_images_change(comfy: ComfyServer) -> None:
    folder = make_concept_images(comfy.input_dir / "lora_lab_changing", count=2, resolution=64)
    graph = dataset_graph(folder.name)
    assert found(comfy.run(graph)) == {"images": 2, "captioned": 1, "defaulted": 1, "regularization": 0,
                                       "examples": 2, "skipped": 0, "references": 0, "clips": 0}
    assert "1" in cached_nodes(comfy.run(graph)), "an unchanged folder is not read again"

    (folder / "circle_00.txt").write_text("")  # the caption edited away: that image gets the default caption
    assert found(comfy.run(graph))["captioned"] == 0
    make_concept_images(comfy.run_dir / "more", count=3, resolution=64)
    os.replace(comfy.run_dir / "more" / "circle_02.png", folder / "circle_02.png")
    assert found(comfy.run(graph))["images"] == 3


def test_links_inside_a_dataset_that_lead_out_of_the_input_folder_are_refused(comfy: ComfyServer) -> None:
    outside = make_concept_images(comfy.run_dir / "elsewhere" / "private", count=2, resolution=64)
    for name, link, target in (("lora_lab_linked_folder", "10_x", outside),
                               ("lora_lab_linked_file", "circle_09.png", outside / "circle_00.png")):
        folder = make_concept_images(comfy.input_dir / name, count=2, resolution=64)
        (folder / link).symlink_to(target)
        status = prompt_status(comfy.wait(comfy.queue_prompt(dataset_graph(name))))
        assert status.state == "error" and status.node_type == "LoraLab_LoadDataset", status
        assert f"'{link}' in the dataset folder '{name}' is a link that leads to {os.path.realpath(outside)}" in status.message
        assert "copy or move those files into the dataset folder" in status.message

    inside = make_concept_images(comfy.input_dir / "lora_lab_linked_inside", count=2, resolution=64)
    other = make_concept_images(comfy.input_dir / "lora_lab_link_target", count=2, resolution=64)
    (inside / "3_more").symlink_to(other)  # a link that stays inside input/ is fine
    assert found(comfy.run(dataset_graph(inside.name)))["images"] == 2 + 2


def defaults(node_info: dict) -> dict:
    """The default of every required widget of a node, from /object_info."""
    return {name: spec[1]["default"] for name, spec in node_info["input"]["required"].items()
            if len(spec) > 1 and "default" in spec[1]}


def test_class_images_from_a_second_folder_train_with_their_prior_loss_weight(comfy: ComfyServer,
                                                                               comfy_object_info) -> None:
    concept = make_concept_images(comfy.input_dir / "lora_lab_concept_reg", count=2, resolution=64)
    classes = make_concept_images(comfy.input_dir / "lora_lab_classes" / "1_shape", count=3, resolution=64)
    for caption in classes.glob("*.txt"):
        caption.unlink()  # captioned by their folder's class name
    graph = dataset_graph(concept.name)
    graph["1"]["inputs"].update(regularization_folder=classes.parent.name)
    graph.update({
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "4": {"class_type": "LoraLab_InjectLoRA", "inputs": {"model": ["3", 0], "clip": ["3", 1], "algorithm": "lora",
                                                             "rank": 4, "alpha": 4.0, "target": "attention",
                                                             "train_text_encoder": False}},
        "5": {"class_type": "LoraLab_TrainingOptions", "inputs": {
            **defaults(comfy_object_info["LoraLab_TrainingOptions"]), "gradient_accumulation": 1,
            "validation_every": 0, "prior_loss_weight": 0.5}},
        "6": {"class_type": "LoraLab_Train", "inputs": {
            **defaults(comfy_object_info["LoraLab_Train"]), "network": ["4", 0], "dataset": ["1", 0],
            "vae": ["3", 2], "steps": 2, "batch_size": 2, "sample_every": 0, "options": ["5", 0]}},
        "7": {"class_type": "LoraLab_SaveLoRA", "inputs": {"lora": ["6", 0], "filename_prefix": "lora_lab_reg",
                                                           "precision": "float16"}},
    })
    entry = comfy.run(graph, timeout=300)
    assert found(entry)["regularization"] == 3 and found(entry)["examples"] == 4  # 2 concept + 2 of the 3 classes
    [saved] = comfy.loras_dir.glob("lora_lab_reg_*.safetensors")
    try:
        with safe_open(str(saved), "pt") as file:
            metadata = file.metadata()
        assert (metadata["ss_num_reg_images"], metadata["ss_prior_loss_weight"]) == ("3", "0.5")
    finally:
        saved.unlink()
