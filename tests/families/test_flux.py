"""Flux.1 in lora_core on tiny diffusers FluxPipelines (dev: guidance embedding, dynamic shift; schnell: neither):
the objective and the denoiser call against the pipeline's own scheduler and packing, training, strength 0, and the
kohya file read by lora_core, diffusers and ComfyUI 0.3.64."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.family_checks import (
    check_gradient_checkpointing_recomputes_the_same_training,
    check_training_lowers_the_validation_loss_and_strength_zero_is_the_base,
    cli_trains,
)
from support.flow_checks import check_objective_against_the_scheduler
from support.tiny_flow_models import (
    COMFYUI,
    build_tiny_flux,
    comfy_reads,
    concept_images,
    edit_pairs,
    randomized,
)

from lora_core import load_file
from lora_core.data.config import DatasetConfig
from lora_core.data.dataset import ImageFolderDataset
from lora_core.families.flux import FluxBackend, FluxFileError, bfl_layers, fuse, split
from lora_core.formats.files import load_lora, save_lora
from lora_core.network import LoRANetwork
from lora_core.training.config import TrainingConfig
from lora_core.training.loop import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dev():
    return build_tiny_flux(seed=0)


def test_objective_noises_as_the_scheduler_and_passes_sigma_as_the_pipeline_does(dev) -> None:
    """x_σ from FlowMatchEulerDiscreteScheduler.scale_noise at the pipeline's own shifted timesteps, the transformer's
    time input timestep / 1000 (FluxPipeline's), the target ε − x0, and σ drawn with the scheduler's time shift."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    objective = FluxBackend(dev).objective(TrainingConfig())
    config = dev.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    check_objective_against_the_scheduler(objective, dev.scheduler, mu)


def test_objective_settings_override_the_family_defaults_and_discrete_ones_are_refused(dev) -> None:
    from lora_core.training.config import TrainingError

    backend = FluxBackend(dev)
    objective = backend.objective(TrainingConfig(timestep_sampling="uniform", flow_shift=2.0, loss_weighting="cosmap"))
    assert (objective.sampling, objective.shift, objective.resolution_shift, objective.weighting) == \
        ("uniform", 2.0, False, "cosmap")
    schnell = FluxBackend(build_tiny_flux(seed=1, guidance_embeds=False)).objective(TrainingConfig())
    assert (schnell.shift, schnell.resolution_shift) == (1.0, False)  # its scheduler's: no dynamic shifting
    with pytest.raises(TrainingError, match="min_snr_gamma.*Flux.1 trains by flow matching"):
        backend.objective(TrainingConfig(min_snr_gamma=5.0))


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_predict_packs_ids_and_guidance_as_the_pipeline(dev, variant: str) -> None:
    """The transformer output of one pipeline step (guidance 2.5 on dev) equals `predict` on the unpacked latents."""
    from diffusers import FluxPipeline

    pipeline = dev if variant == "dev" else build_tiny_flux(seed=1, guidance_embeds=False)
    guidance = 2.5 if variant == "dev" else 1.0
    backend = FluxBackend(pipeline, guidance=guidance)
    calls = []
    hook = pipeline.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                      with_kwargs=True)
    try:
        pipeline("a photo of sks", height=64, width=64, num_inference_steps=1, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(0), output_type="latent",
                 max_sequence_length=backend.max_sequence_length)
    finally:
        hook.remove()
    (inputs, output), = calls
    latents = FluxPipeline._unpack_latents(inputs["hidden_states"], 64, 64, pipeline.vae_scale_factor)
    conditioning = backend.encode_text(["a photo of sks"])
    with torch.no_grad():
        ours = backend.predict(latents, inputs["timestep"], conditioning)
    theirs = FluxPipeline._unpack_latents(output, 64, 64, pipeline.vae_scale_factor)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (inputs["guidance"] is None) == (variant == "schnell")


def test_schnell_refuses_a_guidance_it_would_ignore() -> None:
    with pytest.raises(ValueError, match="no guidance embedding|has none"):
        FluxBackend(build_tiny_flux(seed=1, guidance_embeds=False), guidance=3.5)


def test_training_lowers_the_validation_loss_and_strength_zero_is_the_base(dev, tmp_path) -> None:
    backend = FluxBackend(dev)
    backend.sample_size = 64
    check_training_lowers_the_validation_loss_and_strength_zero_is_the_base(
        backend, dev, tmp_path, "attention", text_encoder=True, guidance_scale=3.5)


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha"])
@pytest.mark.parametrize("preset", ["attention", "full"])
def test_kohya_file_round_trips_exactly(dev, tmp_path, algorithm: str, preset: str) -> None:
    """Saved in kohya's fused names and loaded back, every layer has the ΔW (and DoRA magnitude) it was saved with."""
    backend = FluxBackend(dev)
    network = randomized(LoRANetwork.create(backend.adapter_targets(preset, True), algorithm, 4, 2))
    path = save_lora(tmp_path / "flux.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    loaded, _ = load_lora(path, backend.loadable_modules(), network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=0, atol=1e-6)
        if algorithm == "dora":
            torch.testing.assert_close(loaded.adapters[name].dora_scale, adapter.dora_scale, rtol=0, atol=0)
    names = {key.split(".")[0] for key in load_file(path)[0]}
    assert "lora_unet_single_blocks_0_linear1" in names and "lora_unet_double_blocks_0_img_attn_qkv" in names
    assert not any("to_q" in name for name in names)


def test_a_dense_fused_file_splits_into_the_same_rows_of_delta_w(dev) -> None:
    """kohya's own Flux training writes linear1 as one LoRA (shared down, dense up): each diffusers layer gets its
    rows of that ΔW; and LoKr, whose pieces are no single Kronecker product, is refused naming the layer."""
    backend = FluxBackend(dev)
    layers = [backend.modules_by_path[path] for path in backend.layers["lora_unet_single_blocks_0_linear1"]]
    rows = sum(layer.weight.shape[0] for layer in layers)
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(6, 32, generator=generator), torch.randn(rows, 6, generator=generator)
    linear1 = "lora_unet_single_blocks_0_linear1"
    pieces = split(linear1, {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(3.0)},
                   backend.layers[linear1], layers)
    delta = torch.cat([piece["lora_up.weight"] @ piece["lora_down.weight"] * piece["alpha"] / 6
                       for piece in pieces.values()])
    torch.testing.assert_close(delta, up @ down * 0.5)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lokr", 4)
    with pytest.raises(FluxFileError, match="LoKr.*Flux.*(double_blocks_0_img_attn_qkv|single_blocks_0_linear1)"):
        backend.file_tensors(network.kohya_tensors())
    with pytest.raises(FluxFileError, match="linear1: LoKr"):
        split("lora_unet_single_blocks_0_linear1", {"lokr_w1": down, "lokr_w2": down}, backend.layers[
            "lora_unet_single_blocks_0_linear1"], layers)


def test_lokr_on_layers_that_are_not_fused_is_saved_as_it_is(dev) -> None:
    backend = FluxBackend(dev)
    unfused = {name: module for name, module in backend.adapter_targets("transformer", False).items()
               if "_ff" in name or name.endswith(("proj_out", "to_out_0", "to_add_out"))}
    network = randomized(LoRANetwork.create(unfused, "lokr", 4))
    tensors = network.kohya_tensors()
    written = backend.file_tensors(tensors)
    assert {"lora_unet_double_blocks_0_img_mlp_0.lokr_w1", "lora_unet_single_blocks_0_linear2.lokr_w1"} <= set(written)
    back = backend.network_tensors(written)
    assert back.keys() == tensors.keys() and all(torch.equal(back[key], tensors[key]) for key in tensors)


def flux_without_single_blocks():
    """The tiny dev pipeline with one double block and no single blocks, whose linear1 diffusers' kohya converter
    could only split at Flux.1's full widths."""
    from diffusers import FluxTransformer2DModel

    pipeline = build_tiny_flux(seed=2)
    torch.manual_seed(0)
    pipeline.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=0, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return pipeline


def test_a_file_in_diffusers_naming_loads_as_the_network_it_came_from(tmp_path) -> None:
    """diffusers' own naming (its converter's output from our kohya file, as diffusers' scripts and ai-toolkit
    write Flux LoRAs: `transformer.….lora_A/lora_B`, no alpha) loads back to every layer's ΔW. (The converter writes
    CLIP-L in diffusers' pre-PEFT naming, which lora_core does not read, so this network has no CLIP-L layers.)"""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
    )
    from safetensors.torch import save_file

    backend = FluxBackend(flux_without_single_blocks())
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 2))
    converted = _convert_kohya_flux_lora_to_diffusers(backend.file_tensors(network.kohya_tensors()))
    assert all(key.startswith("transformer.") for key in converted)
    save_file(converted, tmp_path / "diffusers.safetensors")
    loaded, _ = load_lora(tmp_path / "diffusers.safetensors", backend.loadable_modules(),
                          network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=1e-5, atol=1e-6)


def test_diffusers_reads_the_kohya_file_with_every_module_applied(tmp_path) -> None:
    """diffusers' kohya converter splits qkv evenly (exact on any width) but linear1 at Flux.1's full widths
    3072/12288, so this tiny model has no single blocks; the transformer (and CLIP-L) output after
    `load_lora_weights` equals lora_core's attached network on the same inputs. linear1 at full width is checked on
    tensors alone in `test_diffusers_converter_splits_linear1_at_full_width_as_fuse_wrote_it`."""
    pipeline = flux_without_single_blocks()
    backend = FluxBackend(pipeline, guidance=2.0)
    network = randomized(LoRANetwork.create(backend.adapter_targets("full", True), "lora", 4, 2))
    path = save_lora(tmp_path / "flux.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), network.applied(1.0):
        conditioning = backend.encode_text(["a photo of sks"])
        ours = backend.predict(latents, torch.tensor([0.4]), conditioning)
    pipeline.load_lora_weights(str(path))
    adapted = [name for name, module in [*pipeline.transformer.named_modules(), *pipeline.text_encoder.named_modules()]
               if hasattr(module, "lora_A")]
    assert len(adapted) == len(network.adapters)
    with torch.no_grad():
        theirs = backend.predict(latents, torch.tensor([0.4]), backend.encode_text(["a photo of sks"]))
        pipeline.unload_lora_weights()
        base = backend.predict(latents, torch.tensor([0.4]), backend.encode_text(["a photo of sks"]))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 100 * (theirs - ours).abs().max()


def test_diffusers_converter_splits_linear1_at_full_width_as_fuse_wrote_it() -> None:
    """On Flux.1's real widths (a transformer on the meta device, random LoRA tensors): every kohya layer `fuse`
    writes, linear1 included, goes through diffusers' kohya converter to each diffusers layer's own ΔW, so the
    file's names and row orders are the ones diffusers (and kohya) read."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
    )

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    modules = dict(transformer.named_modules())
    generator = torch.Generator().manual_seed(0)
    pieces, file = {}, {}
    for file_name, paths in bfl_layers(transformer).items():
        for path in paths:
            rows, columns = modules[path].weight.shape
            pieces[path] = {"lora_down.weight": torch.randn(2, columns, generator=generator),
                            "lora_up.weight": torch.randn(rows, 2, generator=generator), "alpha": torch.tensor(1.0)}
        fused = fuse(file_name, [pieces[path] for path in paths], [modules[path] for path in paths])
        file |= {f"{file_name}.{suffix}": value for suffix, value in fused.items()}
    converted = _convert_kohya_flux_lora_to_diffusers(file)
    assert len(converted) == 2 * len(pieces)
    for path, piece in pieces.items():  # ΔW on random inputs: the dense ΔWs of Flux's widths would take seconds
        inputs = torch.randn(modules[path].weight.shape[1], 3, generator=generator)
        theirs = converted[f"transformer.{path}.lora_B.weight"] @ (converted[f"transformer.{path}.lora_A.weight"] @ inputs)
        ours = piece["lora_up.weight"] @ (piece["lora_down.weight"] @ inputs) * 0.5
        torch.testing.assert_close(theirs, ours, msg=path)


@pytest.mark.skipif(not COMFYUI.is_dir(), reason="ComfyUI 0.3.64 is set up by scripts/setup_comfyui.sh")
def test_comfyui_maps_and_applies_every_module_of_the_file(dev, tmp_path) -> None:
    """LoRA, DoRA and LoHa files (fused qkv/linear1, CLIP-L) on ComfyUI's own Flux: every key loaded, every module a
    patch that changes its weight."""
    backend = FluxBackend(dev)
    files, modules = [], []
    for algorithm in ("lora", "dora", "loha"):
        network = randomized(LoRANetwork.create(backend.adapter_targets("full", True), algorithm, 4, 2))
        files.append(save_lora(tmp_path / f"{algorithm}.safetensors", network, {}, "float32",
                               file_tensors=backend.file_tensors))
        modules.append({key.split(".")[0] for key in load_file(files[-1])[0]})
    unet = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
            "context_in_dim": 64, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
    for report, file_modules in zip(comfy_reads("Flux", unet, files), modules):
        assert report["not_loaded"] == [] and report["errors"] == []
        assert report["unchanged"] == []
        assert report["patches"] == len(file_modules)


def test_cli_trains_a_saved_flux_base(dev, tmp_path) -> None:
    tensors, metadata = cli_trains(dev, tmp_path, "--flux-guidance", "1.5", "--preset", "attention")
    data, out = tmp_path / "concept", tmp_path / "lora.safetensors"
    assert metadata["ss_base_model_version"] == "flux1"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in tensors

    picture = tmp_path / "grid.png"  # generate reads the file back through the Flux naming
    done = subprocess.run(
        [sys.executable, "-m", "lora_core", "generate", "--base", str(tmp_path / "base"), "--lora", str(out),
         "--prompt", "a photo of sks", "--strength", "0", "1", "--size", "64", "--steps", "2", "--guidance", "3.5",
         "--out", str(picture)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Image.open(picture).size[0] > 64  # a labelled grid of two strengths

    refused = subprocess.run(  # LoKr cannot be fused into qkv: refused before the dataset is encoded
        [sys.executable, "-m", "lora_core", "train", "--base", str(tmp_path / "base"), "--data", str(data), "--out",
         str(tmp_path / "lokr.safetensors"), "--algorithm", "lokr", "--steps", "1", "--resolution", "64"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "LoKr" in refused.stderr and "training:" not in refused.stderr


def test_gradient_checkpointing_recomputes_the_same_training(dev, tmp_path) -> None:
    """Checkpointing the double and single blocks changes memory, not the losses (CLIP-L training included)."""
    check_gradient_checkpointing_recomputes_the_same_training(FluxBackend(dev), tmp_path, text_encoder=True)


def test_qlora_over_a_4bit_transformer_trains_and_saves_exactly(tmp_path) -> None:
    """DoRA over NF4 layers (the CLI's QLoRA path): it trains, and the fused file (single blocks' linear1 padded
    with the 4-bit proj_mlp's own row norms) loads back to the same ΔW and magnitudes."""
    from lora_core.quantize import quantize_linear_layers

    pipeline = build_tiny_flux(seed=4)
    assert quantize_linear_layers(pipeline.transformer) > 0
    backend = FluxBackend(pipeline)
    dataset = ImageFolderDataset(concept_images(tmp_path / "concept", 2), DatasetConfig(resolution=64))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "dora", 4, 4)
    result = train(backend, network, dataset, TrainingConfig(steps=2, learning_rate=1e-2, gradient_accumulation=1,
                                                              validation_every=0))
    assert np.isfinite(result.losses).all()
    path = save_lora(tmp_path / "qlora.safetensors", network, {}, "float32", file_tensors=backend.file_tensors)
    loaded, _ = load_lora(path, backend.loadable_modules(), network_tensors=backend.network_tensors)
    assert set(loaded.adapters) == set(network.adapters)
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.adapters[name].dora_scale, adapter.dora_scale, rtol=0, atol=0)


def test_a_bf16_transformer_gets_its_timestep_in_fp32() -> None:
    """As diffusers' Flux training script and ComfyUI pass it (FluxPipeline rounds it to the latents' dtype): in bf16
    σ = 0.7311 would be 0.7305."""
    pipeline = build_tiny_flux(seed=1)
    pipeline.transformer.to(torch.bfloat16)
    backend = FluxBackend(pipeline)
    calls = []
    hook = pipeline.transformer.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs["timestep"]),
                                                          with_kwargs=True)
    times = torch.tensor([0.7311, 0.0883])
    with torch.no_grad():
        backend.predict(torch.randn(2, 16, 8, 8), times, backend.encode_text(["a photo of sks", "a red circle"]))
    hook.remove()
    (timestep,) = calls
    assert timestep.dtype == torch.float32 and torch.equal(timestep, times)


def test_kontext_predict_is_the_pipelines_transformer_call_with_its_reference(dev) -> None:
    """FluxKontextPipeline's first step on a target and a reference image (their own sizes: `_auto_resize` off,
    `max_area` the target's) equals `predict` with the reference as `encode_reference_images` encodes it (the
    posterior's mean, scaled and shifted): the reference's tokens after the image's at id index 1, the output sliced
    to the image's."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    from lora_core.backend import REFERENCE_LATENTS

    pipeline = FluxKontextPipeline(**dev.components)
    backend = FluxBackend(pipeline, guidance=2.5)
    reference = Image.new("RGB", (64, 48), (40, 30, 210))
    calls = []
    hook = dev.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                 with_kwargs=True)
    try:
        pipeline(image=reference, prompt="a photo of sks", height=64, width=64, num_inference_steps=2,
                 guidance_scale=2.5, _auto_resize=False, max_area=64 * 64, output_type="latent",
                 generator=torch.Generator().manual_seed(0), max_sequence_length=backend.max_sequence_length)
    finally:
        hook.remove()
    inputs, output = calls[0]
    scale = dev.vae_scale_factor
    image_tokens = 16  # 64×64 px: 8×8 latents in 2×2 patches
    latents = FluxPipeline._unpack_latents(inputs["hidden_states"][:, :image_tokens], 64, 64, scale)
    pixels = pipeline.image_processor.preprocess(reference, 48, 64)
    with torch.no_grad():
        encoded = backend.encode_reference_images(pixels)
        theirs_reference = FluxPipeline._unpack_latents(inputs["hidden_states"][:, image_tokens:], 48, 64, scale)
        torch.testing.assert_close(encoded, theirs_reference, rtol=0, atol=1e-6)
        conditioning = {**backend.encode_text(["a photo of sks"]), REFERENCE_LATENTS: encoded[:, None]}
        ours = backend.predict(latents, inputs["timestep"], conditioning)
    theirs = FluxPipeline._unpack_latents(output[:, :image_tokens], 64, 64, scale)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_training_on_edit_pairs_lowers_the_loss_and_needs_the_reference(dev, tmp_path) -> None:
    from lora_core.backend import REFERENCE_LATENTS

    backend = FluxBackend(dev)
    dataset = ImageFolderDataset(edit_pairs(tmp_path / "pairs"), DatasetConfig(resolution=64, control_images=True))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4)
    result = train(backend, network, dataset, TrainingConfig(
        steps=30, learning_rate=1e-2, gradient_accumulation=1, validation_every=30, validation_timesteps=4))
    (_, before), (_, after) = result.validation
    print(f"flux kontext validation loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = backend.encode_text(["a photo of sks"])
    with torch.no_grad():
        reference = backend.encode_reference_images(dataset.reference_pixels(0)[0][None])
        alone = backend.predict(latents, torch.tensor([0.5]), conditioning)
        paired = backend.predict(latents, torch.tensor([0.5]), {**conditioning, REFERENCE_LATENTS: reference[:, None]})
    assert (paired - alone).abs().max() > 1e-3


def test_cli_trains_flux_on_edit_pairs(dev, tmp_path) -> None:
    dev.save_pretrained(tmp_path / "base")
    out = tmp_path / "kontext.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "lora_core", "train", "--base", str(tmp_path / "base"), "--data",
         str(edit_pairs(tmp_path / "pairs")), "--control-images", "--out", str(out), "--steps", "20", "--resolution",
         "64", "--rank", "4", "--lr", "1e-2", "--gradient-accumulation", "1", "--validation-every", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["best_step"] == 20, "the validation loss must fall"
    (tmp_path / "pairs" / "control" / "circle_01.png").unlink()
    refused = subprocess.run(
        [sys.executable, "-m", "lora_core", "train", "--base", str(tmp_path / "base"), "--data",
         str(tmp_path / "pairs"), "--control-images", "--out", str(tmp_path / "other.safetensors"), "--steps", "1",
         "--resolution", "64"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "circle_01.png has no reference image" in refused.stderr
