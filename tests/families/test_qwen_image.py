"""Qwen-Image in lora_core on a tiny diffusers QwenImagePipeline: the objective and the denoiser call against the
pipeline's own scheduler, packing and transformer call (prompts of different lengths padded and masked as the
pipeline batches them), training, strength 0, and the file (kohya's names) read by lora_core, diffusers'
`load_lora_weights` and ComfyUI 0.3.64's core Load LoRA; the layouts other trainers share load too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.family_checks import (
    check_gradient_checkpointing_recomputes_the_same_training,
    check_training_lowers_the_validation_loss_and_strength_zero_is_the_base,
    cli_trains,
)
from support.flow_checks import check_objective_against_the_scheduler
from support.tiny_flow_models import COMFYUI, comfy_reads, randomized
from support.tiny_qwen_image import QWEN_TOKENIZER, build_tiny_qwen_image

from lora_core import load_file
from lora_core.backend import concatenated
from lora_core.families.qwen_image import QwenImageBackend
from lora_core.formats.files import load_lora, save_lora
from lora_core.network import LoRANetwork, grouped_by_module
from lora_core.targets import TargetError
from lora_core.training.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not QWEN_TOKENIZER.is_dir(),
                                reason="Qwen2.5's tokenizer comes with ComfyUI 0.3.64 (scripts/setup_comfyui.sh)")
SHORT, LONG = "a photo of sks", "a photo of sks, a red circle on a white background"


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen_image(seed=0)


def test_objective_noises_shifts_and_passes_sigma_as_the_pipeline(qwen) -> None:
    """x_σ from FlowMatchEulerDiscreteScheduler.scale_noise at the pipeline's shifted timesteps, the transformer's
    time input timestep / 1000 (the pipeline's), the target ε − x0, and σ drawn with the scheduler's exponential
    shift at μ from Qwen-Image's own line (0.5 at 256 image tokens to 0.9 at 8192), not Flux's."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    objective = QwenImageBackend(qwen).objective(TrainingConfig())
    config = qwen.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    check_objective_against_the_scheduler(objective, qwen.scheduler, mu)
    assert mu != pytest.approx(calculate_shift(16))  # diffusers' default line (Flux's) would shift otherwise


def test_predict_is_the_pipelines_transformer_call_on_prompts_of_different_lengths(qwen) -> None:
    """The first pipeline step on two prompts of different lengths (the pipeline pads the shorter and masks it) equals
    `predict` on the same latents and time, with each caption encoded alone and the batch made by `concatenated`."""
    from diffusers import QwenImagePipeline

    backend = QwenImageBackend(qwen)
    calls = []
    hook = qwen.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                  with_kwargs=True)
    try:
        qwen([SHORT, LONG], height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
             output_type="latent")  # 2 steps: shift_terminal stretches a 1-step schedule to 0/0
    finally:
        hook.remove()
    inputs, output = calls[0]
    assert inputs["encoder_hidden_states_mask"] is not None and not inputs["encoder_hidden_states_mask"].all()
    scale = qwen.vae_scale_factor
    latents = QwenImagePipeline._unpack_latents(inputs["hidden_states"], 64, 64, scale)[:, :, 0]
    conditioning = concatenated([backend.encode_text([SHORT]), backend.encode_text([LONG])])
    with torch.no_grad():
        ours = backend.predict(latents, inputs["timestep"], conditioning)
    torch.testing.assert_close(ours, QwenImagePipeline._unpack_latents(output, 64, 64, scale)[:, :, 0],
                               rtol=0, atol=1e-6)


def test_images_are_encoded_as_the_pipelines_decode_undoes_them(qwen) -> None:
    """`encode_images` is the VAE's one-frame posterior normalized by latents_mean/std: the pipeline's decode step
    (× std + mean, then the VAE) of its mean gives back what the VAE decodes from its own posterior mean."""
    backend = QwenImageBackend(qwen)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = backend.encode_images(pixels, torch.Generator().manual_seed(1))
        posterior = qwen.vae.encode(pixels[:, :, None]).latent_dist
        again = posterior.sample(generator=torch.Generator().manual_seed(1))
    config = qwen.vae.config
    mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in (config.latents_mean, config.latents_std))
    assert latents.shape == (1, 16, 8, 8)
    torch.testing.assert_close(latents * std + mean, again[:, :, 0], rtol=1e-5, atol=1e-5)


def test_training_lowers_the_validation_loss_and_strength_zero_is_the_base(qwen, tmp_path) -> None:
    check_training_lowers_the_validation_loss_and_strength_zero_is_the_base(
        QwenImageBackend(qwen), qwen, tmp_path, "attention")


def test_the_text_encoder_is_never_trained(qwen) -> None:
    with pytest.raises(TargetError, match="Qwen2.5-VL.*not trained"):
        QwenImageBackend(qwen).adapter_targets("attention", True)


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha", "lokr"])
def test_kohya_file_round_trips_exactly(qwen, tmp_path, algorithm: str) -> None:
    backend = QwenImageBackend(qwen)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
    path = save_lora(tmp_path / "qwen.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    tensors, _ = load_file(path)
    assert {key.partition(".")[0] for key in tensors} == set(network.adapters)
    assert "lora_unet_transformer_blocks_1_img_mlp_net_0_proj" in network.adapters
    loaded, _ = load_lora(path, backend.loadable_modules(), network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("prefix", "with_alpha"), [("diffusion_model.", True), ("diffusion_model.", False),
                                                    ("transformer.", False)])
def test_files_in_the_layouts_other_trainers_share_load_to_the_same_delta_w(qwen, tmp_path, prefix,
                                                                           with_alpha: bool) -> None:
    """ai-toolkit's and diffusion-pipe's `diffusion_model.<path>.lora_A/lora_B` (with or without `.alpha`) and
    diffusers' `transformer.<path>` (alpha/rank folded into lora_B) load to every layer's ΔW."""
    backend = QwenImageBackend(qwen)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 2))
    paths = {name: path for path, name in ((path, "lora_unet_" + path.replace(".", "_"))
                                           for path, _ in qwen.transformer.named_modules()) if name in network.adapters}
    shared = {}
    for name, parts in grouped_by_module(network.kohya_tensors()).items():
        scale = 1.0 if with_alpha else float(parts["alpha"]) / parts["lora_down.weight"].shape[0]
        shared |= {f"{prefix}{paths[name]}.lora_A.weight": parts["lora_down.weight"],
                   f"{prefix}{paths[name]}.lora_B.weight": parts["lora_up.weight"] * scale}
        if with_alpha:
            shared[f"{prefix}{paths[name]}.alpha"] = parts["alpha"]
    save_file(shared, tmp_path / "shared.safetensors")
    loaded, _ = load_lora(tmp_path / "shared.safetensors", backend.loadable_modules(),
                          network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=1e-5, atol=1e-6)


def test_diffusers_reads_the_kohya_file_with_every_module_applied(tmp_path) -> None:
    """After `load_lora_weights` (diffusers' converter of kohya's Qwen-Image names), every network module has a PEFT
    LoRA layer, and the transformer's output equals lora_core's attached network on the same inputs."""
    pipeline = build_tiny_qwen_image(seed=2)
    backend = QwenImageBackend(pipeline)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 2))
    path = save_lora(tmp_path / "qwen.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = backend.encode_text([SHORT])
    with torch.no_grad(), network.applied(1.0):
        ours = backend.predict(latents, torch.tensor([0.4]), conditioning)
    pipeline.load_lora_weights(str(path))
    adapted = [name for name, module in pipeline.transformer.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == len(network.adapters)
    with torch.no_grad():
        theirs = backend.predict(latents, torch.tensor([0.4]), conditioning)
        pipeline.unload_lora_weights()
        base = backend.predict(latents, torch.tensor([0.4]), conditioning)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 100 * (theirs - ours).abs().max()


@pytest.mark.skipif(not COMFYUI.is_dir(), reason="ComfyUI 0.3.64 is set up by scripts/setup_comfyui.sh")
def test_comfyui_maps_and_applies_every_module_of_the_file(qwen, tmp_path) -> None:
    """LoRA, DoRA, LoHa and LoKr files on ComfyUI's own Qwen-Image: every key loaded, every module a patch that
    changes its weight."""
    backend = QwenImageBackend(qwen)
    files, counts = [], []
    for algorithm in ("lora", "dora", "loha", "lokr"):
        network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
        files.append(save_lora(tmp_path / f"{algorithm}.safetensors", network, {}, "float32",
                               file_tensors=backend.file_tensors))
        counts.append(len(network.adapters))
    unet = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [4, 6, 6]}
    for report, count in zip(comfy_reads("QwenImage", unet, files), counts):
        assert report["not_loaded"] == [] and report["errors"] == []
        assert report["unchanged"] == []
        assert report["patches"] == count


def test_cli_trains_a_saved_qwen_image_base(qwen, tmp_path) -> None:
    tensors, metadata = cli_trains(qwen, tmp_path, "--target", "transformer")
    assert metadata["ss_base_model_version"] == "qwen_image" and metadata["ss_max_shift"] == "0.9"
    assert "lora_unet_transformer_blocks_0_img_mlp_net_2.lora_down.weight" in tensors
    picture = tmp_path / "grid.png"
    done = subprocess.run(
        [sys.executable, "-m", "lora_core", "generate", "--base", str(tmp_path / "base"), "--lora",
         str(tmp_path / "lora.safetensors"), "--prompt", SHORT, "--strength", "0", "1", "--size", "64", "--steps",
         "2", "--out", str(picture)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_gradient_checkpointing_recomputes_the_same_training(qwen, tmp_path) -> None:
    check_gradient_checkpointing_recomputes_the_same_training(QwenImageBackend(qwen), tmp_path)