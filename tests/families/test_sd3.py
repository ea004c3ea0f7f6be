"""SD3.5 in lora_core on a tiny diffusers StableDiffusion3Pipeline: the objective and the denoiser call against the
pipeline's own scheduler and transformer call, training, strength 0, and the file (diffusers' naming) read by
lora_core, diffusers' `load_lora_weights` and ComfyUI 0.3.64's core Load LoRA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.family_checks import (
    check_gradient_checkpointing_recomputes_the_same_training,
    check_training_lowers_the_validation_loss_and_strength_zero_is_the_base,
    cli_trains,
)
from support.tiny_flow_models import COMFYUI, build_tiny_sd3, comfy_reads, randomized

from lora_core import load_file
from lora_core.families.sd3 import SD3Backend
from lora_core.formats.files import load_lora, save_lora
from lora_core.network import LoRANetwork
from lora_core.training.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3(seed=0)


def test_objective_noises_and_shifts_as_the_scheduler_and_passes_its_timesteps(sd3) -> None:
    """x_σ from FlowMatchEulerDiscreteScheduler.scale_noise, the time input the scheduler's timestep (σ·1000, as the
    pipeline passes it), the loss on x̂0 = x_σ − σ·v̂ against x0, and drawn σ shifted exactly as the scheduler shifts
    its sigmas (3.0)."""
    objective = SD3Backend(sd3).objective(TrainingConfig())
    scheduler = sd3.scheduler
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps[[1, 2]]
    seen = {}

    def predict(noisy, times):
        seen.update(noisy=noisy, times=times)
        return torch.zeros_like(noisy)

    loss = objective.loss(predict, latents, noise, scheduler.sigmas[[1, 2]])
    expected = torch.cat([scheduler.scale_noise(latents[i:i + 1], timesteps[i:i + 1], noise[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(seen["noisy"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["times"], timesteps, rtol=0, atol=1e-3)
    # preconditioned (SD3's default): x̂0 = x_σ − σ·0 against x0, i.e. σ² times the velocity error
    torch.testing.assert_close(loss, scheduler.sigmas[[1, 2]] ** 2 * ((noise - latents) ** 2).mean(dim=(1, 2, 3)))
    _, sigmas = objective.draw((3, 16, 8, 8), torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    torch.randn((3, 16, 8, 8), generator=replay)
    raw = torch.sigmoid(torch.normal(0.0, 1.0, (3,), generator=replay))
    scheduler.set_timesteps(sigmas=raw.tolist())
    torch.testing.assert_close(sigmas, scheduler.sigmas[:-1])


def test_predict_is_the_pipelines_transformer_call(sd3) -> None:
    """One pipeline step's transformer output equals `predict` on the same latents and time, with the conditioning
    from `encode_text` (CLIP-L/G penultimate states, T5, pooled outputs)."""
    backend = SD3Backend(sd3)
    calls = []
    hook = sd3.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                 with_kwargs=True)
    try:
        sd3("a photo of sks", height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    (inputs, output), = calls
    with torch.no_grad():
        ours = backend.predict(inputs["hidden_states"], inputs["timestep"], backend.encode_text(["a photo of sks"]))
    torch.testing.assert_close(ours, output, rtol=0, atol=1e-6)


def test_training_lowers_the_validation_loss_and_strength_zero_is_the_base(sd3, tmp_path) -> None:
    check_training_lowers_the_validation_loss_and_strength_zero_is_the_base(
        SD3Backend(sd3), sd3, tmp_path, "attention", text_encoder=True, guidance_scale=7.0, fall=0.95)


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha", "lokr"])
def test_file_round_trips_exactly_in_diffusers_naming(sd3, tmp_path, algorithm: str) -> None:
    backend = SD3Backend(sd3)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", True), algorithm, 4, 2))
    path = save_lora(tmp_path / "sd3.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    tensors, _ = load_file(path)
    assert all(key.startswith(("transformer.transformer_blocks.", "text_encoder.text_model.")) for key in tensors)
    if algorithm == "lora":
        assert not any(key.endswith(".alpha") for key in tensors)
    loaded, _ = load_lora(path, backend.loadable_modules(), network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=0, atol=1e-6)


def test_diffusers_reads_the_file_with_every_module_applied(tmp_path) -> None:
    """After `load_lora_weights`, every network module has a PEFT LoRA layer, and the transformer's output on
    conditioning from the LoRA'd CLIP-L equals lora_core's attached network on the same inputs."""
    pipeline = build_tiny_sd3(seed=2)
    backend = SD3Backend(pipeline)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", True), "lora", 4, 2))
    path = save_lora(tmp_path / "sd3.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), network.applied(1.0):
        ours = backend.predict(latents, torch.tensor([400.0]), backend.encode_text(["a photo of sks"]))
    pipeline.load_lora_weights(str(path))
    adapted = [name for name, module in [*pipeline.transformer.named_modules(), *pipeline.text_encoder.named_modules()]
               if hasattr(module, "lora_A")]
    assert len(adapted) == len(network.adapters)
    with torch.no_grad():
        theirs = backend.predict(latents, torch.tensor([400.0]), backend.encode_text(["a photo of sks"]))
        pipeline.unload_lora_weights()
        base = backend.predict(latents, torch.tensor([400.0]), backend.encode_text(["a photo of sks"]))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 100 * (theirs - ours).abs().max()


@pytest.mark.skipif(not COMFYUI.is_dir(), reason="ComfyUI 0.3.64 is set up by scripts/setup_comfyui.sh")
def test_comfyui_maps_and_applies_every_module_of_the_file(sd3, tmp_path) -> None:
    """LoRA, DoRA and LoKr files on ComfyUI's own SD3 (MMDiT): every key loaded, every module a patch (q/k/v into
    slices of its fused qkv) that changes its weight."""
    backend = SD3Backend(sd3)
    files, counts = [], []
    for algorithm in ("lora", "dora", "lokr"):
        network = randomized(LoRANetwork.create(backend.adapter_targets("full", True), algorithm, 4, 2))
        files.append(save_lora(tmp_path / f"{algorithm}.safetensors", network, {}, "float32",
                               file_tensors=backend.file_tensors))
        counts.append(len(network.adapters))
    unet = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 64,
            "pos_embed_max_size": 16, "pos_embed_scaling_factor": None, "qk_norm": "rms", "x_block_self_attn_layers": [0],
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}}}
    for report, count in zip(comfy_reads("SD3", unet, files), counts):
        assert report["not_loaded"] == [] and report["errors"] == []
        assert report["unchanged"] == []
        assert report["patches"] == count


def test_cli_trains_a_saved_sd3_base(sd3, tmp_path) -> None:
    tensors, metadata = cli_trains(sd3, tmp_path, "--flow-shift", "3.0", "--preset", "attention")
    assert metadata["ss_base_model_version"] == "sd3" and metadata["ss_discrete_flow_shift"] == "3.0"
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors


def test_gradient_checkpointing_recomputes_the_same_training(sd3, tmp_path) -> None:
    check_gradient_checkpointing_recomputes_the_same_training(SD3Backend(sd3), tmp_path, text_encoder=True)


def test_a_bf16_transformer_gets_its_timestep_in_fp32() -> None:
    """As StableDiffusion3Pipeline, diffusers' SD3 training script and ComfyUI pass it: in bf16 σ·1000 = 731.1 would
    be 732."""
    pipeline = build_tiny_sd3(seed=1)
    pipeline.transformer.to(torch.bfloat16)
    backend = SD3Backend(pipeline)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    times = torch.tensor([731.1, 88.3])
    with torch.no_grad():
        conditioning = backend.encode_text(["a photo of sks", "a red circle"])
        ours = backend.predict(latents, times, conditioning)
        reference = pipeline.transformer(
            hidden_states=latents.to(torch.bfloat16), timestep=times, return_dict=False,
            encoder_hidden_states=conditioning["context"].to(torch.bfloat16),
            pooled_projections=conditioning["pooled"].to(torch.bfloat16))[0]
    assert torch.equal(ours, reference.float())
