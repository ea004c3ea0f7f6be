"""The training loop on the tiny real pipeline: objective, accumulation, determinism, stopping, safety."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from lora_core import (
    DatasetConfig,
    ImageFolderDataset,
    LoRANetwork,
    TrainingConfig,
    TrainingDiverged,
    TrainingError,
    kohya_metadata,
    save_lora,
    train,
)
from lora_core.families.sd1 import DiffusersBackend
from lora_core.training.encoded import EncodedDataset
from lora_core.training.loop import diffusion_loss
from lora_core.training.objectives import DiscreteObjective, min_snr_weight, noised_and_target
from lora_core.training.optim import OptimizerError, make_optimizer, make_scheduler


def setup(pipeline, concept_dir, **network_options):
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4, **network_options)
    return backend, dataset, network


def snapshot(network: LoRANetwork) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_and_targets_equal_the_schedulers(prediction_type: str) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([1, 400, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    noisy, target = noised_and_target(latents, noise, alpha_bar, prediction_type)
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, timesteps))
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(target, expected)

    snr = compute_snr(scheduler, timesteps)
    reference = torch.stack([snr, 5 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    reference = reference / snr if prediction_type == "epsilon" else reference / (snr + 1)
    torch.testing.assert_close(min_snr_weight(alpha_bar.flatten(), 5.0, prediction_type), reference)


def test_accumulated_step_applies_the_mean_gradient(pipeline, concept_dir) -> None:
    backend, dataset, network = setup(pipeline, concept_dir)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.01)  # non-zero up weights, so every parameter gets a gradient
    config = TrainingConfig(steps=1, learning_rate=0.5, batch_size=1, gradient_accumulation=3, optimizer="SGD",
                            max_grad_norm=0.0, seed=7)
    before = snapshot(network)

    expected_grads = []
    encoded = EncodedDataset(backend, dataset, config.seed, cache_text=True)
    generator = torch.Generator().manual_seed(config.seed)
    batches = dataset.batches(1, torch.Generator().manual_seed(config.seed + 1))
    objective = DiscreteObjective(backend.alphas_cumprod(), backend.prediction_type)
    with network.applied(1.0):
        for _ in range(3):
            network.zero_grad()
            batch = next(batches)
            latents, conditioning = encoded.batch_latents(batch), encoded.batch_conditioning(batch)
            diffusion_loss(backend, objective, latents, conditioning, generator).backward()
            expected_grads.append({k: p.grad.clone() for k, p in network.named_parameters()})
    network.zero_grad()
    train(backend, network, dataset, config)
    for key, parameter in network.named_parameters():
        mean_grad = sum(grads[key] for grads in expected_grads) / 3
        torch.testing.assert_close(parameter.detach(), before[key] - 0.5 * mean_grad, rtol=1e-5, atol=1e-7)


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path, concept_dir, monkeypatch) -> None:
    from lora_core.demo.tiny_model import build_tiny_pipeline

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    files = []
    for index, seed in enumerate((1, 1, 2)):
        backend, dataset, network = setup(build_tiny_pipeline(0), concept_dir, seed=seed)
        config = TrainingConfig(steps=3, learning_rate=1e-3, gradient_accumulation=2, seed=seed)
        result = train(backend, network, dataset, config)
        metadata = kohya_metadata(network, training={**config.metadata(), "steps": result.steps})
        files.append(save_lora(tmp_path / f"{index}.safetensors", network, metadata).read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]


def test_training_leaves_the_base_model_as_it_was(pipeline, concept_dir) -> None:
    backend, dataset, network = setup(pipeline, concept_dir)
    pipeline.vae.requires_grad_(True)
    pipeline.unet.requires_grad_(False)
    flags = {id(p): p.requires_grad for m in backend.frozen_modules() for p in m.parameters()}
    weights = copy.deepcopy(pipeline.unet.state_dict())
    with torch.inference_mode():  # as ComfyUI runs every node
        result = train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1))
    assert result.steps == 2 and result.stop_reason == "completed"
    assert all(p.requires_grad == flags[id(p)] for m in backend.frozen_modules() for p in m.parameters())
    assert all(p.grad is None for m in backend.frozen_modules() for p in m.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in pipeline.unet.state_dict().items())
    assert not any(adapter.attached for _, adapter in network.items())
    assert all(p.dtype == torch.float32 for p in network.parameters())


class AttentionRecordingBackend(DiffusersBackend):
    """The real backend, recording whether PyTorch may pick cuDNN's attention kernels each time it predicts."""

    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        self.cudnn_attention: list[bool] = []

    def predict(self, noisy_latents, timesteps, conditioning):
        self.cudnn_attention.append(torch.backends.cuda.cudnn_sdp_enabled())
        return super().predict(noisy_latents, timesteps, conditioning)


def test_training_leaves_cudnn_attention_off_and_restores_the_setting(pipeline, concept_dir) -> None:
    """cuDNN's attention backward failed on Flux.1 at 1024 px on an H200 (bench/results/h200_flux_*.json)."""
    _, dataset, network = setup(pipeline, concept_dir)
    backend = AttentionRecordingBackend(pipeline)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1))
    assert backend.cudnn_attention and not any(backend.cudnn_attention)
    assert torch.backends.cuda.cudnn_sdp_enabled()


class PoisonedBackend(DiffusersBackend):
    """The real backend, whose prediction turns NaN from a given call on (as an fp16 overflow would)."""

    def __init__(self, pipeline, poison_from_call: int) -> None:
        super().__init__(pipeline)
        self.calls, self.poison_from_call = 0, poison_from_call

    def predict(self, noisy_latents, timesteps, conditioning):
        self.calls += 1
        prediction = super().predict(noisy_latents, timesteps, conditioning)
        return prediction * float("nan") if self.calls >= self.poison_from_call else prediction


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_weights(pipeline, concept_dir) -> None:
    _, dataset, network = setup(pipeline, concept_dir)
    backend = PoisonedBackend(pipeline, poison_from_call=3)
    states = []
    with pytest.raises(TrainingDiverged, match="loss became NaN or infinite at step 3.*weights of step 2.*learning rate") as caught:
        train(backend, network, dataset, TrainingConfig(steps=10, gradient_accumulation=1, learning_rate=1e-2,
                                                        validation_every=0),  # predictions counted: training's only
              callback=lambda report: states.append(snapshot(network)))
    assert caught.value.result.steps == 2 and caught.value.result.stop_reason == "diverged"
    assert all(torch.equal(value, states[-1][key]) for key, value in network.state_dict().items())


def test_callback_can_cancel(pipeline, concept_dir) -> None:
    backend, dataset, network = setup(pipeline, concept_dir)
    result = train(backend, network, dataset, TrainingConfig(steps=50, gradient_accumulation=1),
                   callback=lambda report: report.step < 2 and None)
    assert result.steps == 2 and result.stop_reason == "cancelled"


def test_out_of_range_settings_are_clear_errors(pipeline, concept_dir) -> None:
    backend, dataset, network = setup(pipeline, concept_dir)
    with pytest.raises(TrainingError, match=r"steps = 0 is out of range: use a whole number ≥ 1"):
        train(backend, network, dataset, TrainingConfig(steps=0))
    with pytest.raises(TrainingError, match="learning_rate"):
        train(backend, network, dataset, TrainingConfig(learning_rate=-1))
    with pytest.raises(OptimizerError, match="unknown optimizer 'Adamm'.*AdamW"):
        make_optimizer("Adamm", network.parameters(), 1e-4)
    with pytest.raises(OptimizerError, match="lr warmup steps must be from 0 to 9"):
        make_scheduler("constant", make_optimizer("AdamW", network.parameters(), 1e-4), 10, warmup_steps=10)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "polynomial", "cosine_with_restarts"])
def test_schedules_warm_up_linearly_then_follow_their_shape(name: str) -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer("SGD", [parameter], lr=1.0)
    scheduler = make_scheduler(name, optimizer, total_steps=10, warmup_steps=4)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    if name == "constant":
        assert rates[5:] == pytest.approx([1.0] * 5)
    else:
        assert all(later < earlier for earlier, later in zip(rates[4:], rates[5:]))


class CountingBackend(DiffusersBackend):
    """The real backend, counting VAE and text-encoder calls."""

    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        self.image_calls = self.text_calls = 0

    def encode_images(self, pixels, generator):
        self.image_calls += 1
        return super().encode_images(pixels, generator)

    def encode_text(self, captions):
        self.text_calls += 1
        return super().encode_text(captions)


def test_vae_and_frozen_text_encoder_run_once_per_image_and_caption(pipeline, concept_dir) -> None:
    backend = CountingBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64, flip=True))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4)
    train(backend, network, dataset, TrainingConfig(steps=6, batch_size=2, gradient_accumulation=2))
    captions = {example.caption for example in dataset.examples}
    assert backend.image_calls == 2 * dataset.num_images  # each image, plain and mirrored, over 24 drawn examples
    assert backend.text_calls == len(captions) == 2


def test_cosine_with_restarts_has_its_cycles_and_polynomial_its_power() -> None:
    def rates(name: str, **options) -> list[float]:
        optimizer = make_optimizer("SGD", [torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_scheduler(name, optimizer, total_steps=8, **options)
        values = []
        for _ in range(8):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    cosine, restarts = rates("cosine"), rates("cosine_with_restarts", cycles=2)
    assert restarts[:4] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert restarts[4] == 1.0 and restarts != cosine  # the second cycle starts from the peak again
    assert rates("polynomial", power=2.0) == pytest.approx([(1 - k / 8) ** 2 for k in range(8)])
    with pytest.raises(OptimizerError, match="cycles = 3.*only with cosine_with_restarts"):
        rates("cosine", cycles=3)
    with pytest.raises(OptimizerError, match="power = 2.0.*only with polynomial"):
        rates("linear", power=2.0)


@pytest.mark.parametrize(("optimizer", "message"), [
    ("LBFGS", "cannot train a LoRA: it needs a closure"), ("SparseAdam", "cannot train a LoRA: it takes only sparse"),
])
def test_optimizers_that_cannot_train_a_lora_are_refused_before_training(pipeline, concept_dir, optimizer,
                                                                          message) -> None:
    backend, dataset, network = setup(pipeline, concept_dir)
    with pytest.raises(OptimizerError, match=message):
        train(backend, network, dataset, TrainingConfig(steps=1, optimizer=optimizer))


def test_learning_rate_ranges_are_per_optimizer(pipeline, concept_dir) -> None:
    backend, dataset, network = setup(pipeline, concept_dir)
    with pytest.raises(TrainingError, match="learning_rate = 1.0 is out of range for AdamW.*below 1"):
        train(backend, network, dataset, TrainingConfig(steps=1, learning_rate=1.0))
    with pytest.raises(TrainingError, match="learning_rate = 20.0 is out of range for Prodigy.*use 1.0"):
        train(backend, network, dataset, TrainingConfig(steps=1, optimizer="Prodigy", learning_rate=20.0))
