"""Sweeps: every variant equals the same run alone, bit for bit, on a dataset encoded once; the best is the lowest
validation loss of the weights each returned; a stop keeps the variants already finished."""
from __future__ import annotations

import math

import pytest
import torch
from support.training_runs import make, snapshot

from lora_core import LoRANetwork, TrainingConfig, train
from lora_core.training.config import TrainingError
from lora_core.training.sweep import Variant, check_sweep, parse_sweep, sweep

CONFIG = dict(steps=4, learning_rate=1e-3, validation_every=2, validation_images=1, seed=5, keep_best=True)


def network_for(backend, variant: Variant) -> LoRANetwork:
    rank = variant.rank or 4
    return LoRANetwork.create(backend.adapter_targets("attention", False), rank=rank,
                              alpha=variant.alpha if variant.rank else None, seed=1)


def test_each_variant_equals_its_run_alone_bit_for_bit_and_the_dataset_is_encoded_once(pipeline, concept_dir) -> None:
    variants = parse_sweep("1e-3, 1e-2", "4, 8/2", "3")
    assert [variant.label for variant in variants] == [
        "learning_rate 0.001, rank 4, steps 3", "learning_rate 0.001, rank 8/2, steps 3",
        "learning_rate 0.01, rank 4, steps 3", "learning_rate 0.01, rank 8/2, steps 3"]
    backend, dataset, _ = make(pipeline, concept_dir)
    config = TrainingConfig(**CONFIG)
    encoded_images = []
    encode_images = backend.encode_images
    backend.encode_images = lambda *args: encoded_images.append(1) or encode_images(*args)
    swept = sweep(backend, lambda variant: network_for(backend, variant), dataset, config, variants)
    assert len(encoded_images) == dataset.num_images, "the VAE ran once per image for the whole sweep"
    assert swept.stop_reason == "completed" and [each.variant for each in swept.variants] == variants

    for each in swept.variants:
        alone_backend, alone_dataset, _ = make(pipeline, concept_dir)
        alone = network_for(alone_backend, each.variant)
        result = train(alone_backend, alone, alone_dataset, each.variant.config(config))
        assert result.validation == each.result.validation and result.losses == each.result.losses
        expected, actual = snapshot(alone), snapshot(each.network)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(actual[key], expected[key].cpu()) for key in expected), each.variant.label
    assert swept.best.validation_loss == min(each.result.best_loss for each in swept.variants)
    assert len({each.result.losses[-1] for each in swept.variants}) == len(variants), "the variants differ"


def test_a_stop_keeps_the_finished_variants_and_drops_the_one_training(pipeline, concept_dir) -> None:
    backend, dataset, _ = make(pipeline, concept_dir)
    variants = parse_sweep(sweep_steps="2, 3, 4")
    finished = []
    swept = sweep(backend, lambda variant: network_for(backend, variant), dataset, TrainingConfig(**CONFIG), variants,
                  callback=lambda variant, index, report: not (index == 1 and report.step == 2),
                  finished=finished.append)
    assert swept.stop_reason == "cancelled"
    assert [each.variant.label for each in swept.variants] == ["steps 2"] == [each.variant.label for each in finished]
    assert swept.variants[0].result.steps == 2


@pytest.mark.parametrize(("settings", "problem"), [
    ({"sweep_learning_rate": "1e-4, fast"}, "give numbers separated by commas"),
    ({"sweep_rank": "8, 8"}, "names a value twice"),
    ({"sweep_steps": "0, 10"}, "must be positive"),
])
def test_bad_lists_are_refused_naming_the_setting(settings, problem) -> None:
    with pytest.raises(TrainingError, match=problem):
        parse_sweep(**settings)


def test_a_sweep_without_validation_is_refused(pipeline, concept_dir) -> None:
    backend, dataset, _ = make(pipeline, concept_dir)
    with pytest.raises(TrainingError, match="picks its best variant by the validation loss"):
        sweep(backend, lambda variant: network_for(backend, variant), dataset,
              TrainingConfig(**{**CONFIG, "validation_every": 0}), parse_sweep("1e-3, 1e-2"))


def test_a_diverging_variant_is_left_out_and_the_sweep_goes_on(pipeline, concept_dir) -> None:
    backend, dataset, _ = make(pipeline, concept_dir)
    variants = parse_sweep("1e-3, 2e-3, 3e-3")

    def network(variant: Variant) -> LoRANetwork:
        made = network_for(backend, variant)
        if variant.learning_rate == 2e-3:  # its loss is NaN from the first step
            with torch.no_grad():
                next(parameter for name, parameter in made.named_parameters() if "lora_down" in name).fill_(math.nan)
        return made

    swept = sweep(backend, network, dataset, TrainingConfig(**CONFIG), variants)
    assert [each.variant.label for each in swept.variants] == ["learning_rate 0.001", "learning_rate 0.003"]
    [(variant, reason)] = swept.diverged
    assert variant.label == "learning_rate 0.002" and "became NaN or infinite at step 1" in reason
    assert swept.best in swept.variants and swept.stop_reason == "completed"


def test_a_stop_at_a_variants_last_step_keeps_that_variant(pipeline, concept_dir) -> None:
    backend, dataset, _ = make(pipeline, concept_dir)
    swept = sweep(backend, lambda variant: network_for(backend, variant), dataset, TrainingConfig(**CONFIG),
                  parse_sweep(sweep_steps="2, 3"), callback=lambda variant, index, report: report.step < 2)
    assert swept.stop_reason == "cancelled" and [each.variant.label for each in swept.variants] == ["steps 2"]


@pytest.mark.parametrize(("lists", "config", "problem"), [
    ({"sweep_steps": "2, 10"}, {"lr_warmup_steps": 3}, "sweep variant steps 2: lr_warmup_steps = 3 must be below"),
    ({"sweep_learning_rate": "1e-4, 1.0000001e-4"}, {}, "two variants named alike"),
    ({"sweep_learning_rate": "1e-4, 2"}, {}, "sweep variant learning_rate 2: learning_rate = 2.0 is out of range"),
])
def test_a_variant_its_run_would_refuse_is_refused_before_any_trains(lists, config, problem) -> None:
    with pytest.raises(TrainingError, match=problem):
        check_sweep(parse_sweep(**lists), TrainingConfig(**{**CONFIG, **config}))
