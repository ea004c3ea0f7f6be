"""Block swap (`blocks_to_swap`): the same training bit for bit with and without it, with and without gradient
checkpointing, while the swapped blocks' weights are away between their uses (on a CPU: empty tensors, so that a
block run out of turn fails); the weights are back afterwards; the memory plan counts what swap leaves on the device
and names the blocks_to_swap that would fit."""
from __future__ import annotations

import argparse

import pytest
import torch
from support.tiny_flow_models import build_tiny_flux, concept_images

from lora_core import (
    DatasetConfig,
    ImageFolderDataset,
    LoRANetwork,
    TrainingConfig,
    train,
)
from lora_core.families.flux import FluxBackend
from lora_core.training.block_swap import BlockSwap
from lora_core.training.config import TrainingError
from lora_core.training.memory_plan import GIB, MemoryPlan


@pytest.fixture(scope="module")
def flux():
    return build_tiny_flux(seed=0)


def trained(backend, dataset, swap: int, checkpointing: bool, seen: list | None = None):
    network = LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 4, seed=1)
    config = TrainingConfig(steps=3, learning_rate=1e-2, gradient_accumulation=1, validation_every=3,
                            blocks_to_swap=swap, gradient_checkpointing=checkpointing)

    def watch(report) -> None:  # between steps: the swapped block's weights are away
        if seen is not None:
            seen.append(backend.checkpoint_blocks()[-1].proj_out.weight.numel())

    result = train(backend, network, dataset, config, callback=watch)
    return result, {name: value.clone() for name, value in network.state_dict().items()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_is_bitwise_the_same_with_the_last_block_swapped(flux, tmp_path, checkpointing: bool) -> None:
    backend = FluxBackend(flux)
    dataset = ImageFolderDataset(concept_images(tmp_path, 2), DatasetConfig(resolution=64))
    before = {name: value.clone() for name, value in flux.transformer.state_dict().items()}
    plain, plain_weights = trained(backend, dataset, 0, checkpointing)
    seen: list[str] = []
    swapped, swapped_weights = trained(backend, dataset, 1, checkpointing, seen)
    assert seen == [0] * 3
    assert swapped.losses == plain.losses and swapped.validation == plain.validation
    assert all(torch.equal(swapped_weights[name], value) for name, value in plain_weights.items())
    after = flux.transformer.state_dict()
    assert all(after[name].device.type == "cpu" and torch.equal(after[name], value) for name, value in before.items())


def test_a_swapped_block_run_out_of_turn_fails_and_the_count_is_checked(flux) -> None:
    blocks = FluxBackend(flux).checkpoint_blocks()
    with pytest.raises(TrainingError, match=r"blocks_to_swap 2 out of range: this denoiser has 2 blocks, .* \(1 to 1\)"):
        BlockSwap(blocks, 2, torch.device("cpu"))
    flux.transformer.requires_grad_(False)  # frozen, as training leaves the base: swap moves frozen weights only
    swap = BlockSwap(blocks, 1, torch.device("cpu"))
    try:
        assert blocks[-1].proj_out.weight.numel() == 0 and blocks[0].ff.net[2].weight.numel() > 0
        with pytest.raises(RuntimeError):  # its weights are not there: only the hooks' order brings them
            blocks[-1].proj_out(torch.zeros(1, blocks[-1].proj_out.in_features))
    finally:
        swap.close()
        flux.transformer.requires_grad_(True)
    assert blocks[-1].proj_out.weight.shape == (blocks[-1].proj_out.out_features, blocks[-1].proj_out.in_features)


def test_the_plan_counts_the_swapped_blocks_and_names_the_swap_that_fits(flux, tmp_path) -> None:
    backend = FluxBackend(flux)
    dataset = ImageFolderDataset(concept_images(tmp_path, 2), DatasetConfig(resolution=64))
    plans = []
    for swap in (0, 1):
        network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4)
        train(backend, network, dataset, TrainingConfig(steps=1, validation_every=0, blocks_to_swap=swap),
              memory_plan=plans.append)
    plain, swapped = plans
    single = plain.block_bytes[-1]
    assert swapped.weights == plain.weights - single and swapped.swapped_in == 2 * single
    assert "weights" in swapped.describe() and "of 1 swapped blocks" in swapped.describe()
    big = plain.with_swap(0)  # a plan whose blocks are GiB-sized: 10 blocks of 1 GiB, 12 GiB in all
    big = type(big)(12 * GIB, 12 * GIB, 0, 0, 16, 32, 10, 2, True, 16.0, (GIB,) * 10)
    refusal = big.refusal(int(9.5 * GIB))  # 12 − 5 on the host + 2 in use = 9 GiB and the activations
    assert "it would fit with blocks_to_swap 5 (" in refusal, refusal


def test_auto_swaps_the_fewest_blocks_the_plan_fits_and_none_on_a_cpu(flux, tmp_path) -> None:
    """blocks_to_swap auto (None; `--blocks-to-swap auto`, the node's -1): on a GPU the fewest of the last blocks
    with which the plan fits the free memory, 0 where it fits as it is; on a CPU none, as the plan says."""
    from lora_core.settings import add_arguments
    from lora_core.training.config import TRAINING_SETTINGS

    big = MemoryPlan(12 * GIB, 12 * GIB, 0, 0, 16, 32, 10, 2, True, 16.0, (GIB,) * 10)
    assert big.fewest_swapped(13 * GIB) == 0
    assert big.fewest_swapped(int(9.5 * GIB)) == 5  # 12 − 5 on the host + 2 in use, and the activations
    assert big.with_swap(5).total <= 9.5 * GIB < big.with_swap(4).total
    assert big.fewest_swapped(GIB) is None

    parser = argparse.ArgumentParser()
    add_arguments(parser, TRAINING_SETTINGS)
    assert parser.parse_args(["--blocks-to-swap", "auto"]).blocks_to_swap is None
    assert parser.parse_args(["--blocks-to-swap", "3"]).blocks_to_swap == 3
    setting = next(each for each in TRAINING_SETTINGS if each.name == "blocks_to_swap")
    assert setting.config_value(-1) is None and setting.widget_default() == 0 and setting.config_value(2) == 2

    backend = FluxBackend(flux)
    dataset = ImageFolderDataset(concept_images(tmp_path, 2), DatasetConfig(resolution=64))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4)
    result = train(backend, network, dataset, TrainingConfig(steps=1, validation_every=0, blocks_to_swap=None))
    assert result.memory_plan.endswith("blocks_to_swap auto: none; planned, not measured)"), result.memory_plan


def test_the_cli_trains_the_same_lora_with_blocks_swapped(flux, tmp_path) -> None:
    """`--blocks-to-swap 1`: the base loads with that block on the host, and the file is the one trained without."""
    from support.family_checks import cli_trains

    plain, _ = cli_trains(flux, tmp_path / "plain")
    swapped, _ = cli_trains(flux, tmp_path / "swapped", "--blocks-to-swap", "1")
    assert plain.keys() == swapped.keys() and all(torch.equal(plain[key], swapped[key]) for key in plain)
