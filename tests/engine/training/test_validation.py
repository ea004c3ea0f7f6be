"""The validation loss (fixed latents, noise and stratified timesteps), and early stopping / keep-best judged on it."""
from __future__ import annotations

import torch

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, train
from lora_core.demo.demo import make_concept_images
from lora_core.families.sd1 import DiffusersBackend
from lora_core.training.encoded import EncodedDataset
from lora_core.training.objectives import DiscreteObjective, min_snr_weight, stratified_timesteps
from lora_core.training.validation import ValidationSet, validation_images


def snapshot(network: LoRANetwork) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


def test_stratified_timesteps_cover_the_schedule_evenly() -> None:
    assert stratified_timesteps(4, 1000).tolist() == [125, 375, 625, 875]
    assert stratified_timesteps(1, 1000).tolist() == [500]


def test_min_snr_is_finite_on_a_zero_terminal_snr_schedule() -> None:
    alpha_bar = torch.tensor([0.9, 0.5, 0.0])  # ᾱ_T = 0: zero terminal SNR
    for prediction_type in ("epsilon", "v_prediction"):
        weight = min_snr_weight(alpha_bar, 5.0, prediction_type)
        assert torch.isfinite(weight).all(), prediction_type
    assert min_snr_weight(alpha_bar, 5.0, "epsilon")[-1] == 1.0  # min(SNR, γ)/SNR → 1 as SNR → 0


def test_validation_loss_is_the_same_for_the_same_weights_and_follows_them(pipeline, concept_dir) -> None:
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64))
    objective = DiscreteObjective(backend.alphas_cumprod(), backend.prediction_type)
    encoded = EncodedDataset(backend, dataset, 0, cache_text=True)
    images, held_out = validation_images(dataset, 2, seed=0)
    assert len(images) == 2 and not held_out  # 4 images: too few to hold any out
    validation = ValidationSet.build(dataset, images, held_out, objective, encoded, seed=0, timesteps_per_image=3,
                                     batch_size=4)
    assert sorted(validation.timesteps.tolist()) == sorted(stratified_timesteps(3, 1000).tolist() * 2)

    first, again = (validation.loss(objective, encoded, backend.predict) for _ in range(2))
    assert first == again  # fixed noise and timesteps: no sampling noise at all
    # by hand: the mean over (image, stratum) of the MSE against ε, with the same fixed noise
    keys = [(image, False) for image in images for _ in range(3)]
    assert validation.keys == keys
    conditioning = encoded.conditioning(keys, [dataset.examples[image].caption for image, _ in keys])
    latents, noise = encoded.stacked(keys), torch.stack(validation.noise)
    alpha_bar = backend.alphas_cumprod()[validation.timesteps].reshape(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        by_hand = ((backend.predict(noisy, validation.timesteps, conditioning) - noise) ** 2).mean().item()
    assert abs(first - by_hand) < 1e-6 * by_hand

    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.05)
    with network.applied(1.0):
        assert validation.loss(objective, encoded, backend.predict) != first


def test_a_large_dataset_holds_its_validation_images_out_of_training(pipeline, tmp_path) -> None:
    folder = make_concept_images(tmp_path / "many", count=20, resolution=64)
    dataset = ImageFolderDataset(folder, DatasetConfig(resolution=64))
    images, held_out = validation_images(dataset, 4, seed=3)
    assert held_out and len(images) == 4
    batches = dataset.batches(2, torch.Generator().manual_seed(0), exclude=images)
    seen = {image for _ in range(40) for image in next(batches).images}
    assert seen == set(range(20)) - set(images)

    backend = DiffusersBackend(pipeline)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4)
    result = train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1, seed=3,
                                                              validation_every=1))
    assert result.validation_held_out and [step for step, _ in result.validation] == [0, 1, 2]


def test_early_stopping_waits_for_the_validation_loss_and_keeps_the_weights_of_its_minimum(pipeline, tmp_path) -> None:
    """On the demo's concept, which the LoRA really learns, at a learning rate high enough to overshoot later: the
    run learns (the noisy training loss would have stopped it within its first few steps), then stops `patience`
    evaluations after the lowest validation loss and ends with the weights of that step."""
    folder = make_concept_images(tmp_path / "concept", count=8, resolution=64)
    dataset = ImageFolderDataset(folder, DatasetConfig(resolution=64, flip=True))
    backend = DiffusersBackend(pipeline)
    network = LoRANetwork.create(backend.adapter_targets("transformer", False), rank=8)
    patience, every = 3, 5
    config = TrainingConfig(steps=60, learning_rate=0.03, batch_size=2, gradient_accumulation=1, seed=0,
                            validation_every=every, validation_images=2, validation_timesteps=2,
                            early_stopping_patience=patience)
    states = {0: snapshot(network)}
    result = train(backend, network, dataset, config,
                   callback=lambda report: states.__setitem__(report.step, snapshot(network)))

    losses = dict(result.validation)
    assert sorted(losses) == list(range(0, result.steps + 1, every))
    assert result.best_loss == min(losses.values()) < 0.9 * losses[0]  # it learned, by the validation loss
    assert result.best_step >= 2 * every  # the lowest loss came after a few evaluations, not from the first values
    assert result.stop_reason == "early_stopping" and result.steps == result.best_step + patience * every
    assert all(torch.equal(value, states[result.best_step][key]) for key, value in network.state_dict().items())
