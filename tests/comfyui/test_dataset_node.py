"""Load Dataset in the live server: it reloads after images or captions change, and refuses links inside a dataset
folder that lead out of the dataset roots."""
from __future__ import annotations

import os

from lora_core.demo import make_concept_images

from .harness import ComfyServer, prompt_status


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
    assert found(comfy.run(graph)) == {"images": 2, "captioned": 1, "defaulted": 1, "examples": 2, "skipped": 0}
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
