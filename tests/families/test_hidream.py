"""HiDream-I1 in lora_core on a tiny diffusers HiDreamImagePipeline: the objective against the pipeline's scheduler,
the denoiser call against the pipeline's (four encoders' outputs, time σ·1000, output negated), the mixtures of
experts trained through their differentiable branch, training, strength 0, and the file (`diffusion_model.` layout)
read by lora_core, diffusers' `load_lora_weights` and ComfyUI 0.3.64's core Load LoRA."""
from __future__ import annotations

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
from support.tiny_hidream import LLAMA_WIDTH, build_tiny_hidream

from lora_core import load_file
from lora_core.families.hidream import HiDreamBackend
from lora_core.formats.files import load_lora, save_lora
from lora_core.network import LoRANetwork, grouped_by_module
from lora_core.targets import TargetError
from lora_core.training.config import TrainingConfig

PROMPT = "a photo of sks"


@pytest.fixture(scope="module")
def hidream():
    return build_tiny_hidream(seed=0)


def test_objective_noises_and_shifts_as_the_pipelines_scheduler(hidream) -> None:
    """x_σ from FlowMatchEulerDiscreteScheduler.scale_noise, σ·1000 as the time, the target ε − x0, σ drawn
    logit-normal with the scheduler's fixed shift 3."""
    objective = HiDreamBackend(hidream).objective(TrainingConfig())
    check_objective_against_the_scheduler(objective, hidream.scheduler, None, multiplier=1000)


def test_predict_is_the_pipelines_transformer_call_negated(hidream) -> None:
    """The pipeline's first step passes time σ·1000 and the four encoders' outputs and negates the transformer's
    output; `predict` on the same latents at that time, with the caption encoded by the backend, gives it, with the
    experts in either branch (the training one only differs in summation order)."""
    backend = HiDreamBackend(hidream)
    calls = []
    hook = hidream.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                     with_kwargs=True)
    try:
        hidream(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    inputs, output = calls[0]
    conditioning = backend.encode_text([PROMPT])
    assert conditioning["llama"].shape == (1, 2, 128, LLAMA_WIDTH)  # every Llama layer, 128 tokens, batch first
    with torch.no_grad():
        ours = backend.predict(inputs["hidden_states"], inputs["timesteps"], conditioning)
        with backend.training(False):
            differentiable = backend.predict(inputs["hidden_states"], inputs["timesteps"], conditioning)
    torch.testing.assert_close(ours, -output, rtol=0, atol=1e-6)
    torch.testing.assert_close(differentiable, -output, rtol=1e-5, atol=1e-5)


def routed_expert_gradients(backend, network, conditioning, latents) -> list[float]:
    network.zero_grad()
    with network.applied(1.0):
        backend.predict(latents, torch.tensor([600.0]), conditioning).square().mean().backward()
    return [float(adapter.lora_up.weight.grad.abs().sum()) if adapter.lora_up.weight.grad is not None else 0.0
            for name, adapter in network.items() if "_experts_" in name and "shared" not in name]


def test_routed_experts_train_while_training(hidream) -> None:
    """Inside `training` gradients reach every routed expert's adapter; outside it (the pipeline's eval branch runs
    the routed experts under no_grad) none would."""
    backend = HiDreamBackend(hidream)
    network = LoRANetwork.create(backend.adapter_targets("transformer", False), "lora", 4, 4)
    assert sum("_experts_" in name and "shared" not in name for name in network.adapters) == 2 * 4 * 3  # w1-3
    with torch.no_grad():
        conditioning = backend.encode_text([PROMPT])
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with backend.training(False):
        trained = routed_expert_gradients(backend, network, conditioning, latents)
    assert all(gradient > 0 for gradient in trained)
    assert not any(routed_expert_gradients(backend, network, conditioning, latents))


def test_training_lowers_the_validation_loss_and_strength_zero_is_the_base(hidream, tmp_path) -> None:
    check_training_lowers_the_validation_loss_and_strength_zero_is_the_base(
        HiDreamBackend(hidream), hidream, tmp_path, "transformer", guidance_scale=5.0)


def test_the_text_encoders_are_never_trained(hidream) -> None:
    with pytest.raises(TargetError, match="Llama-3.1.*not trained"):
        HiDreamBackend(hidream).adapter_targets("attention", True)


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha", "lokr"])
def test_file_round_trips_exactly_in_diffusion_pipes_layout(hidream, tmp_path, algorithm: str) -> None:
    backend = HiDreamBackend(hidream)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
    path = save_lora(tmp_path / "hidream.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    keys = set(load_file(path)[0])
    assert all(key.startswith("diffusion_model.") for key in keys)
    if algorithm == "lora":
        assert "diffusion_model.double_stream_blocks.0.block.ff_i.experts.3.w2.lora_B.weight" in keys
        assert not any(key.endswith(".alpha") for key in keys)  # diffusers refuses them
    loaded, _ = load_lora(path, backend.loadable_modules(), network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prefix", ["lora_unet_", "transformer."])
def test_kohya_and_diffusers_layouts_load_to_the_same_delta_w(hidream, tmp_path, prefix: str) -> None:
    backend = HiDreamBackend(hidream)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 2))
    if prefix == "lora_unet_":
        shared = network.kohya_tensors()
    else:
        paths = {"lora_unet_" + path.replace(".", "_"): path for path, _ in hidream.transformer.named_modules()}
        shared = {}
        for name, parts in grouped_by_module(network.kohya_tensors()).items():
            scale = float(parts["alpha"]) / parts["lora_down.weight"].shape[0]
            shared |= {f"transformer.{paths[name]}.lora_A.weight": parts["lora_down.weight"],
                       f"transformer.{paths[name]}.lora_B.weight": parts["lora_up.weight"] * scale}
    save_file(shared, tmp_path / "shared.safetensors")
    loaded, _ = load_lora(tmp_path / "shared.safetensors", backend.loadable_modules(),
                          network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=1e-5, atol=1e-6)


def test_diffusers_reads_the_file_with_every_module_applied(tmp_path) -> None:
    """After `load_lora_weights` every network module has a PEFT LoRA layer, and the transformer's output equals
    lora_core's attached network on the same inputs."""
    pipeline = build_tiny_hidream(seed=2)
    backend = HiDreamBackend(pipeline)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 2))
    path = save_lora(tmp_path / "hidream.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = backend.encode_text([PROMPT])
    with torch.no_grad(), network.applied(1.0):
        ours = backend.predict(latents, torch.tensor([400.0]), conditioning)
    pipeline.load_lora_weights(str(path))
    adapted = [name for name, module in pipeline.transformer.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == len(network.adapters)
    with torch.no_grad():
        theirs = backend.predict(latents, torch.tensor([400.0]), conditioning)
        pipeline.unload_lora_weights()
        base = backend.predict(latents, torch.tensor([400.0]), conditioning)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 100 * (theirs - ours).abs().max()


COMFY_HIDREAM = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
                 "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 4,
                 "caption_channels": [64, LLAMA_WIDTH], "text_emb_dim": 64, "num_routed_experts": 4,
                 "num_activated_experts": 2, "axes_dims_rope": [4, 2, 2], "max_resolution": [16, 16],
                 "llama_layers": [0, 1]}


@pytest.mark.skipif(not COMFYUI.is_dir(), reason="ComfyUI 0.3.64 is set up by scripts/setup_comfyui.sh")
def test_comfyui_maps_and_applies_every_module_of_the_file(hidream, tmp_path) -> None:
    """LoRA, DoRA, LoHa and LoKr files on ComfyUI's own HiDream: every key loaded, every module a patch that changes
    its weight."""
    backend = HiDreamBackend(hidream)
    files, counts = [], []
    for algorithm in ("lora", "dora", "loha", "lokr"):
        network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
        files.append(save_lora(tmp_path / f"{algorithm}.safetensors", network, {}, "float32",
                               file_tensors=backend.file_tensors))
        counts.append(len(network.adapters))
    for report, count in zip(comfy_reads("HiDream", COMFY_HIDREAM, files), counts):
        assert report["not_loaded"] == [] and report["errors"] == []
        assert report["unchanged"] == []
        assert report["patches"] == count


def test_cli_trains_a_saved_hidream_base(hidream, tmp_path) -> None:
    tensors, metadata = cli_trains(hidream, tmp_path, "--target", "attention")
    assert metadata["ss_base_model_version"] == "hidream" and metadata["ss_discrete_flow_shift"] == "3.0"
    assert "diffusion_model.single_stream_blocks.0.block.attn1.to_q.lora_A.weight" in tensors


def test_gradient_checkpointing_recomputes_the_same_training(hidream, tmp_path) -> None:
    check_gradient_checkpointing_recomputes_the_same_training(HiDreamBackend(hidream), tmp_path)
