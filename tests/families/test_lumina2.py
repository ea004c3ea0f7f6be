"""Lumina 2 in lora_core on a tiny diffusers Lumina2Pipeline: the objective against the pipeline's own scheduler, the
denoiser call against the pipeline's (system prompt, padded and masked captions, time 1 − σ, output negated),
training, strength 0, and the kohya file (NextDiT names, qkv fused exactly) read by lora_core and ComfyUI 0.3.64's
core Load LoRA; diffusion-pipe's and diffusers' layouts load too, and diffusers reads diffusion-pipe's."""
from __future__ import annotations

import re
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
from support.tiny_lumina2 import build_tiny_lumina2

from lora_core import load_file
from lora_core.backend import concatenated
from lora_core.families.lumina2 import Lumina2Backend
from lora_core.formats.files import load_lora, save_lora
from lora_core.network import LoRANetwork, grouped_by_module
from lora_core.targets import TargetError
from lora_core.training.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[2]
SHORT, LONG = "a photo of sks", "a photo of sks, a red circle on a white background"


@pytest.fixture(scope="module")
def lumina():
    return build_tiny_lumina2(seed=0)


def test_objective_noises_and_shifts_as_the_pipelines_scheduler(lumina) -> None:
    """x_σ from FlowMatchEulerDiscreteScheduler.scale_noise at the pipeline's timesteps, the target ε − x0, σ drawn
    logit-normal with the scheduler's fixed shift 6."""
    objective = Lumina2Backend(lumina).objective(TrainingConfig())
    check_objective_against_the_scheduler(objective, lumina.scheduler, None)


def test_predict_is_the_pipelines_transformer_call_negated_on_captions_of_different_lengths(lumina) -> None:
    """The pipeline's first step on two prompts (each after the system prompt, padded to 256 tokens and masked)
    passes time 1 − σ and negates the transformer's output; `predict` at σ on the same latents, with each caption
    encoded alone (its own tokens) and batched by `concatenated`, gives that negated output."""
    backend = Lumina2Backend(lumina)
    calls = []
    hook = lumina.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                    with_kwargs=True)
    try:
        lumina([SHORT, LONG], height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    inputs, output = calls[0]
    assert inputs["encoder_hidden_states"].shape[1] == 256 and not inputs["encoder_attention_mask"].all()
    short, long = backend.encode_text([SHORT]), backend.encode_text([LONG])
    assert short["context"].shape[1] < long["context"].shape[1] < 256
    with torch.no_grad():
        ours = backend.predict(inputs["hidden_states"], 1 - inputs["timestep"], concatenated([short, long]))
    torch.testing.assert_close(ours, -output, rtol=0, atol=2e-6)


def test_training_lowers_the_validation_loss_and_strength_zero_is_the_base(lumina, tmp_path) -> None:
    check_training_lowers_the_validation_loss_and_strength_zero_is_the_base(
        Lumina2Backend(lumina), lumina, tmp_path, "transformer", guidance_scale=4.0)


def test_gemma_is_never_trained(lumina) -> None:
    with pytest.raises(TargetError, match="Gemma-2.*not trained"):
        Lumina2Backend(lumina).adapter_targets("attention", True)


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha"])
def test_kohya_file_round_trips_exactly(lumina, tmp_path, algorithm: str) -> None:
    backend = Lumina2Backend(lumina)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
    path = save_lora(tmp_path / "lumina.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    names = {key.split(".")[0] for key in load_file(path)[0]}
    assert {"lora_unet_layers_1_attention_qkv", "lora_unet_context_refiner_0_feed_forward_w3",
            "lora_unet_noise_refiner_0_adaLN_modulation_1"} <= names
    assert not any("to_q" in name or "linear_" in name for name in names)
    loaded, _ = load_lora(path, backend.loadable_modules(), network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=0, atol=1e-6)


def nextdit_path(file_name: str) -> str:
    """NextDiT's module path of kohya's file name (`lora_unet_layers_0_attention_qkv` → `layers.0.attention.qkv`)."""
    path = re.sub(r"^(noise_refiner|context_refiner|layers)_(\d+)_", r"\1.\2.", file_name.removeprefix("lora_unet_"))
    return re.sub(r"(attention|feed_forward|adaLN_modulation)_", r"\1.", path)


def diffusion_pipe_file(backend: Lumina2Backend, network: LoRANetwork) -> dict[str, torch.Tensor]:
    """diffusion-pipe's layout of `network`: `diffusion_model.<NextDiT path>.lora_A/lora_B`, qkv fused, no alpha
    (alpha/rank folded into lora_B)."""
    shared = {}
    for name, parts in grouped_by_module(backend.file_tensors(network.kohya_tensors())).items():
        module = f"diffusion_model.{nextdit_path(name)}"
        scale = float(parts["alpha"]) / parts["lora_down.weight"].shape[0]
        shared |= {f"{module}.lora_A.weight": parts["lora_down.weight"],
                   f"{module}.lora_B.weight": parts["lora_up.weight"] * scale}
    return shared


@pytest.mark.parametrize("layout", ["diffusion-pipe", "diffusers"])
def test_files_in_the_layouts_other_trainers_share_load_to_the_same_delta_w(lumina, tmp_path, layout) -> None:
    """diffusion-pipe's `diffusion_model.<NextDiT path>.lora_A/lora_B` (fused qkv, no alpha) and diffusers'
    `transformer.<path>` (alpha/rank folded into lora_B) load to every layer's ΔW."""
    backend = Lumina2Backend(lumina)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 2))
    if layout == "diffusion-pipe":
        shared = diffusion_pipe_file(backend, network)
    else:
        paths = {"lora_unet_" + path.replace(".", "_"): path for path, _ in lumina.transformer.named_modules()}
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


def full_width_lumina2_transformer():
    """Lumina-Image-2.0's widths (2304, 24 heads over 8 key/value heads) with one block of each kind (0.26 B
    parameters)."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    return Lumina2Transformer2DModel(num_layers=1, num_refiner_layers=1, cap_feat_dim=32)


def test_diffusers_reads_diffusion_pipes_layout_at_full_width_and_predicts_as_lora_core(lumina, tmp_path) -> None:
    """diffusers 0.42.1's Lumina 2 converter reads `diffusion_model.` files that adapt every Linear of every block,
    splitting qkv at Lumina-Image-2.0's sizes (2304/768/768): on a transformer of that width (one block of each
    kind), the file of a "full" network loads with every module applied and predicts as lora_core's network; the
    kohya file (NextDiT names) is not read by diffusers at all."""
    from diffusers import Lumina2Pipeline

    transformer = full_width_lumina2_transformer()
    pipeline = Lumina2Pipeline(transformer=transformer, scheduler=lumina.scheduler, vae=lumina.vae,
                               text_encoder=lumina.text_encoder, tokenizer=lumina.tokenizer)
    backend = Lumina2Backend(pipeline)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 2), std=0.02)
    save_file(diffusion_pipe_file(backend, network), tmp_path / "diffusion_pipe.safetensors")
    kohya = save_lora(tmp_path / "kohya.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = backend.encode_text([SHORT])
    with torch.no_grad(), network.applied(1.0):
        ours = backend.predict(latents, torch.tensor([0.4]), conditioning)
    pipeline.load_lora_weights(str(tmp_path / "diffusion_pipe.safetensors"))
    adapted = [name for name, module in transformer.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == len(network.adapters)
    with torch.no_grad():
        theirs = backend.predict(latents, torch.tensor([0.4]), conditioning)
        pipeline.unload_lora_weights()
        base = backend.predict(latents, torch.tensor([0.4]), conditioning)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (theirs - base).abs().max() > 100 * (theirs - ours).abs().max()
    pipeline.load_lora_weights(str(kohya))  # it warns that it found no LoRA keys
    assert not any(hasattr(module, "lora_A") for module in transformer.modules())


COMFY_LUMINA = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
                "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16,
                "qk_norm": True, "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512]}


@pytest.mark.skipif(not COMFYUI.is_dir(), reason="ComfyUI 0.3.64 is set up by scripts/setup_comfyui.sh")
def test_comfyui_maps_and_applies_every_module_of_the_file(lumina, tmp_path) -> None:
    """LoRA, DoRA and LoHa files (fused qkv) on ComfyUI's own NextDiT: every key loaded, every module a patch that
    changes its weight."""
    backend = Lumina2Backend(lumina)
    files, modules = [], []
    for algorithm in ("lora", "dora", "loha"):
        network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
        files.append(save_lora(tmp_path / f"{algorithm}.safetensors", network, {}, "float32",
                               file_tensors=backend.file_tensors))
        modules.append({key.split(".")[0] for key in load_file(files[-1])[0]})
    for report, file_modules in zip(comfy_reads("Lumina2", COMFY_LUMINA, files), modules):
        assert report["not_loaded"] == [] and report["errors"] == []
        assert report["unchanged"] == []
        assert report["patches"] == len(file_modules)


def test_cli_trains_a_saved_lumina2_base(lumina, tmp_path) -> None:
    tensors, metadata = cli_trains(lumina, tmp_path, "--target", "transformer")
    assert metadata["ss_base_model_version"] == "lumina2" and metadata["ss_discrete_flow_shift"] == "6.0"
    assert "lora_unet_layers_0_feed_forward_w2.lora_down.weight" in tensors


def test_gradient_checkpointing_recomputes_the_same_training(lumina, tmp_path) -> None:
    check_gradient_checkpointing_recomputes_the_same_training(Lumina2Backend(lumina), tmp_path)