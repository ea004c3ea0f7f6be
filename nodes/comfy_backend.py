"""The ComfyUI backend: MODEL, CLIP and VAE as `lora_core` sees a model. No math here, only ComfyUI plumbing.

The denoiser is trained as ComfyUI's samplers run it: noise levels and the prediction type come from the MODEL's
*patched* `model_sampling` (so ModelSamplingDiscrete v_prediction / zsnr applied before Train LoRA count), and the
diffusion model is called with the conditions `BaseModel.extra_conds` builds and the MODEL's transformer_options.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import comfy.model_management
import comfy.model_sampling
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from torch import nn

from ..lora_core.backend import Conditioning, TrainingBackend
from ..lora_core.files import data_hash
from ..lora_core.targets import (
    TEXT_ENCODER_PREFIX, TEXT_ENCODER_PRESET, UNET_PREFIX, all_adaptable, find_targets, kohya_name,
)

# A discrete schedule's prediction type is what its `calculate_denoised` does with the denoiser's output.
PREDICTION_TYPES = {
    comfy.model_sampling.EPS.calculate_denoised: "epsilon",
    comfy.model_sampling.V_PREDICTION.calculate_denoised: "v_prediction",
}
FAMILY_NAMES = {"SD15": "SD1.x", "SD20": "SD2.x", "SD21UnclipL": "SD2.1 unCLIP", "SD21UnclipH": "SD2.1 unCLIP",
                "SDXL": "SDXL", "SDXLRefiner": "SDXL Refiner", "SD3": "SD3", "Flux": "Flux.1",
                "FluxSchnell": "Flux.1 schnell", "SD15_instructpix2pix": "SD1.x instruct-pix2pix",
                "SDXL_instructpix2pix": "SDXL instruct-pix2pix"}
IMAGE_INPUT_FAMILIES = {9: "inpainting", 8: "instruct-pix2pix"}  # extra input channels: masked image (+ mask)
SUPPORTED = ("Train LoRA trains SD1.x and SD2.x text-to-image models with ε- or v-prediction (also as set by "
             "ModelSamplingDiscrete eps / v_prediction, with or without zsnr)")


class ComfyBackendError(ValueError):
    """The model cannot be trained here; the message says why."""


def model_sampling(model: Any) -> Any:
    """The MODEL's noise schedule with its object patches applied, as the samplers use it."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return model.object_patches.get("model_sampling", model.model.model_sampling)  # ComfyUI before mid-2024


def model_family(model: Any) -> str:
    """A reader's name for the MODEL's family: "SDXL", "SD1.x inpainting (9-channel)", …"""
    config = model.model.model_config
    name = FAMILY_NAMES.get(type(config).__name__, type(config).__name__)
    channels = config.unet_config.get("in_channels", 4)
    if channels in IMAGE_INPUT_FAMILIES and IMAGE_INPUT_FAMILIES[channels] not in name:
        name = f"{name} {IMAGE_INPUT_FAMILIES[channels]} ({channels}-channel)"
    return name


def trainable_prediction_type(model: Any) -> str:
    """"epsilon" or "v_prediction" for a MODEL the trainer can train; otherwise a ComfyBackendError naming the
    family, what stands in the way and what is supported."""
    base, sampling = model.model, model_sampling(model)
    unet_config = base.model_config.unet_config
    if not isinstance(base.diffusion_model, UNetModel):
        problem = f"its denoiser is a {type(base.diffusion_model).__name__}, not an SD UNet"
    elif unet_config.get("in_channels", 4) != unet_config.get("out_channels", 4):
        problem = f"its UNet takes {unet_config['in_channels']} input channels (image/mask conditioning)"
    elif unet_config.get("adm_in_channels") or unet_config.get("num_classes") is not None:
        problem = "it needs pooled/ADM conditioning (the UNet's `y` input)"
    elif not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        problem = f"its sampling is {type(sampling).__name__}, not a discrete DDPM schedule"
    elif type(sampling).calculate_denoised not in PREDICTION_TYPES:
        problem = "its sampling predicts neither ε nor v (lcm, x0)"
    else:
        return PREDICTION_TYPES[type(sampling).calculate_denoised]
    raise ComfyBackendError(f"this MODEL is {model_family(model)}: {problem}. {SUPPORTED}; other families are not "
                            "supported yet")


def diffusers_paths(model: Any) -> dict[str, str]:
    """LDM module path of the UNet → diffusers module path, from ComfyUI's own key map (kohya names use the latter)."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {
        ldm[: -len(".weight")]: diffusers[: -len(".weight")]
        for diffusers, ldm in mapping.items()
        if diffusers.endswith(".weight")
    }


def text_encoder_name(path: str) -> str:
    """kohya name of a CLIP layer: the path from `text_model.` on (ComfyUI nests it as `clip_l.transformer.…`)."""
    return kohya_name(TEXT_ENCODER_PREFIX, path[path.index("text_model."):])


def trainable_alias(tensor: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor on the same memory as an inference tensor: autograd may save it for backward, and
    nothing is copied. (The weights are frozen, so the inference tensor's missing version counter is no risk.)"""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


@contextmanager
def trainable_weights(modules: list[nn.Module]) -> Iterator[None]:
    """Inside the block, parameters and buffers made under `torch.inference_mode()` (as ComfyUI loads every model)
    are replaced by trainable aliases of the same memory; afterwards the originals are put back wherever ComfyUI
    has not meanwhile moved or re-patched the weight itself."""
    replaced: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode(False):
        for root in modules:
            for module in root.modules():
                for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    if tensor is None or not tensor.is_inference():
                        continue
                    alias = trainable_alias(tensor)
                    if isinstance(tensor, nn.Parameter):
                        alias = nn.Parameter(alias, requires_grad=False)
                        setattr(module, name, alias)
                    else:
                        module._buffers[name] = alias
                    replaced.append((module, name, tensor, alias))
    try:
        yield
    finally:
        for module, name, original, alias in reversed(replaced):
            current = getattr(module, name)
            if current is alias and alias.data_ptr() == original.data_ptr():
                (module._parameters if name in module._parameters else module._buffers)[name] = original


IN_PLACE_RESIDUAL_BLOCKS = frozenset({"BasicTransformerBlock", "CLIPLayer"})


@contextmanager
def copied_norm_inputs(roots: list[nn.Module]) -> Iterator[None]:
    """Older ComfyUI adds attention outputs in place (`x += n`) into the tensor its LayerNorms saved for backward;
    feeding each such block's norms a copy keeps autograd's saved input intact. Outputs are unchanged."""
    handles = [
        module.register_forward_pre_hook(lambda _, args: (args[0].clone(), *args[1:]))
        for root in roots
        for block in root.modules() if type(block).__name__ in IN_PLACE_RESIDUAL_BLOCKS
        for module in block.modules() if isinstance(module, nn.LayerNorm)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ComfyBackend(TrainingBackend):
    """Trains MODEL's denoiser through its patched `model_sampling`; encodes with the given VAE and CLIP."""

    def __init__(self, model: Any, clip: Any, vae: Any = None, sample_size: int = 512) -> None:
        self.prediction_type = trainable_prediction_type(model)
        self.model, self.clip, self.vae, self.sample_size = model, clip, vae, sample_size
        self.base_model = model.model
        self.unet = model.model.diffusion_model
        self.sampling = model_sampling(model)
        self.device = comfy.model_management.get_torch_device()
        self._diffusers_paths = diffusers_paths(model)

    @contextmanager
    def training(self, train_text_encoder: bool) -> Iterator[None]:
        """The denoiser (and CLIP, if its LoRA trains) loaded on the compute device with the MODEL's patches,
        trainable without a second copy of any weight; the models are as they were after the block.

        Loading outside inference mode (as ComfyUI's own TrainLoraNode does) makes every weight that ComfyUI moves
        or patches an ordinary tensor; those it leaves in place get trainable aliases. CLIP's weights get aliases
        even when only the denoiser loads, so a LoRA with text-encoder layers trains whatever the flag says."""
        patchers = [self.model] + ([self.clip.patcher] if train_text_encoder else [])
        with torch.inference_mode(False):
            comfy.model_management.load_models_gpu(patchers)
        modules = self.frozen_modules()
        with trainable_weights(modules), copied_norm_inputs(modules):
            yield

    def alphas_cumprod(self) -> torch.Tensor:
        return 1.0 / (1.0 + self.sampling.sigmas.float() ** 2)

    def compute_dtype(self) -> torch.dtype:
        return getattr(self.base_model, "manual_cast_dtype", None) or self.base_model.get_dtype()

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.vae is None:
            raise ComfyBackendError("a VAE is needed to encode the dataset; connect one to Train LoRA")
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel between images
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        # ComfyUI's VAE samples its posterior from the global generators; manual_seed reseeds the CPU's and every
        # CUDA device's, so all of them are restored afterwards
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            latents = self.vae.encode((pixels.movedim(1, -1) + 1) / 2)
        return self.base_model.process_latent_in(latents.to(self.device))

    def encode_text(self, captions: list[str]) -> Conditioning:
        contexts = [self.clip.encode_from_tokens(self.clip.tokenize(caption)) for caption in captions]
        return {"context": torch.cat(contexts).to(self.device)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
                ) -> torch.Tensor:
        """The diffusion model's raw output (ε or v) as `BaseModel.apply_model` computes it before converting it to
        x0: for x = x0 + σ_t·ε, ComfyUI's `calculate_input(σ_t, x)` is exactly `noisy_latents`, and the time input
        is `model_sampling.timestep(σ_t)`. Conditions come from `BaseModel.extra_conds`, patches from the MODEL's
        transformer_options."""
        dtype, device = self.compute_dtype(), noisy_latents.device
        sigmas = self.sampling.sigmas[timesteps.to(self.sampling.sigmas.device)]
        conds = {
            name: cond.process_cond(batch_size=len(noisy_latents), device=device).cond.to(device)
            for name, cond in self.base_model.extra_conds(cross_attn=conditioning["context"], noise=noisy_latents,
                                                          device=device).items()
        }
        context = conds.pop("c_crossattn").to(dtype)
        extra = {name: value.to(dtype) if value.is_floating_point() else value for name, value in conds.items()}
        options = {**self.model.model_options.get("transformer_options", {}), "sigmas": sigmas.to(device),
                   "cond_or_uncond": [0]}
        time = self.sampling.timestep(sigmas).float().to(device)
        return self.unet(noisy_latents.to(dtype), time, context=context, transformer_options=options, **extra).float()

    def unet_names(self, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        return {
            kohya_name(UNET_PREFIX, self._diffusers_paths[path]): module
            for path, module in modules.items()
            if path in self._diffusers_paths
        }

    def weight_key(self, name: str) -> tuple[str, str]:
        """ComfyUI's patch key for the weight of kohya layer `name`, and whose patcher holds it: "model" or "clip"."""
        if name.startswith(TEXT_ENCODER_PREFIX):
            for path, _ in all_adaptable(self.clip.cond_stage_model).items():
                if "text_model." in path and text_encoder_name(path) == name:
                    return f"{path}.weight", "clip"
        else:
            for path, diffusers in self._diffusers_paths.items():
                if kohya_name(UNET_PREFIX, diffusers) == name:
                    return f"diffusion_model.{path}.weight", "model"
        raise ComfyBackendError(f"no layer of this model is called {name}")

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        targets = self.unet_names(find_targets(self.unet, preset))
        if text_encoder:
            clip_layers = find_targets(self.clip.cond_stage_model, TEXT_ENCODER_PRESET)
            targets.update({text_encoder_name(path): module for path, module in clip_layers.items()})
        return targets

    def loadable_modules(self) -> dict[str, nn.Module]:
        clip_layers = all_adaptable(self.clip.cond_stage_model) if self.clip is not None else {}
        return {
            **self.unet_names(all_adaptable(self.unet)),
            **{text_encoder_name(path): module for path, module in clip_layers.items() if "text_model." in path},
        }

    def frozen_modules(self) -> list[nn.Module]:
        return [self.unet] + ([self.clip.cond_stage_model] if self.clip is not None else [])

    def checkpoint_blocks(self) -> list[nn.Module]:
        return [*self.unet.input_blocks, self.unet.middle_block, *self.unet.output_blocks]

    def vae_fingerprint(self) -> str:
        return data_hash(self.vae.first_stage_model.state_dict())

    def conditioning(self, text: str) -> list:
        """ComfyUI's CONDITIONING for `text`, as CLIPTextEncode makes it."""
        cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    def sample_images(self, prompts: list[str], seed: int, steps: int) -> list:
        """KSampler (euler, cfg 7) and VAE Decode, as the core nodes do it, with the LoRA attached."""
        import nodes as comfy_nodes  # ComfyUI's own nodes module
        from PIL import Image

        size = self.sample_size // 8
        images = []
        for prompt in prompts:
            comfy.model_management.throw_exception_if_processing_interrupted()  # KSampler checks between its steps
            latent = {"samples": torch.zeros(1, 4, size, size)}
            (sampled,) = comfy_nodes.common_ksampler(self.model, seed, steps, 7.0, "euler", "normal",
                                                     self.conditioning(prompt), self.conditioning(""), latent)
            pixels = self.vae.decode(sampled["samples"])[0]
            images.append(Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().cpu().numpy()))
        return images

    def model_info(self) -> dict[str, str]:
        context_dim = self.base_model.model_config.unet_config.get("context_dim")
        return {"version": "sd_v1" if context_dim == 768 else "sd_v2"}
