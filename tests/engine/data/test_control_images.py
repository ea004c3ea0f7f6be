"""Edit pairs (`control_images`): each image's reference images in the `control/` folder beside it, fitted to the
image's bucket and mirrored with it; an image without its reference is refused, naming the file it needs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_core.data.config import DatasetConfig, DatasetError
from lora_core.data.dataset import ImageFolderDataset
from lora_core.training.state import dataset_identity

PAIRS = DatasetConfig(resolution=16, control_images=True)


def save(path: Path, size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Path:
    """An image whose left half is `left` and right half `right` (so mirroring and cropping show)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    image.save(path)
    return path


def test_each_image_gets_its_references_in_order_and_the_control_folders_are_not_trained(tmp_path) -> None:
    save(tmp_path / "a.png", (16, 16), (255, 0, 0), (0, 0, 255))
    save(tmp_path / "control" / "a.jpg", (32, 16), (0, 255, 0), (255, 255, 255))  # another size and aspect
    save(tmp_path / "5_cat" / "b.png", (16, 16), (0, 0, 0), (255, 255, 255))
    for index in (10, 2, 0):
        save(tmp_path / "5_cat" / "control" / f"b_{index}.png", (16, 16), (index, index, index), (9, 9, 9))
    save(tmp_path / "5_cat" / "control" / "b_x.png", (16, 16), (1, 1, 1), (1, 1, 1))  # not b's: no number
    dataset = ImageFolderDataset(tmp_path, PAIRS)
    assert dataset.num_training_images == 2 and len(dataset) == 6
    examples = {example.path.name: example for example in dataset.examples}
    assert len(examples["a.png"].references) == 1
    assert [int(ref[0, 0, 0]) for ref in examples["b.png"].references] == [0, 2, 10]
    reference = examples["a.png"].references[0]
    assert reference.shape == examples["a.png"].pixels.shape == (3, 16, 16)  # scaled to cover, centre-cropped
    image = next(index for index, example in enumerate(dataset.examples) if example.path.name == "a.png")
    straight, mirrored = dataset.reference_pixels(image)[0], dataset.reference_pixels(image, flip=True)[0]
    torch.testing.assert_close(mirrored, straight.flip(-1))
    assert straight[1, 8, 0] > 0.9 and straight[0, 8, -1] > 0.9  # green left, white right, as saved


def test_an_image_without_its_reference_is_refused_naming_the_file_it_needs(tmp_path) -> None:
    save(tmp_path / "a.png", (16, 16), (255, 0, 0), (0, 0, 255))
    save(tmp_path / "b.png", (16, 16), (255, 0, 0), (0, 0, 255))
    save(tmp_path / "control" / "a.png", (16, 16), (0, 255, 0), (0, 255, 0))
    with pytest.raises(DatasetError, match=r"b\.png has no reference image: .*control/b\.png.*b_0\.png"):
        ImageFolderDataset(tmp_path, PAIRS)


def test_without_control_images_a_control_folder_is_an_image_folder_as_before(tmp_path) -> None:
    save(tmp_path / "a.png", (16, 16), (255, 0, 0), (0, 0, 255))
    save(tmp_path / "control" / "a.png", (16, 16), (0, 255, 0), (0, 255, 0))
    dataset = ImageFolderDataset(tmp_path, DatasetConfig(resolution=16))
    assert dataset.num_training_images == 2 and not any(example.references for example in dataset.examples)


def test_a_changed_reference_changes_the_datasets_identity(tmp_path) -> None:
    """A resumed run checks the dataset's identity: an edited reference image is another dataset."""
    save(tmp_path / "a.png", (16, 16), (255, 0, 0), (0, 0, 255))
    save(tmp_path / "control" / "a.png", (16, 16), (0, 255, 0), (0, 255, 0))
    before = dataset_identity(ImageFolderDataset(tmp_path, PAIRS))["hash"]
    save(tmp_path / "control" / "a.png", (16, 16), (0, 250, 0), (0, 255, 0))
    assert dataset_identity(ImageFolderDataset(tmp_path, PAIRS))["hash"] != before


def test_training_refuses_edit_pairs_where_the_model_takes_no_reference(tmp_path) -> None:
    from lora_core import LoRANetwork, TrainingConfig
    from lora_core.demo.tiny_model import build_tiny_pipeline
    from lora_core.families.sd1 import DiffusersBackend
    from lora_core.training.config import TrainingError
    from lora_core.training.loop import train

    save(tmp_path / "a.png", (64, 64), (255, 0, 0), (0, 0, 255))
    save(tmp_path / "control" / "a.png", (64, 64), (0, 255, 0), (0, 255, 0))
    backend = DiffusersBackend(build_tiny_pipeline(seed=0))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4)
    dataset = ImageFolderDataset(tmp_path, DatasetConfig(resolution=64, control_images=True))
    with pytest.raises(TrainingError, match="control_images.*SD1.x takes none.*Flux.1 Kontext"):
        train(backend, network, dataset, TrainingConfig(steps=1, validation_every=0))


def test_edit_pairs_refuse_class_images_and_mixed_reference_counts_in_one_batch(tmp_path) -> None:
    """Class images have no reference: a regularization folder with control_images is refused; images with 1 and 3
    references cannot share a batch (their reference latents do not stack): refused with batch_size > 1 by name."""
    from lora_core.network import LoRANetwork
    from lora_core.training.config import TrainingConfig, TrainingError
    from lora_core.training.loop import train

    save(tmp_path / "pairs" / "a.png", (16, 16), (255, 0, 0), (0, 0, 255))
    save(tmp_path / "pairs" / "control" / "a.png", (16, 16), (0, 255, 0), (0, 0, 0))
    save(tmp_path / "pairs" / "b.png", (16, 16), (255, 0, 0), (0, 0, 255))
    for index in range(3):
        save(tmp_path / "pairs" / "control" / f"b_{index}.png", (16, 16), (index, 0, 0), (0, 0, 0))
    save(tmp_path / "class" / "c.png", (16, 16), (9, 9, 9), (9, 9, 9))
    with pytest.raises(DatasetError, match="class images .* have no reference images"):
        ImageFolderDataset(tmp_path / "pairs", PAIRS, regularization_root=tmp_path / "class")
    dataset = ImageFolderDataset(tmp_path / "pairs", PAIRS)
    with pytest.raises(TrainingError, match="have 1 or 3 reference images, and one batch stacks"):
        network = LoRANetwork.create({"lora_unet_layer": torch.nn.Linear(2, 2)}, "lora", 1, 1)
        train(None, network, dataset, TrainingConfig(batch_size=2, steps=1, validation_every=0))
