"""The optimizers users ask for."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_core import TrainingConfig, train
from support.training_runs import make, snapshot


@pytest.mark.parametrize("optimizer", ["Lion", "Prodigy", "AdamW8bit"])
def test_optimizers_users_ask_for_train(pipeline, concept_dir, optimizer: str) -> None:
    backend, dataset, network = make(pipeline, concept_dir)
    before = snapshot(network)
    lr = 1.0 if optimizer == "Prodigy" else 1e-3  # Prodigy estimates its step size: lr 1.0 is its usual setting
    result = train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1, optimizer=optimizer,
                                                              learning_rate=lr))
    assert np.isfinite(result.losses).all()
    assert any(not torch.equal(v, before[k]) for k, v in network.state_dict().items())
