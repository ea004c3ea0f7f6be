"""The EMA of the LoRA's weights: equal to one computed by hand over the steps, judged by validation, written to
checkpoints and the result, and continued exactly by a resumed run."""
from __future__ import annotations

import pytest
import torch
from support.training_runs import make, snapshot

from lora_core import TrainingConfig, train
from lora_core.formats.files import LoRAWeights
from lora_core.training.checkpoints import Checkpointer, load_state, state_path
from lora_core.training.loop import TrainingError

CONFIG = dict(steps=5, gradient_accumulation=1, learning_rate=1e-2, validation_every=0, seed=3)


def weights(network) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in network.named_parameters()}


def by_hand(start: dict[str, torch.Tensor], later: list[dict[str, torch.Tensor]], decay: float) -> dict:
    average = dict(start)
    for step_weights in later:
        average = {name: decay * average[name] + (1 - decay) * step_weights[name] for name in average}
    return average


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("start_step", [0, 2])
def test_the_result_is_the_average_computed_by_hand_over_five_steps(pipeline, concept_dir, start_step) -> None:
    """From the initial weights (start 0) or those after step 2, each later step moves it 1 − decay of the way."""
    backend, dataset, network = make(pipeline, concept_dir)
    initial = weights(network)
    after_each_step = []
    train(backend, network, dataset, TrainingConfig(**CONFIG, ema_decay=0.8, ema_start_step=start_step),
          callback=lambda report: after_each_step.append(weights(network)))
    assert len(after_each_step) == 5
    start = initial if start_step == 0 else after_each_step[start_step - 1]
    expected = by_hand(start, after_each_step[start_step:], 0.8)
    assert_same_weights(weights(network), expected)
    assert any(not torch.allclose(value, after_each_step[-1][name]) for name, value in expected.items())


def test_validation_and_samples_judge_the_average(pipeline, concept_dir) -> None:
    """What the denoiser sees while the validation loss and the samples of step 5 are computed is the average."""
    backend, dataset, network = make(pipeline, concept_dir)
    initial = weights(network)
    after_each_step, seen = [], {"validation": [], "samples": []}
    predict, sample_images = backend.predict, backend.sample_images

    def predicting(*args, **kwargs):
        if not network.training:  # the validation loss; training steps run in train mode
            seen["validation"].append(weights(network))
        return predict(*args, **kwargs)

    def sampling(*args, **kwargs):
        seen["samples"].append(weights(network))
        return sample_images(*args, **kwargs)

    backend.predict, backend.sample_images = predicting, sampling
    train(backend, network, dataset, TrainingConfig(**{**CONFIG, "validation_every": 5}, ema_decay=0.8,
                                                    sample_every=5, sample_steps=1),
          callback=lambda report: after_each_step.append(weights(network)))
    expected = by_hand(initial, after_each_step, 0.8)
    assert_same_weights(seen["validation"][-1], expected)
    assert_same_weights(seen["samples"][-1], expected)
    assert any(not torch.allclose(value, after_each_step[-1][name]) for name, value in expected.items())


def test_checkpoints_hold_the_average_and_resuming_continues_it_exactly(pipeline, concept_dir, tmp_path) -> None:
    config = TrainingConfig(**{**CONFIG, "steps": 6}, ema_decay=0.9, ema_start_step=1)
    backend, dataset, network = make(pipeline, concept_dir)
    train(backend, network, dataset, config)
    expected = snapshot(network)

    backend, dataset, network = make(pipeline, concept_dir)
    checkpointer = Checkpointer(tmp_path, every=3, name="run")
    raw_at_3 = []
    train(backend, network, dataset, config, checkpointer=checkpointer,
          callback=lambda report: raw_at_3.append(weights(network)) or report.step < 3)
    (saved,) = checkpointer.saved()
    state = load_state(state_path(saved))
    # the file holds the average the interrupted run ended with; the state the weights themselves and the average
    written, average = LoRAWeights.load(saved).tensors, LoRAWeights.from_network(network, {}, checkpointer.dtype)
    assert written.keys() == average.tensors.keys()
    for key, value in written.items():
        assert torch.equal(value, average.tensors[key]), key
    assert_same_weights({name: state["network"][name] for name in raw_at_3[-1]}, raw_at_3[-1])
    assert_same_weights(state["average"]["average"], weights(network))

    backend, dataset, network = make(pipeline, concept_dir)
    train(backend, network, dataset, config, resume_state=state)
    for key, value in network.state_dict().items():
        assert torch.equal(value, expected[key]), key

    backend, dataset, network = make(pipeline, concept_dir)
    with pytest.raises(TrainingError, match="other settings.*ema_decay"):
        train(backend, network, dataset, TrainingConfig(**{**CONFIG, "steps": 6}, ema_decay=0.5, ema_start_step=1),
              resume_state=state)


def test_out_of_range_decays_are_refused(pipeline, concept_dir) -> None:
    backend, dataset, network = make(pipeline, concept_dir)
    for decay in (1.0, -0.1):
        with pytest.raises(TrainingError, match="ema_decay"):
            train(backend, network, dataset, TrainingConfig(**CONFIG, ema_decay=decay))
