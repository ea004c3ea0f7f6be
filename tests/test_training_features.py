"""Training features users rely on: resume, samples, text-encoder LoRA, buckets, captions, caching, memory, QLoRA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, train
from lora_core.checkpoints import Checkpointer, load_state, state_path
from lora_core.dataset import augment_caption, bucket_sizes
from lora_core.diffusers_backend import DiffusersBackend
from lora_core.files import tensor_bytes
from lora_core.tiny_model import build_tiny_pipeline
from lora_core.encoded import EncodedDataset
from lora_core.objectives import DiscreteObjective
from lora_core.training import TrainingError, diffusion_loss, parameter_groups


def snapshot(network: LoRANetwork) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


def make(pipeline, concept_dir, text_encoder=False, **dataset_options):
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64, **dataset_options))
    network = LoRANetwork.create(backend.adapter_targets("attention", text_encoder), rank=4, seed=1)
    return backend, dataset, network


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


def test_text_encoder_lora_trains_with_its_own_learning_rate(pipeline, concept_dir) -> None:
    backend, dataset, network = make(pipeline, concept_dir, text_encoder=True)
    groups = parameter_groups(network, TrainingConfig(learning_rate=1e-3, text_encoder_lr=5e-5))
    assert [group["lr"] for group in groups] == [1e-3, 5e-5]
    before = snapshot(network)
    ids = pipeline.tokenizer(["a photo of sks"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        text_before = pipeline.text_encoder(ids)[0]
    train(backend, network, dataset, TrainingConfig(steps=3, gradient_accumulation=1, learning_rate=1e-2,
                                                     text_encoder_lr=1e-2))
    changed = {name for name, value in network.state_dict().items() if not torch.equal(value, before[name])}
    assert any(name.startswith("adapters.lora_te_") for name in changed)
    assert any(name.startswith("adapters.lora_unet_") for name in changed)
    with torch.no_grad(), network.applied(1.0):
        assert not torch.allclose(pipeline.text_encoder(ids)[0], text_before, atol=1e-5)

    frozen_text = {name: p.detach().clone() for name, p in network.named_parameters()}
    train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1, learning_rate=1e-2,
                                                     text_encoder_lr=0.0))
    unchanged = {name for name, p in network.named_parameters() if torch.equal(p, frozen_text[name])}
    assert {name for name in frozen_text if name.startswith("adapters.lora_te_")} <= unchanged
    assert not any(name.startswith("adapters.lora_unet_") for name in unchanged)


def test_buckets_train_mixed_aspect_images_in_one_shape_per_batch(pipeline, tmp_path) -> None:
    sizes = [(192, 128), (120, 180), (100, 100), (200, 130), (128, 192), (90, 90)]
    for index, (width, height) in enumerate(sizes):
        image = Image.new("RGB", (width, height), (200, 30, 30))
        image.paste((30, 30, 200), (width // 2, 0, width, height))  # left half red, right half blue
        image.save(tmp_path / f"{index}.png")
    config = DatasetConfig(resolution=128, bucketing=True, min_bucket_size=64, max_bucket_size=256, bucket_step=32)
    dataset = ImageFolderDataset(tmp_path, config)
    assert all(w * h <= 128 * 128 and w % 32 == 0 and h % 32 == 0 for w, h in bucket_sizes(config))
    assert [example.bucket for example in dataset.examples] == [
        (160, 96), (96, 160), (128, 128), (160, 96), (96, 160), (128, 128)]
    for example, (width, height) in zip(dataset.examples, sizes):
        bucket_width, bucket_height = example.bucket
        assert abs(bucket_width / bucket_height - width / height) < 0.2  # the nearest of 32-px steps
        pixels = example.pixels  # covered and centre-cropped: both halves reach the edges, the border in the middle
        assert pixels[0, :, 0].min() > 150 and pixels[2, :, -1].min() > 150
        border = int((pixels[0, bucket_height // 2] > 115).sum())
        assert abs(border - bucket_width / 2) <= 2
    batches = dataset.batches(2, torch.Generator().manual_seed(0))
    for _ in range(12):
        batch = next(batches)
        assert len({dataset.examples[image].bucket for image in batch.images}) == 1

    backend = DiffusersBackend(pipeline)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4)
    result = train(backend, network, dataset, TrainingConfig(steps=6, batch_size=2, gradient_accumulation=1))
    assert result.steps == 6 and np.isfinite(result.losses).all()


def test_caption_augmentation_keeps_leading_tags_and_drops_as_asked() -> None:
    caption = "sks, red, circle, white, background"
    generator = torch.Generator().manual_seed(0)
    shuffled = {augment_caption(caption, DatasetConfig(shuffle_tags=True, keep_tokens=1), generator) for _ in range(30)}
    assert len(shuffled) > 5 and all(c.startswith("sks, ") and sorted(c.split(", ")) == sorted(caption.split(", "))
                                     for c in shuffled)
    assert augment_caption(caption, DatasetConfig(caption_dropout=1.0), generator) == ""
    assert augment_caption(caption, DatasetConfig(tag_dropout=1.0, keep_tokens=2), generator) == "sks, red"
    first = augment_caption(caption, DatasetConfig(shuffle_tags=True), torch.Generator().manual_seed(3))
    assert first == augment_caption(caption, DatasetConfig(shuffle_tags=True), torch.Generator().manual_seed(3))


class CountingVAE(DiffusersBackend):
    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        self.vae_calls = 0

    def encode_images(self, pixels, generator):
        self.vae_calls += 1
        return super().encode_images(pixels, generator)


def test_latent_cache_on_disk_skips_the_vae_and_changes_nothing(pipeline, concept_dir, tmp_path) -> None:
    config = dict(steps=3, gradient_accumulation=1, seed=2)
    losses, calls = [], []
    for cache in (None, tmp_path / "latents", tmp_path / "latents"):
        backend = CountingVAE(pipeline)
        dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64, flip=True))
        network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4, seed=1)
        result = train(backend, network, dataset,
                       TrainingConfig(**config, latent_cache_dir=str(cache) if cache else None))
        losses.append(result.losses)
        calls.append(backend.vae_calls)
    distinct = {tensor_bytes(dataset.image_pixels(i, flip)) for i in range(dataset.num_images) for flip in (0, 1)}
    assert calls == [2 * dataset.num_images, len(distinct), 0]  # identical pixels share one cached latent
    assert losses[0] == losses[1] == losses[2]
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == len(distinct)


def saved_activation_bytes(backend, network, dataset, checkpointing: bool) -> tuple[int, float]:
    """Bytes autograd keeps for backward in one training forward, and the loss."""
    from lora_core.training import checkpointed

    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    encoded = EncodedDataset(backend, dataset, 0, cache_text=True)
    batch = next(dataset.batches(2, torch.Generator().manual_seed(0)))
    objective = DiscreteObjective(backend.alphas_cumprod(), backend.prediction_type)
    with network.applied(1.0), checkpointed(backend.checkpoint_blocks() if checkpointing else []):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = diffusion_loss(backend, objective, encoded.batch_latents(batch), encoded.batch_conditioning(batch),
                                  torch.Generator().manual_seed(0))
        loss.backward()
    return sum(saved), loss.item()


def test_gradient_checkpointing_keeps_less_for_backward_and_the_same_loss(pipeline, concept_dir) -> None:
    backend, dataset, network = make(pipeline, concept_dir)
    plain_bytes, plain_loss = saved_activation_bytes(backend, network, dataset, checkpointing=False)
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    network.zero_grad()
    checkpointed_bytes, checkpointed_loss = saved_activation_bytes(backend, network, dataset, checkpointing=True)
    assert checkpointed_bytes < 0.5 * plain_bytes
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, parameter in network.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-7)

    result = train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1,
                                                              gradient_checkpointing=True))
    assert result.steps == 2 and not any("forward" in block.__dict__ for block in backend.checkpoint_blocks())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_adapters_and_a_close_loss(pipeline, concept_dir, precision: str) -> None:
    losses = {}
    for mode in ("no", precision):
        backend, dataset, network = make(pipeline, concept_dir)
        result = train(backend, network, dataset, TrainingConfig(steps=3, gradient_accumulation=1, seed=5,
                                                                  mixed_precision=mode))
        losses[mode] = result.losses
        assert all(p.dtype == torch.float32 for p in network.parameters())
    assert np.isfinite(losses[precision]).all()
    assert losses[precision] == pytest.approx(losses["no"], rel=0.05)


@pytest.mark.parametrize("optimizer", ["Lion", "Prodigy", "AdamW8bit"])
def test_optimizers_users_ask_for_train(pipeline, concept_dir, optimizer: str) -> None:
    backend, dataset, network = make(pipeline, concept_dir)
    before = snapshot(network)
    lr = 1.0 if optimizer == "Prodigy" else 1e-3  # Prodigy estimates its step size: lr 1.0 is its usual setting
    result = train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1, optimizer=optimizer,
                                                              learning_rate=lr))
    assert np.isfinite(result.losses).all()
    assert any(not torch.equal(v, before[k]) for k, v in network.state_dict().items())


def test_qlora_trains_fp32_adapters_over_a_4bit_base(concept_dir) -> None:
    from lora_core.quantize import quantize_linear_layers

    pipeline = build_tiny_pipeline(0)
    full_bytes = sum(m.weight.numel() * m.weight.element_size() for m in pipeline.unet.modules()
                     if isinstance(m, torch.nn.Linear))
    assert quantize_linear_layers(pipeline.unet) > 0
    quantized = [m for m in pipeline.unet.modules() if type(m).__name__ == "Linear4bit"]
    packed_bytes = sum(m.weight.numel() * m.weight.element_size() for m in quantized)
    assert packed_bytes < 0.2 * full_bytes
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64))
    for algorithm in ("lora", "dora"):
        network = LoRANetwork.create(backend.adapter_targets("attention", False), algorithm, rank=4)
        before = snapshot(network)
        result = train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1,
                                                                  learning_rate=1e-3))
        assert np.isfinite(result.losses).all() and all(p.dtype == torch.float32 for p in network.parameters())
        assert any(not torch.equal(v, before[k]) for k, v in network.state_dict().items())
