"""A tiny SD1.x training run's parts, shared by the engine's training tests."""
from __future__ import annotations

import torch

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork
from lora_core.families.sd1 import DiffusersBackend


def snapshot(network: LoRANetwork) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


def make(pipeline, concept_dir, text_encoder=False, **dataset_options):
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64, **dataset_options))
    network = LoRANetwork.create(backend.adapter_targets("attention", text_encoder), rank=4, seed=1)
    return backend, dataset, network
