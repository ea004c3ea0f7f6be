"""The ComfyUI backend: MODEL, CLIP and VAE as `lora_core` sees a model. No math here, only ComfyUI plumbing."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import comfy.model_management
import comfy.utils
import torch
from torch import nn

from ..lora_core.backend import TrainingBackend
from ..lora_core.files import data_hash
from ..lora_core.targets import (
    TEXT_ENCODER_PREFIX, TEXT_ENCODER_PRESET, UNET_PREFIX, all_adaptable, find_targets, kohya_name,
)

PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


class ComfyBackendError(ValueError):
    """The model cannot be trained here; the message says why."""


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


@contextmanager
def trainable_copies(modules: list[nn.Module]) -> Iterator[None]:
    """Inside the block, parameters and buffers made under `torch.inference_mode()` (as ComfyUI loads every model)
    are replaced by ordinary copies that autograd may save; the originals are put back afterwards, untouched."""
    replaced: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
    with torch.inference_mode(False):
        for root in modules:
            for module in root.modules():
                for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    if tensor is None or not tensor.is_inference():
                        continue
                    is_parameter = isinstance(tensor, nn.Parameter)
                    copy = tensor.detach().clone()
                    replaced.append((module, name, tensor, is_parameter))
                    if is_parameter:
                        setattr(module, name, nn.Parameter(copy, requires_grad=False))
                    else:
                        module._buffers[name] = copy
    try:
        yield
    finally:
        for module, name, original, is_parameter in reversed(replaced):
            if is_parameter:
                setattr(module, name, original)
            else:
                module._buffers[name] = original


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
    """Trains through MODEL's diffusion model and its own `model_sampling`; encodes with the given VAE and CLIP."""

    def __init__(self, model: Any, clip: Any, vae: Any = None, sample_size: int = 512) -> None:
        self.model, self.clip, self.vae, self.sample_size = model, clip, vae, sample_size
        self.base_model = model.model
        self.unet = model.model.diffusion_model
        model_type = getattr(model.model, "model_type", None)
        if getattr(model_type, "name", None) not in PREDICTION_TYPES:
            raise ComfyBackendError(
                f"LoRA Lab trains ε- and v-prediction models (SD1.x/SD2.x); this MODEL is {model_type}"
            )
        self.prediction_type = PREDICTION_TYPES[model_type.name]
        self.device = comfy.model_management.get_torch_device()
        self._diffusers_paths = diffusers_paths(model)

    @contextmanager
    def loaded(self, train_text_encoder: bool) -> Iterator[None]:
        """The models on the compute device with their patches applied, trainable, restored afterwards."""
        patchers = [self.model] + ([self.clip.patcher] if train_text_encoder else [])
        comfy.model_management.load_models_gpu(patchers)
        modules = [self.unet] + ([self.clip.cond_stage_model] if train_text_encoder else [])
        with trainable_copies(modules), copied_norm_inputs(modules):
            yield

    def alphas_cumprod(self) -> torch.Tensor:
        sigmas = self.base_model.model_sampling.sigmas.float()
        return 1.0 / (1.0 + sigmas**2)

    def compute_dtype(self) -> torch.dtype:
        return getattr(self.base_model, "manual_cast_dtype", None) or self.base_model.get_dtype()

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.vae is None:
            raise ComfyBackendError("a VAE is needed to encode the dataset; connect one to Train LoRA")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):  # ComfyUI's VAE samples its posterior from the global generator
            torch.manual_seed(seed)
            latents = self.vae.encode((pixels.movedim(1, -1) + 1) / 2)
        return self.base_model.process_latent_in(latents.to(self.device))

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return torch.cat([self.clip.encode_from_tokens(self.clip.tokenize(caption)) for caption in captions]).to(self.device)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        dtype = self.compute_dtype()
        return self.unet(noisy_latents.to(dtype), timesteps.float(), context=conditioning.to(dtype)).float()

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
            latent = {"samples": torch.zeros(1, 4, size, size)}
            (sampled,) = comfy_nodes.common_ksampler(self.model, seed, steps, 7.0, "euler", "normal",
                                                     self.conditioning(prompt), self.conditioning(""), latent)
            pixels = self.vae.decode(sampled["samples"])[0]
            images.append(Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().cpu().numpy()))
        return images

    def model_info(self) -> dict[str, str]:
        context_dim = self.base_model.model_config.unet_config.get("context_dim")
        return {"version": "sd_v1" if context_dim == 768 else "sd_v2"}
