"""Chroma in lora_core on a tiny diffusers ChromaPipeline: the objective and the denoiser call against the
pipeline's own scheduler, packing and transformer (captions trimmed to what the pipeline's mask keeps; a padded batch
masked exactly), training, strength 0, and the kohya file (BFL names, fused exactly) read by lora_core, diffusers'
`load_lora_weights` and ComfyUI 0.3.64's core Load LoRA; ai-toolkit's and diffusers' layouts load too."""
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
from support.tiny_flow_models import (
    COMFYUI,
    build_tiny_chroma,
    comfy_reads,
    randomized,
)

from lora_core import load_file
from lora_core.backend import concatenated
from lora_core.families.chroma import ChromaBackend
from lora_core.formats.files import load_lora, save_lora
from lora_core.network import LoRANetwork, grouped_by_module
from lora_core.targets import TargetError
from lora_core.training.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[2]
SHORT, LONG = "a photo of sks", "a photo of sks, red circle"


@pytest.fixture(scope="module")
def chroma():
    return build_tiny_chroma(seed=0)


def test_objective_noises_shifts_and_passes_sigma_as_the_pipeline(chroma) -> None:
    """x_σ from FlowMatchEulerDiscreteScheduler.scale_noise at the pipeline's shifted timesteps, the target ε − x0,
    and σ drawn with the scheduler's resolution shift."""
    from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

    objective = ChromaBackend(chroma).objective(TrainingConfig())
    config = chroma.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    check_objective_against_the_scheduler(objective, chroma.scheduler, mu)


def transformer_on(chroma, inputs: dict, context: torch.Tensor) -> torch.Tensor:
    """diffusers' transformer on the pipeline's packed latents, time and ids with `context`, unmasked."""
    return chroma.transformer(hidden_states=inputs["hidden_states"], timestep=inputs["timestep"],
                              encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3),
                              img_ids=inputs["img_ids"], return_dict=False)[0]


def test_predict_is_the_transformer_on_the_pipelines_inputs_and_each_captions_tokens(chroma) -> None:
    """`predict` on the pipeline's first step's latents and time equals the transformer on each caption's tokens,
    EOS and one pad (what the pipeline's mask keeps; kohya trims them so), alone and in a padded, masked batch of a
    short and a long caption."""
    from diffusers import ChromaPipeline

    backend = ChromaBackend(chroma)
    calls = []
    hook = chroma.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append(kwargs),
                                                    with_kwargs=True)
    try:
        chroma(SHORT, negative_prompt="", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    inputs = calls[0]
    latents = ChromaPipeline._unpack_latents(inputs["hidden_states"], 64, 64, chroma.vae_scale_factor)
    short, long = backend.encode_text([SHORT]), backend.encode_text([LONG])
    assert short["context"].shape[1] < long["context"].shape[1] and short["context_mask"].all()
    with torch.no_grad():
        alone = [ChromaPipeline._unpack_latents(transformer_on(chroma, inputs, part["context"]), 64, 64,
                                                chroma.vae_scale_factor) for part in (short, long)]
        ours = backend.predict(latents, inputs["timestep"], short)
        batch = backend.predict(latents.repeat(2, 1, 1, 1), inputs["timestep"].repeat(2), concatenated([short, long]))
    torch.testing.assert_close(ours, alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(batch, torch.cat(alone), rtol=0, atol=2e-6)


def test_training_lowers_the_validation_loss_and_strength_zero_is_the_base(chroma, tmp_path) -> None:
    check_training_lowers_the_validation_loss_and_strength_zero_is_the_base(
        ChromaBackend(chroma), chroma, tmp_path, "attention", guidance_scale=4.0)


def test_t5_is_never_trained(chroma) -> None:
    with pytest.raises(TargetError, match="T5.*never trains"):
        ChromaBackend(chroma).adapter_targets("attention", True)


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha"])
def test_kohya_file_round_trips_exactly(chroma, tmp_path, algorithm: str) -> None:
    backend = ChromaBackend(chroma)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
    path = save_lora(tmp_path / "chroma.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    names = {key.split(".")[0] for key in load_file(path)[0]}
    assert {"lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_0_txt_attn_qkv"} <= names
    assert not any("to_q" in name or "_mod_" in name for name in names)
    loaded, _ = load_lora(path, backend.loadable_modules(), network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["ai-toolkit", "diffusers"])
def test_files_in_the_layouts_other_trainers_share_load_to_the_same_delta_w(chroma, tmp_path, layout) -> None:
    """ai-toolkit's `diffusion_model.<BFL path>.lora_A/lora_B` (fused qkv/linear1, no alpha) and diffusers'
    `transformer.<path>` (alpha/rank folded into lora_B) load to every layer's ΔW."""
    backend = ChromaBackend(chroma)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 2))
    tensors = backend.file_tensors(network.kohya_tensors()) if layout == "ai-toolkit" else network.kohya_tensors()
    paths = {"lora_unet_" + path.replace(".", "_"): path for path, _ in chroma.transformer.named_modules()}
    shared = {}
    for name, parts in grouped_by_module(tensors).items():
        scale = float(parts["alpha"]) / parts["lora_down.weight"].shape[0]
        if layout == "ai-toolkit":  # BFL paths: kohya's name without its prefix, dots where the model has them
            module = "diffusion_model." + re.sub(r"_(\d+)_", r".\1.", name.removeprefix("lora_unet_"))
            module = module.replace("_attn_", "_attn.").replace("_mlp_", "_mlp.")
        else:
            module = f"transformer.{paths[name]}"
        shared |= {f"{module}.lora_A.weight": parts["lora_down.weight"],
                   f"{module}.lora_B.weight": parts["lora_up.weight"] * scale}
    save_file(shared, tmp_path / "shared.safetensors")
    loaded, _ = load_lora(tmp_path / "shared.safetensors", backend.loadable_modules(),
                          network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=1e-5, atol=1e-6)


def test_diffusers_reads_the_kohya_file_with_every_module_applied(tmp_path) -> None:
    """diffusers reads Chroma files through its Flux kohya converter, which splits linear1 at the full width
    (3072/12288): this tiny model has no single blocks. The transformer's output after `load_lora_weights` equals
    lora_core's attached network on the same inputs."""
    from diffusers import ChromaTransformer2DModel

    pipeline = build_tiny_chroma(seed=2)
    torch.manual_seed(0)
    pipeline.transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=0, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, axes_dims_rope=(4, 6, 6), approximator_num_channels=64, approximator_hidden_dim=32,
        approximator_layers=1)
    backend = ChromaBackend(pipeline)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 2))
    path = save_lora(tmp_path / "chroma.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
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


COMFY_CHROMA = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "context_in_dim": 64,
                "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "in_dim": 64, "out_dim": 32,
                "hidden_dim": 32, "n_layers": 1}


@pytest.mark.skipif(not COMFYUI.is_dir(), reason="ComfyUI 0.3.64 is set up by scripts/setup_comfyui.sh")
def test_comfyui_maps_and_applies_every_module_of_the_file(chroma, tmp_path) -> None:
    """LoRA, DoRA and LoHa files (fused qkv/linear1) on ComfyUI's own Chroma: every key loaded, every module a patch
    that changes its weight."""
    backend = ChromaBackend(chroma)
    files, modules = [], []
    for algorithm in ("lora", "dora", "loha"):
        network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, 4, 2))
        files.append(save_lora(tmp_path / f"{algorithm}.safetensors", network, {}, "float32",
                               file_tensors=backend.file_tensors))
        modules.append({key.split(".")[0] for key in load_file(files[-1])[0]})
    for report, file_modules in zip(comfy_reads("Chroma", COMFY_CHROMA, files), modules):
        assert report["not_loaded"] == [] and report["errors"] == []
        assert report["unchanged"] == []
        assert report["patches"] == len(file_modules)


def test_cli_trains_a_saved_chroma_base(chroma, tmp_path) -> None:
    tensors, metadata = cli_trains(chroma, tmp_path, "--target", "attention")
    assert metadata["ss_base_model_version"] == "chroma"
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in tensors


def test_gradient_checkpointing_recomputes_the_same_training(chroma, tmp_path) -> None:
    check_gradient_checkpointing_recomputes_the_same_training(ChromaBackend(chroma), tmp_path)