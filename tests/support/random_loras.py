"""Trained-looking LoRAs on the tiny SD1.x pipeline, for the file tools' and Check LoRA's tests."""
from __future__ import annotations

import torch

from lora_core.families.sd1 import DiffusersBackend
from lora_core.formats.files import LoRAWeights
from lora_core.network import LoRANetwork


def random_lora(backend: DiffusersBackend, seed: int, rank: int = 8, algorithm: str = "lora") -> LoRAWeights:
    """A trained-looking LoRA: random, non-zero ups, on every attention projection of the tiny UNet and CLIP."""
    network = LoRANetwork.create(backend.adapter_targets("full", True), algorithm, rank=rank, alpha=rank / 2,
                                 seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return LoRAWeights.from_network(network, {"ss_output_name": f"lora{seed}"})
