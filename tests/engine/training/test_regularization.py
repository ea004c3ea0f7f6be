"""Regularization (class) images for prior preservation, as kohya sd-scripts does it: class images repeated to as
many examples as the concept has, their own captions, their loss weighted by prior_loss_weight."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from lora_core.data.config import DatasetConfig
from lora_core.data.dataset import ImageFolderDataset
from lora_core.families.sd1 import DiffusersBackend
from lora_core.formats.files import load_file
from lora_core.network import LoRANetwork
from lora_core.training.distributed import Distributed
from lora_core.training.encoded import EncodedDataset
from lora_core.training.loop import BatchLoss, TrainingConfig, TrainingError, train
from lora_core.training.objectives import DiscreteObjective
from lora_core.training.validation import validation_images


@pytest.fixture()
def class_dir(tmp_path):
    """`1_person` with three grey-ish images, one with its own caption."""
    folder = tmp_path / "reg" / "1_person"
    folder.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (64, 64), (90 + 40 * index, 100, 110)).save(folder / f"p{index}.png")
    (folder / "p2.txt").write_text("a photo of a person, smiling")
    return tmp_path / "reg"


def test_class_images_fill_as_many_examples_as_the_concept_has_with_their_own_captions(concept_dir, class_dir) -> None:
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64, repeats=2), regularization_root=class_dir)
    assert (dataset.num_training_images, dataset.num_regularization_images) == (4, 3)
    regularization = [dataset.examples[dataset.image_index(i)].regularization for i in range(len(dataset))]
    assert regularization.count(False) == 8 and regularization.count(True) == 8  # 4 × 2 concept, 3 class cycled to 8
    captions = {example.caption for example in dataset.examples if example.regularization}
    assert captions == {"person", "a photo of a person, smiling"}
    assert "person" not in json.dumps(dataset.tag_frequency())  # the concept's tags only, as kohya records them
    images, _ = validation_images(dataset, 4, seed=0)
    assert max(images) < dataset.num_training_images  # validation judges the concept, never class images


def test_the_batch_loss_weighs_class_images_by_prior_loss_weight(pipeline, concept_dir, class_dir) -> None:
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64), regularization_root=class_dir)
    encoded = EncodedDataset(backend, dataset, 0, cache_text=True)
    objective = DiscreteObjective(backend.alphas_cumprod(), backend.prediction_type)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4)
    batches = dataset.batches(4, torch.Generator().manual_seed(0))
    batch = next(batch for batch in batches if 0 < sum(batch.regularization) < 4)  # concept and class images mixed
    loss = BatchLoss(network, backend, encoded, objective, torch.Generator().manual_seed(5), Distributed(), 0.25)
    with torch.no_grad():
        weighted = loss(batch).item()
        # by hand: the same noise and timesteps, each sample's loss, class images' × 0.25, then the mean
        noise, timesteps = objective.draw((4, *encoded.batch_latents(batch).shape[1:]), torch.Generator().manual_seed(5))
        conditioning = encoded.batch_conditioning(batch)
        per_sample = objective.loss(lambda noisy, t: backend.predict(noisy, t, conditioning),
                                    encoded.batch_latents(batch), noise, timesteps)
    weights = torch.tensor([0.25 if regularization else 1.0 for regularization in batch.regularization])
    assert weighted == pytest.approx(float((per_sample * weights).mean()), rel=1e-6)
    assert weighted != pytest.approx(float(per_sample.mean()), rel=1e-3)


def test_prior_loss_weight_without_class_images_is_refused(pipeline, concept_dir) -> None:
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4)
    with pytest.raises(TrainingError, match="prior_loss_weight = 0.5 weighs regularization images"):
        train(backend, network, dataset, TrainingConfig(steps=1, prior_loss_weight=0.5))


def test_the_command_line_trains_with_class_images_and_records_them(pipeline, concept_dir, class_dir, tmp_path) -> None:
    pipeline.save_pretrained(tmp_path / "base")
    out = tmp_path / "lora.safetensors"
    subprocess.run([sys.executable, "-m", "lora_core", "train", "--base", str(tmp_path / "base"), "--data",
                    str(concept_dir), "--reg-data", str(class_dir), "--prior-loss-weight", "0.5", "--resolution", "64",
                    "--steps", "2", "--gradient-accumulation", "1", "--validation-every", "0", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    _, metadata = load_file(out)
    assert (metadata["ss_num_reg_images"], metadata["ss_prior_loss_weight"], metadata["ss_num_train_images"]) == \
        ("3", "0.5", "4")  # kohya counts the concept's examples alone as train images
