"""Sample images during training."""
from __future__ import annotations

import numpy as np
import torch

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


def test_samples_are_drawn_without_gradients(pipeline, concept_dir) -> None:
    """Inside the training loop gradients are on; a sample is drawn with them off (ComfyUI's KSampler and VAE decode
    do not turn them off themselves, and its weights are inference tensors autograd cannot save)."""
    backend, dataset, network = make(pipeline, concept_dir)
    drawn = backend.sample_images
    grad_modes = []

    def sample_images(*args):
        grad_modes.append(torch.is_grad_enabled())
        return drawn(*args)

    backend.sample_images = sample_images
    train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1, sample_every=2, sample_steps=2,
                                                    validation_every=0))
    assert grad_modes == [False]
