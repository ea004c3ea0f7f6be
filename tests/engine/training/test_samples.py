"""Sample images during training."""
from __future__ import annotations

import numpy as np

from lora_core import TrainingConfig, train
from support.training_runs import make


def test_samples_come_every_n_steps_and_the_same_weights_give_the_same_image(pipeline, concept_dir) -> None:
    backend, dataset, network = make(pipeline, concept_dir)
    reports = []
    config = TrainingConfig(steps=4, gradient_accumulation=1, learning_rate=2e-2, sample_every=2, sample_steps=4,
                            sample_seed=7)
    result = train(backend, network, dataset, config, callback=reports.append)
    assert [step for step, _ in result.samples] == [2, 4]
    assert [r.step for r in reports if r.samples] == [2, 4]
    last = np.asarray(result.samples[-1][1][0])
    with network.applied(1.0):
        again = np.asarray(backend.sample_images(["a photo of sks"], 7, 4)[0])
    assert np.array_equal(last, again), "same weights and seed must give the same sample"
    assert not np.array_equal(np.asarray(result.samples[0][1][0]), last), "the weights changed between samples"
