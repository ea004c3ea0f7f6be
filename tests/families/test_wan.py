"""Wan (2.1 / 2.2 text-to-video) in lora_core on a tiny diffusers WanPipeline: the objective against its UniPC flow
scheduler, the denoiser call and prompt against the pipeline's own on video latents, training on a dataset of clips
and images, strength 0, clip lengths, and the file (diffusion-pipe's layout over Wan's own names) read back by
lora_core, diffusers' `load_lora_weights` and ComfyUI 0.3.64's core Load LoRA; musubi-tuner's and diffusers' layouts
load too."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from support.clips import write_clip
from support.family_checks import check_gradient_checkpointing_recomputes_the_same_training
from support.tiny_flow_models import COMFYUI, comfy_reads, concept_images, randomized
from support.tiny_wan import TEXT_WIDTH, build_tiny_wan

from lora_core import load_file
from lora_core.data.config import DatasetConfig
from lora_core.data.dataset import ImageFolderDataset
from lora_core.families.wan import WanBackend
from lora_core.formats.files import load_lora, save_lora
from lora_core.network import LoRANetwork, grouped_by_module
from lora_core.training.config import TrainingConfig, TrainingError
from lora_core.training.loop import train

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a video of sks"
COMFY_WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": 32, "num_heads": 2, "num_layers": 2, "ffn_dim": 64,
             "in_dim": 16, "out_dim": 16, "text_dim": TEXT_WIDTH, "freq_dim": 32, "patch_size": [1, 2, 2]}


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan(seed=0)


def clips_and_images(folder: Path) -> Path:
    """Four 9-frame clips of a moving red circle (mp4) and two images, all captioned."""
    for index in range(4):
        write_clip(folder / f"clip_{index}.mp4", 9)
    concept_images(folder, 2, size=32)
    return folder


def test_objective_noises_and_times_as_the_unipc_flow_scheduler(wan) -> None:
    """x_σ = UniPC's add_noise at its shifted sigmas, the time input σ·1000 (the scheduler's timesteps are its int64
    floor), the target ε − x0 on 5-D video latents, and σ drawn logit-normal with the scheduler's flow_shift."""
    scheduler = wan.scheduler
    objective = WanBackend(wan).objective(TrainingConfig())
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 16, 3, 4, 4, generator=generator), torch.randn(2, 16, 3, 4, 4, generator=generator)
    scheduler.set_timesteps(4)
    seen = {}

    def predict(noisy, times):
        seen.update(noisy=noisy, times=times)
        return torch.zeros_like(noisy)

    loss = objective.loss(predict, latents, noise, scheduler.sigmas[[1, 2]])
    timesteps = scheduler.timesteps[[1, 2]]
    torch.testing.assert_close(seen["noisy"], scheduler.add_noise(latents, noise, timesteps), rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["times"].long(), timesteps, rtol=0, atol=0)
    torch.testing.assert_close(seen["times"], scheduler.sigmas[[1, 2]] * 1000)
    torch.testing.assert_close(loss, ((noise - latents) ** 2).mean(dim=(1, 2, 3, 4)))
    _, sigmas = objective.draw((3, 16, 3, 4, 4), torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    torch.randn((3, 16, 3, 4, 4), generator=replay)
    raw = torch.sigmoid(torch.normal(0.0, 1.0, (3,), generator=replay))
    shift = scheduler.config.flow_shift
    torch.testing.assert_close(sigmas, shift * raw / (1 + (shift - 1) * raw))


def test_prompt_and_velocity_are_the_pipelines_first_step_on_a_clip(wan) -> None:
    """The pipeline's first step on 5 frames of 32×32: `encode_text` is the prompt states it passes (umT5, zero-padded
    to 512), and `predict` on its latents and time is the transformer's output."""
    backend = WanBackend(wan)
    calls = []
    hook = wan.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                 with_kwargs=True)
    try:
        wan(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
            output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    inputs, output = calls[0]
    assert inputs["hidden_states"].shape == (1, 16, 2, 4, 4)
    with torch.no_grad():
        text = backend.encode_text([PROMPT])
        torch.testing.assert_close(text["context"], inputs["encoder_hidden_states"], rtol=0, atol=0)
        assert text["context"].shape[1] == 512
        ours = backend.predict(inputs["hidden_states"], inputs["timestep"].float(), text)
    torch.testing.assert_close(ours, output, rtol=0, atol=1e-6)


def test_ti2v_5b_trains_as_text_to_video_with_the_pipelines_time_per_token(tmp_path) -> None:
    """Wan 2.2 TI2V 5B (the 2.2 VAE: 48 latent channels at 16×; WanPipeline's expand_timesteps): `predict` is the
    pipeline's first step, whose time input is one value per latent token; a 5-frame clip of 64² px is 2 latent
    frames of 4×4; training on clips and images lowers the validation loss."""
    pipeline = build_tiny_wan(seed=0, ti2v=True)
    backend = WanBackend(pipeline)
    calls = []
    hook = pipeline.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                      with_kwargs=True)
    try:
        pipeline(PROMPT, height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    inputs, output = calls[0]
    assert inputs["hidden_states"].shape == (1, 48, 2, 4, 4) and inputs["timestep"].shape == (1, 2 * 2 * 2)
    with torch.no_grad():
        ours = backend.predict(inputs["hidden_states"], inputs["timestep"][:, 0], backend.encode_text([PROMPT]))
        latents = backend.encode_images(torch.rand(1, 3, 5, 64, 64) * 2 - 1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, output, rtol=0, atol=1e-6)
    assert latents.shape == (1, 48, 2, 4, 4)
    for index in range(4):
        write_clip(tmp_path / "data" / f"clip_{index}.mp4", 9, size=64)
    concept_images(tmp_path / "data", 2, size=64)
    dataset = ImageFolderDataset(tmp_path / "data", DatasetConfig(resolution=64, frames=5))
    network = LoRANetwork.create(backend.adapter_targets("transformer", False), "lora", 4, 4)
    result = train(backend, network, dataset, TrainingConfig(
        steps=30, learning_rate=1e-2, gradient_accumulation=1, validation_every=30, validation_timesteps=4))
    (_, before), (_, after) = result.validation
    print(f"wan ti2v validation loss {before:.4f} -> {after:.4f}")  # 3.06 -> 2.72 here
    assert after < 0.95 * before


def test_clips_are_encoded_as_the_pipelines_decode_undoes_them(wan) -> None:
    """The pipeline decodes z·std + mean: `encode_images` of a clip (and of an image, as one frame) is the VAE's
    sample normalized so, 4k+1 frames to k+1 latent frames."""
    backend = WanBackend(wan)
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = backend.encode_images(clip, torch.Generator().manual_seed(3))
        sample = wan.vae.encode(clip).latent_dist.sample(generator=torch.Generator().manual_seed(3))
        image = backend.encode_images(clip[:, :, 0], torch.Generator().manual_seed(3))
    config = wan.vae.config
    undone = ours * torch.tensor(config.latents_std).view(1, -1, 1, 1, 1) + torch.tensor(config.latents_mean).view(
        1, -1, 1, 1, 1)
    torch.testing.assert_close(undone, sample, rtol=1e-5, atol=1e-5)
    assert ours.shape == (1, 16, 2, 4, 4) and image.shape == (1, 16, 1, 4, 4)


def test_training_on_clips_and_images_lowers_the_loss_and_strength_zero_is_the_base(wan, tmp_path) -> None:
    backend = WanBackend(wan)
    dataset = ImageFolderDataset(clips_and_images(tmp_path / "data"), DatasetConfig(resolution=32, frames=5))
    assert sorted({example.frames for example in dataset.examples}) == [1, 5]
    network = LoRANetwork.create(backend.adapter_targets("transformer", False), "lora", 4, 4)
    result = train(backend, network, dataset, TrainingConfig(
        steps=30, learning_rate=1e-2, gradient_accumulation=1, validation_every=30, validation_timesteps=4))
    (_, before), (_, after) = result.validation
    print(f"wan validation loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = backend.encode_text([PROMPT])
        with network.applied(0.0):
            zero = backend.predict(latents, torch.tensor([500.0]), text)
        with network.applied(1.0):
            one = backend.predict(latents, torch.tensor([500.0]), text)
        base = backend.predict(latents, torch.tensor([500.0]), text)
    assert torch.equal(zero, base) and not torch.equal(one, base)


def test_clip_lengths_the_model_cannot_take_are_refused_by_name(wan, tmp_path) -> None:
    """Wan takes 4k+1 frames: a dataset of 4-frame clips is refused, naming the lengths that would train; an image
    model refuses clips."""
    from support.tiny_qwen_image import build_tiny_qwen_image

    for index in range(2):
        write_clip(tmp_path / f"clip_{index}.mp4", 9)
    dataset = ImageFolderDataset(tmp_path, DatasetConfig(resolution=32, frames=4))
    backend = WanBackend(wan)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4)
    with pytest.raises(TrainingError, match=r"takes clips of 4k\+1 frames .* have 4: set frames to 1 or 5"):
        train(backend, network, dataset, TrainingConfig(steps=1, validation_every=0))
    with pytest.raises(TrainingError, match="Qwen-Image is an image model"):
        train(build_qwen_backend(build_tiny_qwen_image), network, dataset, TrainingConfig(steps=1, validation_every=0))


def build_qwen_backend(build):
    from lora_core.families.qwen_image import QwenImageBackend

    return QwenImageBackend(build(seed=0))


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_file_round_trips_exactly_in_wans_own_names(wan, tmp_path, algorithm: str) -> None:
    backend = WanBackend(wan)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
    save_lora(tmp_path / "wan.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    tensors, _ = load_file(tmp_path / "wan.safetensors")
    assert all(key.startswith("diffusion_model.blocks.") for key in tensors)
    assert any(key.startswith("diffusion_model.blocks.0.self_attn.q.") for key in tensors)
    assert not any(".attn1." in key or ".ffn.net." in key for key in tensors)
    loaded, _ = load_lora(tmp_path / "wan.safetensors", backend.loadable_modules(),
                          network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["musubi", "diffusers"])
def test_musubi_tuners_and_diffusers_layouts_load_to_the_same_delta_w(wan, tmp_path, layout: str) -> None:
    """musubi-tuner's `lora_unet_blocks_0_self_attn_q.lora_down/up/alpha` and diffusers' `transformer.blocks.0.attn1.
    to_q.lora_A/B` (alpha folded) name the same layers as our file."""
    backend = WanBackend(wan)
    network = randomized(LoRANetwork.create(backend.adapter_targets("transformer", False), "lora", 4, 2))
    ours = backend.file_tensors(network.kohya_tensors())
    other = {}
    for name, parts in grouped_by_module(network.kohya_tensors()).items():
        wan_name = backend.file_names[name].removeprefix("diffusion_model.")
        if layout == "musubi":
            other |= {f"lora_unet_{wan_name.replace('.', '_')}.{suffix}": value for suffix, value in parts.items()}
        else:
            path = name.removeprefix("lora_unet_")
            module = next(path_ for path_, _ in wan.transformer.named_modules() if path_.replace(".", "_") == path)
            other[f"transformer.{module}.lora_A.weight"] = parts["lora_down.weight"]
            other[f"transformer.{module}.lora_B.weight"] = ours[f"{backend.file_names[name]}.lora_B.weight"]
    save_file(other, tmp_path / "other.safetensors")
    loaded, _ = load_lora(tmp_path / "other.safetensors", backend.loadable_modules(),
                          network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["attention", "full"])
def test_diffusers_reads_the_file_with_every_module_applied(tmp_path, preset: str) -> None:
    """diffusers' `load_lora_weights` (its Wan converter of `diffusion_model.` files) loads every key of the file,
    whatever the preset, and the transformer predicts as lora_core's network at strength 1."""
    pipeline = build_tiny_wan(seed=0)
    backend = WanBackend(pipeline)
    network = randomized(LoRANetwork.create(backend.adapter_targets(preset, False), "lora", 4, 2))
    path = save_lora(tmp_path / "wan.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    text = backend.encode_text([PROMPT])
    with torch.no_grad(), network.applied(1.0):
        ours = backend.predict(latents, torch.tensor([400.0]), text)
    pipeline.load_lora_weights(str(path))
    adapted = [name for name, module in pipeline.transformer.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == len(network.adapters)
    with torch.no_grad():
        theirs = backend.predict(latents, torch.tensor([400.0]), text)
        pipeline.unload_lora_weights()
        base = backend.predict(latents, torch.tensor([400.0]), text)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 100 * (theirs - ours).abs().max()


@pytest.mark.skipif(not (COMFYUI / "comfy").is_dir(), reason="ComfyUI 0.3.64 (scripts/setup_comfyui.sh)")
def test_comfyui_maps_and_applies_every_module_of_the_file(wan, tmp_path) -> None:
    backend = WanBackend(wan)
    files, counts = [], []
    for algorithm in ("lora", "loha", "lokr"):
        network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
        files.append(tmp_path / f"{algorithm}.safetensors")
        save_lora(files[-1], network, {}, "float32", file_tensors=backend.file_tensors)
        counts.append(len(network.adapters))
    for report, count in zip(comfy_reads("WAN21_T2V", COMFY_WAN, files), counts):
        assert report["not_loaded"] == [] and report["errors"] == [] and report["unchanged"] == []
        assert report["patches"] == count


def test_cli_trains_a_saved_wan_base_on_clips(wan, tmp_path) -> None:
    """The CLI trains a saved WanPipeline on clips and images (--frames 5), writes the file in Wan's names and its
    sample as an animated WEBP of 5 frames at 16 fps."""
    wan.save_pretrained(tmp_path / "base")
    out = tmp_path / "wan.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "lora_core", "train", "--base", str(tmp_path / "base"), "--data",
         str(clips_and_images(tmp_path / "data")), "--frames", "5", "--out", str(out), "--steps", "20",
         "--resolution", "32", "--rank", "4", "--lr", "1e-2", "--gradient-accumulation", "1", "--validation-every",
         "20", "--sample-every", "20", "--sample-steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["best_step"] == 20, "the validation loss must fall"
    assert all(key.startswith("diffusion_model.blocks.") for key in load_file(out)[0])
    with Image.open(tmp_path / "wan-sample-step00000020-0.webp") as sample:  # the sample: a clip of the dataset's 5
        sample.load()
        assert sample.n_frames == 5 and sample.info["duration"] == round(1000 / 16)


def test_gradient_checkpointing_recomputes_the_same_training(wan, tmp_path) -> None:
    check_gradient_checkpointing_recomputes_the_same_training(WanBackend(wan), tmp_path)


def test_a14b_experts_each_train_their_own_transformer_on_their_side_of_the_boundary(tmp_path) -> None:
    """Wan 2.2 A14B's layout (transformer for σ ≥ 0.875, transformer_2 below, as the pipeline switches): the backend
    refuses to guess the expert; each expert's network adapts its own transformer, and its σ are the shifted
    distribution restricted to its side (same quantiles as unrestricted draws that fall there); validation σ lie
    there too; min_sigma / max_sigma set another range, and min_sigma ≥ max_sigma is refused."""
    pair = build_tiny_wan(seed=0, experts=True)
    with pytest.raises(ValueError, match="two experts split at σ 0.875: choose wan_expert high"):
        WanBackend(pair)
    with pytest.raises(ValueError, match="has one: leave it unset"):
        WanBackend(build_tiny_wan(seed=0), expert="low")
    unrestricted = WanBackend(build_tiny_wan(seed=0)).objective(TrainingConfig()).draw(
        (20000, 1), torch.Generator().manual_seed(0))[1]
    for expert, inside in (("high", lambda sigma: sigma >= 0.875), ("low", lambda sigma: sigma <= 0.875)):
        backend = WanBackend(pair, expert=expert)
        expected = pair.transformer if expert == "high" else pair.transformer_2
        layers = {id(module) for module in backend.adapter_targets("attention", False).values()}
        assert layers <= {id(module) for module in expected.modules()}
        objective = backend.objective(TrainingConfig())
        _, sigmas = objective.draw((20000, 1), torch.Generator().manual_seed(1))
        assert bool(inside(sigmas).all()) and bool(inside(objective.stratified(4)).all())
        reference = unrestricted[inside(unrestricted)]
        quantiles = torch.tensor([0.1, 0.5, 0.9])
        torch.testing.assert_close(sigmas.quantile(quantiles), reference.quantile(quantiles), rtol=0, atol=0.01)
    ranged = WanBackend(pair, expert="high").objective(TrainingConfig(min_sigma=0.95))
    assert bool((ranged.draw((500, 1), torch.Generator().manual_seed(2))[1] >= 0.95).all())
    with pytest.raises(TrainingError, match="min_sigma = 0.9 is out of range: use a value below max_sigma"):
        TrainingConfig(min_sigma=0.9, max_sigma=0.5).validate()
