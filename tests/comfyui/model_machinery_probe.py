"""Checks of the ComfyUI backend on fixed tensors, run inside a ComfyUI checkout's Python (not its server).

`python model_machinery_probe.py COMFY_DIR CHECKPOINT SCRATCH_DIR` loads the checkpoint as CheckpointLoaderSimple does, runs
each check and prints one JSON object `{check: result}`; a check that raises reports `{"error": "..."}`. The
hand computations use only ComfyUI's own `model_sampling` and `BaseModel.apply_model`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui_lora_lab"
TIMESTEPS = [10, 500, 999]


def import_backend(comfy_dir: Path):
    """ComfyUI on the CPU (as `main.py --cpu`), and the pack's `nodes.comfy_backend` imported as ComfyUI would."""
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = pack
    spec.loader.exec_module(pack)
    return importlib.import_module(f"{PACK_NAME}.nodes.comfy_backend")


def fixed_inputs(clip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(TIMESTEPS), 4, 8, 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    cond = clip.encode_from_tokens(clip.tokenize("a photo of sks"))
    return latents, noise, torch.tensor(TIMESTEPS), cond.repeat(len(TIMESTEPS), 1, 1)


def targets_against_comfy(backend_module, model, clip, sampling: str, zsnr: bool) -> dict:
    """Loss per sample as the trainer computes it from the backend, and by hand from ComfyUI's model machinery.

    By hand: x = x0 + σ·ε (`noise_scaling`), x̂0 = `apply_model(x, σ)`; the ε error is (x0 − x̂0)/σ, the v error
    (x0 − x̂0)/√(1−ᾱ) with ᾱ = 1/(1+σ²), because x̂0 = x − σ·ε̂ for EPS and √ᾱ·x_t − √(1−ᾱ)·v̂ for V_PREDICTION."""
    import comfy.model_management
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    with torch.inference_mode():  # as ComfyUI runs every node
        (patched,) = ModelSamplingDiscrete().patch(model, sampling, zsnr)
        latents, noise, timesteps, cond = fixed_inputs(clip)
        backend = backend_module.ComfyBackend(patched, clip)
        comfy.model_management.load_models_gpu([patched])
        comfy_sampling = patched.model.model_sampling
        assert comfy_sampling is patched.object_patches["model_sampling"], "the patched sampling is not applied"
        sigma = comfy_sampling.sigmas[timesteps].reshape(-1, 1, 1, 1)
        denoised = patched.model.apply_model(comfy_sampling.noise_scaling(sigma, noise, latents), sigma.flatten(),
                                             c_crossattn=cond)
        scale = sigma if sampling == "eps" else sigma / (1 + sigma**2).sqrt()
        by_hand = ((latents - denoised) / scale).square().mean(dim=(1, 2, 3))

        with backend.training(False), torch.inference_mode(False), torch.no_grad():
            alpha_bar = backend.alphas_cumprod()[timesteps].reshape(-1, 1, 1, 1)
            noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
            target = noise if backend.prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
            trained = (backend.predict(noisy, timesteps, {"context": cond.clone()}) - target).square().mean(dim=(1, 2, 3))
    return {"prediction_type": backend.prediction_type, "trainer_loss": trained.tolist(), "hand_loss": by_hand.tolist(),
            "alpha_bar_last": float(backend.alphas_cumprod()[-1]),
            "comfy_alpha_bar_last": float(1 / (1 + comfy_sampling.sigmas[-1] ** 2))}


def training_without_copies(backend_module, model, clip) -> dict:
    """A forward and backward through UNet and CLIP adapters inside `training()`: which weights were copied,
    which got gradients, and whether MODEL and CLIP hold their original weights afterwards."""
    from comfyui_lora_lab.lora_core.network import LoRANetwork

    roots = [model.model.diffusion_model, clip.cond_stage_model]
    before = {id(p): p for root in roots for p in root.parameters()}
    with torch.inference_mode():
        backend = backend_module.ComfyBackend(model, clip)
        latents, noise, timesteps, _ = fixed_inputs(clip)
        with backend.training(True), torch.inference_mode(False), torch.enable_grad():
            network = LoRANetwork.create(backend.adapter_targets("attention", True), "lora", 4, 4.0, 0)
            for adapter in network.adapters.values():  # nonzero up weights, so both factors get gradients
                torch.nn.init.normal_(adapter.lora_up.weight, std=0.01)
            during = [p for root in roots for p in root.parameters()]
            base_pointers = {p.untyped_storage().data_ptr() for p in before.values()}
            with network.applied(1.0):
                cond = backend.encode_text(["a photo of sks"] * len(TIMESTEPS))
                backend.predict(latents + noise, timesteps, cond).square().mean().backward()
            without_grad = [name for name, adapter in network.items()
                            if any(p.grad is None or not p.grad.abs().sum() for p in adapter.parameters())]
    after = [p for root in roots for p in root.parameters()]
    return {
        "weight_bytes": sum(p.nbytes for p in during),
        "copied_bytes": sum(p.nbytes for p in during if p.untyped_storage().data_ptr() not in base_pointers),
        "inference_weights_during": sum(p.is_inference() for p in during),
        "adapters": len(network.adapters), "adapters_without_gradient": without_grad,
        "same_weights_after": all(id(p) in before and p.is_inference() for p in after) and len(after) == len(before),
    }


def block_swap_through_partial_loading(backend_module, model, clip, vae, folder: Path) -> dict:
    """Two steps of Train LoRA's loop with gradient checkpointing, without and with blocks_to_swap 4, on the MODEL
    with a weight patch on every attention output (as Load LoRA leaves one), so ComfyUI's per-layer patches run:
    the losses and LoRAs, the bytes ComfyUI left off during training, and the refusal without checkpointing."""
    import comfy.model_management
    from comfyui_lora_lab.lora_core.data.config import DatasetConfig
    from comfyui_lora_lab.lora_core.data.dataset import ImageFolderDataset
    from comfyui_lora_lab.lora_core.demo.demo import make_concept_images
    from comfyui_lora_lab.lora_core.network import LoRANetwork
    from comfyui_lora_lab.lora_core.training.config import TrainingConfig
    from comfyui_lora_lab.lora_core.training.loop import train

    dataset = ImageFolderDataset(make_concept_images(folder / "concept", count=2, resolution=64),
                                 DatasetConfig(resolution=64))
    runs, outcome = {}, {}
    with torch.inference_mode():
        patched = model.clone()
        state = patched.model.state_dict()
        generator = torch.Generator().manual_seed(0)
        patched.add_patches({key: (torch.randn(value.shape, generator=generator) * 0.01,) for key, value in state.items()
                             if key.endswith("attn1.to_out.0.weight")}, 1.0)
        for count in (0, 4):
            comfy.model_management.unload_all_models()
            backend = backend_module.ComfyBackend(patched, clip, vae, sample_size=64)
            with torch.inference_mode(False):
                network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4.0, 1)
            during = []

            def watch(report, backend=backend, during=during) -> None:
                during.append(sum(comfy.model_management.module_size(module) for module in backend.unet.modules()
                                  if getattr(module, "comfy_patched_weights", None) is False))

            config = TrainingConfig(steps=2, learning_rate=1e-3, validation_every=0, gradient_checkpointing=True,
                                    blocks_to_swap=count, sample_every=1, sample_steps=1)  # KSampler's load too
            try:
                result = train(backend, network, dataset, config, callback=watch)
            except backend_module.ComfyBackendError as error:  # a ComfyUI without partial loading
                return {"refused": str(error)}
            runs[count] = (result.losses, {key: value.clone() for key, value in network.state_dict().items()})
            outcome[f"off_device_bytes_{count}"] = during
        outcome["block_bytes_4"] = sum(tensor.nbytes for block in backend.checkpoint_blocks()[-4:]
                                       for tensor in block.parameters())
        outcome["refused"] = None
        outcome["lowvram_after"] = bool(patched.model.model_lowvram)
        with torch.inference_mode(False):
            dora = LoRANetwork.create(backend.adapter_targets("attention", False), "dora", 4, 4.0, 1)
        for name, trained, checkpointing in (("refused_without_checkpointing", network, False),
                                             ("refused_dora", dora, True)):
            try:  # refused before the dataset is encoded: a backend without a VAE would fail only there
                train(backend_module.ComfyBackend(patched, clip), trained, dataset,
                      TrainingConfig(steps=1, validation_every=0, blocks_to_swap=4,
                                     gradient_checkpointing=checkpointing))
                outcome[name] = None
            except backend_module.ComfyBackendError as error:
                outcome[name] = str(error)
    (losses, weights), (swapped_losses, swapped_weights) = runs[0], runs[4]
    outcome["same_losses"] = losses == swapped_losses
    outcome["same_lora"] = all(torch.equal(value, swapped_weights[key]) for key, value in weights.items())
    outcome["losses"] = [losses, swapped_losses]
    return outcome


def refuses_sdxl_refiner(backend_module) -> dict:
    """An SDXL-Refiner-shaped MODEL (ComfyUI's SDXLRefiner class, a one-level UNet with its ADM and context widths)."""
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {**comfy.supported_models.SDXLRefiner.unet_config, "image_size": 32, "in_channels": 4, "out_channels": 4,
                   "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
                   "transformer_depth_middle": 1, "model_channels": 32, "num_head_channels": 16,
                   "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential"}
    with torch.inference_mode():
        config = comfy.supported_models.SDXLRefiner(unet_config)
        model = comfy.model_patcher.ModelPatcher(config.get_model({}), torch.device("cpu"), torch.device("cpu"))
        try:
            backend_module.ComfyBackend(model, None)
        except backend_module.ComfyBackendError as error:
            return {"refused": str(error)}
    return {"refused": None}


def main() -> None:
    comfy_dir, checkpoint = Path(sys.argv[1]), sys.argv[2]
    backend_module = import_backend(comfy_dir)
    import comfy.sd

    with torch.inference_mode():  # as ComfyUI runs CheckpointLoaderSimple
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint)
    checks = {
        **{f"targets_{sampling}{'_zsnr' if zsnr else ''}": (targets_against_comfy, backend_module, model, clip, sampling, zsnr)
           for sampling, zsnr in (("eps", False), ("v_prediction", False), ("v_prediction", True))},
        "training_without_copies": (training_without_copies, backend_module, model, clip),
        "refuses_sdxl_refiner": (refuses_sdxl_refiner, backend_module),
        "block_swap": (block_swap_through_partial_loading, backend_module, model, clip, vae, Path(sys.argv[3])),
    }
    results = {}
    for name, (check, *arguments) in checks.items():
        try:
            results[name] = check(*arguments)
        except Exception as error:  # reported to the test, which names the check that failed
            results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
