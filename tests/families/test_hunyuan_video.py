"""HunyuanVideo in lora_core on a tiny diffusers HunyuanVideoPipeline: the objective against its FlowMatchEuler
scheduler, the prompt and denoiser call against the pipeline's first step on a clip, latents as its decode undoes them,
training on clips and images, strength 0, and the file (diffusion-pipe's layout over HunyuanVideo's own names, q/k/v
fused exactly) read back by lora_core, diffusers' `load_lora_weights` and ComfyUI 0.3.64's core Load LoRA;
musubi-tuner's and diffusers' layouts load too."""
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
from support.family_checks import (
    check_gradient_checkpointing_recomputes_the_same_training,
)
from support.tiny_flow_models import (
    CLIP_WIDTH,
    COMFYUI,
    comfy_reads,
    concept_images,
    randomized,
)
from support.tiny_hunyuan_video import LLAMA_WIDTH, build_tiny_hunyuan_video

from lora_core import load_file
from lora_core.data.config import DatasetConfig
from lora_core.data.dataset import ImageFolderDataset
from lora_core.families.flux import FluxFileError
from lora_core.families.hunyuan_video import HunyuanVideoBackend
from lora_core.formats.files import load_lora, save_lora
from lora_core.network import LoRANetwork, grouped_by_module
from lora_core.targets import TargetError
from lora_core.training.config import TrainingConfig, TrainingError
from lora_core.training.loop import train

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a video of sks"
COMFY_HUNYUAN_VIDEO = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16,
                       "vec_in_dim": CLIP_WIDTH, "context_in_dim": LLAMA_WIDTH, "hidden_size": 32, "mlp_ratio": 4.0,
                       "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 256,
                       "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": True, "byt5": False,
                       "meanflow": False}


@pytest.fixture(scope="module")
def hunyuan():
    return build_tiny_hunyuan_video(seed=0)


def file_modules(tensors: dict) -> set[str]:
    """The modules a file in diffusers-style naming holds (`<module>.lora_A.weight`, `<module>.hada_w1_a`)."""
    return {key.rsplit(".", 2 if key.endswith(".weight") else 1)[0] for key in tensors}


def clips_and_images(folder: Path) -> Path:
    """Four 9-frame clips of a moving red circle (mp4) and two images, all captioned."""
    for index in range(4):
        write_clip(folder / f"clip_{index}.mp4", 9)
    concept_images(folder, 2, size=32)
    return folder


def test_objective_noises_and_times_as_the_flow_match_euler_scheduler(hunyuan) -> None:
    """x_σ = the scheduler's scale_noise at its shifted sigmas, the time input σ·1000 (its timesteps), the target
    ε − x0 on 5-D video latents, and σ drawn logit-normal with the scheduler's shift 7."""
    scheduler = hunyuan.scheduler
    objective = HunyuanVideoBackend(hunyuan).objective(TrainingConfig())
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 16, 3, 4, 4, generator=generator), torch.randn(2, 16, 3, 4, 4, generator=generator)
    scheduler.set_timesteps(4)
    seen = {}

    def predict(noisy, times):
        seen.update(noisy=noisy, times=times)
        return torch.zeros_like(noisy)

    loss = objective.loss(predict, latents, noise, scheduler.sigmas[[1, 2]])
    timesteps = scheduler.timesteps[[1, 2]]
    expected = torch.cat([scheduler.scale_noise(latents[i:i + 1], timesteps[i:i + 1], noise[i:i + 1]) for i in (0, 1)])
    torch.testing.assert_close(seen["noisy"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["times"], timesteps.float())
    torch.testing.assert_close(loss, ((noise - latents) ** 2).mean(dim=(1, 2, 3, 4)))
    _, sigmas = objective.draw((3, 16, 3, 4, 4), torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    torch.randn((3, 16, 3, 4, 4), generator=replay)
    raw = torch.sigmoid(torch.normal(0.0, 1.0, (3,), generator=replay))
    shift = scheduler.config.shift
    assert shift == 7.0
    torch.testing.assert_close(sigmas, shift * raw / (1 + (shift - 1) * raw))


def test_prompt_and_velocity_are_the_pipelines_first_step_on_a_clip(hunyuan) -> None:
    """The pipeline's first step on 5 frames of 32×32 at embedded guidance 1.0: `encode_text` is the Llama states,
    mask and CLIP-L pooled output it passes (the caption's tokens after the 95-token template, padding trimmed), and
    `predict` on its latents and time is the transformer's output, padded context or not."""
    backend = HunyuanVideoBackend(hunyuan)
    calls = []
    hook = hunyuan.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                     with_kwargs=True)
    try:
        hunyuan(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
                output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    inputs, output = calls[0]
    assert inputs["hidden_states"].shape == (1, 16, 2, 4, 4)
    torch.testing.assert_close(inputs["guidance"], torch.tensor([1000.0]))
    with torch.no_grad():
        text = backend.encode_text([PROMPT])
        kept = text["context"].shape[1]
        assert kept == int(inputs["encoder_attention_mask"].sum()) == len(PROMPT.split()) + 2 + 1  # s, k, s; eot
        torch.testing.assert_close(text["context"], inputs["encoder_hidden_states"][:, :kept], rtol=0, atol=0)
        torch.testing.assert_close(text["pooled"], inputs["pooled_projections"], rtol=0, atol=0)
        ours = backend.predict(inputs["hidden_states"], inputs["timestep"], text)
        padded = backend.predict(inputs["hidden_states"], inputs["timestep"], {
            "context": inputs["encoder_hidden_states"], "context_mask": inputs["encoder_attention_mask"],
            "pooled": inputs["pooled_projections"]})
    torch.testing.assert_close(padded, output, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, output, rtol=0, atol=1e-5)


def test_clips_are_encoded_as_the_pipelines_decode_undoes_them(hunyuan) -> None:
    """The pipeline decodes z / scaling_factor: `encode_images` of a clip (and of an image, as one frame) is the VAE's
    sample scaled so, 4k+1 frames to k+1 latent frames."""
    backend = HunyuanVideoBackend(hunyuan)
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = backend.encode_images(clip, torch.Generator().manual_seed(3))
        sample = hunyuan.vae.encode(clip).latent_dist.sample(generator=torch.Generator().manual_seed(3))
        image = backend.encode_images(clip[:, :, 0], torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours / hunyuan.vae.config.scaling_factor, sample, rtol=1e-6, atol=1e-6)
    assert hunyuan.vae.config.scaling_factor == 0.476986
    assert ours.shape == (1, 16, 2, 4, 4) and image.shape == (1, 16, 1, 4, 4)


def test_training_on_clips_and_images_lowers_the_loss_and_strength_zero_is_the_base(hunyuan, tmp_path) -> None:
    backend = HunyuanVideoBackend(hunyuan)
    dataset = ImageFolderDataset(clips_and_images(tmp_path / "data"), DatasetConfig(resolution=32, frames=5))
    assert sorted({example.frames for example in dataset.examples}) == [1, 5]
    network = LoRANetwork.create(backend.adapter_targets("transformer", False), "lora", 4, 4)
    result = train(backend, network, dataset, TrainingConfig(
        steps=30, learning_rate=1e-2, gradient_accumulation=1, validation_every=30, validation_timesteps=4))
    (_, before), (_, after) = result.validation
    print(f"hunyuan video validation loss {before:.4f} -> {after:.4f}")
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


def test_refusals_name_the_problem(hunyuan, tmp_path) -> None:
    """4-frame clips (HunyuanVideo takes 4k+1), text-encoder training and odd latent sides are refused by name."""
    for index in range(2):
        write_clip(tmp_path / f"clip_{index}.mp4", 9)
    backend = HunyuanVideoBackend(hunyuan)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4)
    with pytest.raises(TrainingError, match=r"HunyuanVideo takes clips of 4k\+1 frames .* have 4: set frames to 1 or 5"):
        train(backend, network, ImageFolderDataset(tmp_path, DatasetConfig(resolution=32, frames=4)),
              TrainingConfig(steps=1, validation_every=0))
    with pytest.raises(TargetError, match=r"text encoders \(LLaVA-Llama-3 and CLIP-L\) are not trained"):
        backend.adapter_targets("attention", True)
    with pytest.raises(ValueError, match="multiples of 16 pixels; got latents of 3×4"):
        backend.predict(torch.zeros(1, 16, 1, 3, 4), torch.tensor([500.0]), backend.encode_text([PROMPT]))


@pytest.mark.parametrize("algorithm", ["lora", "loha"])
def test_file_round_trips_exactly_in_hunyuan_videos_own_names(hunyuan, tmp_path, algorithm: str) -> None:
    """Every layer of the double and single blocks: q/k/v fused into img_attn_qkv / txt_attn_qkv / linear1 and split
    back to the same ΔW; LoKr, whose Kronecker factors cannot fuse, is refused on the fused layers."""
    backend = HunyuanVideoBackend(hunyuan)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
    save_lora(tmp_path / "hv.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    tensors, _ = load_file(tmp_path / "hv.safetensors")
    assert file_modules(tensors) == {f"diffusion_model.{path}" for path in (
        "double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn_proj", "double_blocks.0.img_mlp.fc1",
        "double_blocks.0.img_mlp.fc2", "double_blocks.0.img_mod.linear", "double_blocks.0.txt_attn_qkv",
        "double_blocks.0.txt_attn_proj", "double_blocks.0.txt_mlp.fc1", "double_blocks.0.txt_mlp.fc2",
        "double_blocks.0.txt_mod.linear", "single_blocks.0.linear1", "single_blocks.0.linear2",
        "single_blocks.0.modulation.linear")}
    loaded, _ = load_lora(tmp_path / "hv.safetensors", backend.loadable_modules(),
                          network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=0, atol=1e-6)
    lokr = randomized(LoRANetwork.create(backend.adapter_targets("attention", False), "lokr", 4, 2))
    with pytest.raises(FluxFileError, match="LoKr cannot be saved for HunyuanVideo: kohya's fused layer"):
        backend.file_tensors(lokr.kohya_tensors())


@pytest.mark.parametrize("layout", ["musubi", "diffusers"])
def test_musubi_tuners_and_diffusers_layouts_load_to_the_same_delta_w(hunyuan, tmp_path, layout: str) -> None:
    """musubi-tuner's `lora_unet_double_blocks_0_img_attn_qkv.lora_down/up/alpha` (one dense LoRA over the fused
    layer) and diffusers' `transformer.transformer_blocks.0.attn.to_q.lora_A/B` give the same ΔW."""
    backend = HunyuanVideoBackend(hunyuan)
    network = randomized(LoRANetwork.create(backend.adapter_targets("transformer", False), "lora", 4, 2))
    other = {}
    if layout == "musubi":  # our file's fused layers under musubi-tuner's names, alpha kept
        fused = grouped_by_module(super(HunyuanVideoBackend, backend).file_tensors(network.kohya_tensors()))
        for name, parts in fused.items():
            musubi = "lora_unet_" + backend.file_names[name].removeprefix("diffusion_model.").replace(".", "_")
            other |= {f"{musubi}.{suffix}": value for suffix, value in parts.items()}
    else:
        for name, parts in grouped_by_module(network.kohya_tensors()).items():
            path = next(path for path, _ in hunyuan.transformer.named_modules()
                        if f"lora_unet_{path.replace('.', '_')}" == name)
            scale = float(parts["alpha"]) / parts["lora_down.weight"].shape[0]
            other[f"transformer.{path}.lora_A.weight"] = parts["lora_down.weight"]
            other[f"transformer.{path}.lora_B.weight"] = parts["lora_up.weight"] * scale
    save_file(other, tmp_path / "other.safetensors")
    loaded, _ = load_lora(tmp_path / "other.safetensors", backend.loadable_modules(),
                          network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["attention", "full"])
def test_diffusers_reads_the_file_with_every_module_applied(tmp_path, preset: str) -> None:
    """diffusers' `load_lora_weights` (its converter of original HunyuanVideo files, which splits linear1 at the real
    width 3072: so one double and one single block at that width, narrow MLPs) loads every key of the file, and the
    transformer predicts as lora_core's network at strength 1."""
    from diffusers import HunyuanVideoTransformer3DModel

    pipeline = build_tiny_hunyuan_video(seed=0)
    torch.manual_seed(1)
    pipeline.transformer = HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=0.25, text_embed_dim=LLAMA_WIDTH,
        pooled_projection_dim=CLIP_WIDTH)
    backend = HunyuanVideoBackend(pipeline)
    network = randomized(LoRANetwork.create(backend.adapter_targets(preset, False), "lora", 4, 2), std=0.02)
    path = save_lora(tmp_path / "hv.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
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
def test_comfyui_maps_and_applies_every_module_of_the_file(hunyuan, tmp_path) -> None:
    backend = HunyuanVideoBackend(hunyuan)
    files, counts = [], []
    for algorithm in ("lora", "loha"):
        network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
        files.append(tmp_path / f"{algorithm}.safetensors")
        save_lora(files[-1], network, {}, "float32", file_tensors=backend.file_tensors)
        counts.append(len(file_modules(load_file(files[-1])[0])))
    for report, count in zip(comfy_reads("HunyuanVideo", COMFY_HUNYUAN_VIDEO, files), counts):
        assert report["not_loaded"] == [] and report["errors"] == [] and report["unchanged"] == []
        assert report["patches"] == count


def test_cli_trains_a_saved_hunyuan_video_base_on_clips(hunyuan, tmp_path) -> None:
    """The CLI trains a saved HunyuanVideoPipeline on clips and images (--frames 5), writes the file in HunyuanVideo's
    names and its sample as an animated WEBP of 5 frames at 16 fps."""
    hunyuan.save_pretrained(tmp_path / "base")
    out = tmp_path / "hv.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "lora_core", "train", "--base", str(tmp_path / "base"), "--data",
         str(clips_and_images(tmp_path / "data")), "--frames", "5", "--out", str(out), "--steps", "20",
         "--resolution", "32", "--rank", "4", "--lr", "1e-2", "--gradient-accumulation", "1", "--validation-every",
         "20", "--sample-every", "20", "--sample-steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["best_step"] == 20, "the validation loss must fall"
    tensors, metadata = load_file(out)
    assert all(key.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks.")) for key in tensors)
    assert metadata["ss_base_model_version"] == "hunyuan_video"
    with Image.open(tmp_path / "hv-sample-step00000020-0.webp") as sample:
        sample.load()
        assert sample.n_frames == 5 and sample.info["duration"] == round(1000 / 16)


def test_gradient_checkpointing_recomputes_the_same_training(hunyuan, tmp_path) -> None:
    check_gradient_checkpointing_recomputes_the_same_training(HunyuanVideoBackend(hunyuan), tmp_path)
