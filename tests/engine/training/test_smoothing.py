"""One smoothing of the training loss: what training reports step by step is `plots.smooth` of the losses, which the
loss curve draws and the node sends its chart."""
from __future__ import annotations

import pytest
from support.training_runs import make

from lora_core import TrainingConfig, train
from lora_core.training.plots import smooth


def test_the_smoothed_loss_reported_each_step_is_smooth_of_the_losses(pipeline, concept_dir) -> None:
    backend, dataset, network = make(pipeline, concept_dir)
    reports = []
    config = TrainingConfig(steps=6, gradient_accumulation=1, validation_every=0, loss_smoothing=0.8)
    result = train(backend, network, dataset, config, callback=reports.append)
    assert len(set(result.losses)) == 6
    assert [report.smoothed_loss for report in reports] == smooth(result.losses, config.loss_smoothing)


def test_smoothing_starts_at_the_first_value_and_follows_a_constant() -> None:
    assert smooth([2.5, 2.5, 2.5], 0.9) == pytest.approx([2.5, 2.5, 2.5])  # the bias correction
    assert smooth([]) == []
