"""Resuming a run from its saved state: the same run as an uninterrupted one, more steps, refusals."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from lora_core import DatasetConfig, ImageFolderDataset, TrainingConfig, train
from lora_core.training.checkpoints import Checkpointer, load_state, state_path
from lora_core.training.loop import TrainingError
from support.training_runs import make, snapshot

RESUME_CONFIG = dict(steps=6, batch_size=2, gradient_accumulation=2, learning_rate=5e-3, lr_scheduler="cosine",
                     lr_warmup_steps=2, validation_every=2, early_stopping_patience=50, seed=4)


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(pipeline, concept_dir, tmp_path) -> None:
    options = dict(flip=True, shuffle_tags=True)
    backend, dataset, network = make(pipeline, concept_dir, **options)
    whole = train(backend, network, dataset, TrainingConfig(**RESUME_CONFIG))
    expected = snapshot(network)

    backend, dataset, network = make(pipeline, concept_dir, **options)
    checkpointer = Checkpointer(tmp_path, every=3, keep=1, name="run")
    first = train(backend, network, dataset, TrainingConfig(**RESUME_CONFIG), checkpointer=checkpointer,
                  callback=lambda report: report.step < 3)  # "crash" right after the step-3 checkpoint
    assert first.steps == 3 and [p.name for p in checkpointer.saved()] == ["run-step00000003.safetensors"]

    backend, dataset, network = make(pipeline, concept_dir, **options)  # a new process would start from scratch
    steps_seen = []
    resumed = train(backend, network, dataset, TrainingConfig(**RESUME_CONFIG), checkpointer=checkpointer,
                    resume_state=load_state(state_path(checkpointer.saved()[0])),
                    callback=lambda report: steps_seen.append(report.step))
    assert steps_seen == [4, 5, 6]
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-7)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    assert [p.name for p in checkpointer.saved()] == ["run-step00000006.safetensors"], "only the newest is kept"

    with pytest.raises(TrainingError, match="other settings.*learning_rate"):
        train(backend, network, dataset, TrainingConfig(**{**RESUME_CONFIG, "steps": 9, "learning_rate": 1e-3}),
              resume_state=load_state(state_path(checkpointer.saved()[0])))


def test_resuming_with_more_steps_rebuilds_the_schedule_for_them(pipeline, concept_dir, tmp_path) -> None:
    """A state saved by a 4-step run continued to 8 steps: the lr follows an 8-step schedule from where it was (not
    the 4-step one, which would give lr 0 to every new step with linear)."""
    config = dict(steps=4, gradient_accumulation=1, learning_rate=1e-3, lr_scheduler="linear", validation_every=0)
    backend, dataset, network = make(pipeline, concept_dir)
    checkpointer = Checkpointer(tmp_path, every=2, name="run")
    train(backend, network, dataset, TrainingConfig(**config), checkpointer=checkpointer,
          callback=lambda report: report.step < 2)
    backend, dataset, network = make(pipeline, concept_dir)
    resumed = train(backend, network, dataset, TrainingConfig(**{**config, "steps": 8}),
                    resume_state=load_state(state_path(checkpointer.saved()[0])))
    assert resumed.learning_rates == pytest.approx([1e-3 * (1 - step / 4) for step in range(2)]
                                                   + [1e-3 * (1 - step / 8) for step in range(2, 8)])


@pytest.mark.parametrize(("setting", "value"), [("min_snr_gamma", 5.0), ("noise_offset", 0.05),
                                                ("max_grad_norm", 0.5), ("validation_every", 3)])
def test_resuming_refuses_a_state_of_other_settings_or_another_dataset(pipeline, concept_dir, tmp_path, setting,
                                                                        value) -> None:
    config = dict(steps=4, gradient_accumulation=1, validation_every=2)
    backend, dataset, network = make(pipeline, concept_dir)
    checkpointer = Checkpointer(tmp_path, every=1, name="run")
    train(backend, network, dataset, TrainingConfig(**config), checkpointer=checkpointer,
          callback=lambda report: False)
    state = load_state(state_path(checkpointer.saved()[0]))
    with pytest.raises(TrainingError, match=f"other settings.*{setting}"):
        train(backend, network, dataset, TrainingConfig(**{**config, setting: value}), resume_state=state)

    other = tmp_path / "other_images"
    other.mkdir()
    for index, path in enumerate(sorted(concept_dir.glob("*.png"))[:3]):
        Image.open(path).rotate(90 * (index + 1)).save(other / path.name)
    other_dataset = ImageFolderDataset(other, DatasetConfig(resolution=64))
    with pytest.raises(TrainingError, match="dataset 'concept' and this run's is 'other_images'"):
        train(backend, network, other_dataset, TrainingConfig(**config), resume_state=state)
