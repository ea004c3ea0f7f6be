"""Text-encoder LoRA with its own learning rate."""
from __future__ import annotations

import torch

from lora_core import TrainingConfig, train
from lora_core.training.loop import parameter_groups
from support.training_runs import make, snapshot


def test_text_encoder_lora_trains_with_its_own_learning_rate(pipeline, concept_dir) -> None:
    backend, dataset, network = make(pipeline, concept_dir, text_encoder=True)
    groups = parameter_groups(network, TrainingConfig(learning_rate=1e-3, text_encoder_lr=5e-5))
    assert [group["lr"] for group in groups] == [1e-3, 5e-5]
    before = snapshot(network)
    ids = pipeline.tokenizer(["a photo of sks"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        text_before = pipeline.text_encoder(ids)[0]
    train(backend, network, dataset, TrainingConfig(steps=3, gradient_accumulation=1, learning_rate=1e-2,
                                                     text_encoder_lr=1e-2))
    changed = {name for name, value in network.state_dict().items() if not torch.equal(value, before[name])}
    assert any(name.startswith("adapters.lora_te_") for name in changed)
    assert any(name.startswith("adapters.lora_unet_") for name in changed)
    with torch.no_grad(), network.applied(1.0):
        assert not torch.allclose(pipeline.text_encoder(ids)[0], text_before, atol=1e-5)

    frozen_text = {name: p.detach().clone() for name, p in network.named_parameters()}
    train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1, learning_rate=1e-2,
                                                     text_encoder_lr=0.0))
    unchanged = {name for name, p in network.named_parameters() if torch.equal(p, frozen_text[name])}
    assert {name for name in frozen_text if name.startswith("adapters.lora_te_")} <= unchanged
    assert not any(name.startswith("adapters.lora_unet_") for name in unchanged)
