"""SD1.x and SD2.x: their descriptions, and the diffusers backend: a StableDiffusionPipeline (UNet, VAE, CLIP text
encoder, its scheduler) for training and for generating with a LoRA at a strength."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backend import Conditioning, TrainingBackend
from ..formats.files import data_hash
from ..network import LoRANetwork
from ..targets import (
    TEXT_ENCODER_PREFIX,
    TEXT_ENCODER_PRESET,
    UNET_PREFIX,
    UNET_PRESETS,
    all_adaptable,
    find_targets,
    kohya_paths,
    named_for_kohya,
)
from .family import TEXT_ENCODER_BLOCK, BlockLayout, Family, numbered

UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")  # ComfyUI's (LDM) UNet, SD1.x to SDXL
# A UNet's layers in diffusers' and the LDM paths, and the CLIP text encoder's (SD1.x to SDXL alike)
UNET_MARKERS = (r"(down|up)_blocks_\d+_(attentions|resnets)_\d+_", r"(input|output)_blocks_\d+_\d+_", r"mid(dle)?_block_",
                r"^lora_te\d?_text_model_encoder_layers_")
# IN/OUT numbers are the LDM UNet's input_blocks/output_blocks indices: 17 blocks with attention, or all 26
SD1_BLOCKS = BlockLayout(
    "SD1.x",
    ((TEXT_ENCODER_BLOCK, *numbered("IN", (1, 2, 4, 5, 7, 8)), "MID", *numbered("OUT", range(3, 12))),
     (TEXT_ENCODER_BLOCK, *numbered("IN", range(12)), "MID", *numbered("OUT", range(12)))),
    presets={  # hako-mikan/sd-webui-lora-block-weight's presets, 17 values
        "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
        "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
        "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
        "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
        "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
        "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
        "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    })
SD1 = Family(
    "SD1.x", "sd_v1", "stable-diffusion-v1", __name__, "DiffusersBackend", ("StableDiffusionPipeline",),
    {"SD15": "SD1.x"}, "UNetModel", UNET_BLOCKS, UNET_PRESETS, UNET_PRESETS, {"clip_l": TEXT_ENCODER_PREFIX},
    SD1_BLOCKS, comfy_variants={"SD15_instructpix2pix": "SD1.x instruct-pix2pix"}, ldm_names=False,
    file_markers=UNET_MARKERS, context_width=768,
    unet_activations=(324.0, 142.0))  # measured on SD1.5's UNet at 512 px (docs/benchmarks.md)
# SD2.x: the same pipeline and backend (which tells the versions apart by the UNet), OpenCLIP-H as ComfyUI's clip_h
SD2 = Family(
    "SD2.x", "sd_v2", "stable-diffusion-v2-512", __name__, "DiffusersBackend", (),
    {"SD20": "SD2.x"}, "UNetModel", UNET_BLOCKS, UNET_PRESETS, UNET_PRESETS, {"clip_h": TEXT_ENCODER_PREFIX},
    SD1_BLOCKS, comfy_variants={"SD21UnclipL": "SD2.1 unCLIP", "SD21UnclipH": "SD2.1 unCLIP"},
    modelspec_v="stable-diffusion-v2-768-v", ldm_names=False, file_markers=UNET_MARKERS, context_width=1024,
    unet_activations=SD1.unet_activations)  # SD1's widths and levels: planned with SD1.5's, not measured


class DiffusersBackend(TrainingBackend):
    """Trains on the pipeline's own modules; `name` and `hash` go into the LoRA file's metadata."""

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "") -> None:
        self.pipeline = pipeline
        self.unet, self.vae, self.text_encoder, self.tokenizer = (
            pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
        )
        self.prediction_type = pipeline.scheduler.config.prediction_type
        self.device = self.unet.device
        self.name, self.model_hash = name, model_hash

    def alphas_cumprod(self) -> torch.Tensor:
        return self.pipeline.scheduler.alphas_cumprod.float()

    def compute_dtype(self) -> torch.dtype:
        return self.unet.dtype

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        distribution = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return distribution.sample(generator=generator) * self.vae.config.scaling_factor

    def encode_text(self, captions: list[str]) -> Conditioning:
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        return {"context": self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
                ) -> torch.Tensor:
        context = conditioning["context"].to(self.unet.dtype)
        return self.unet(noisy_latents.to(self.unet.dtype), timesteps, encoder_hidden_states=context).sample

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        targets = named_for_kohya(UNET_PREFIX, find_targets(self.unet, preset))
        if text_encoder:
            targets.update(self.text_encoder_names(find_targets(self.text_encoder, TEXT_ENCODER_PRESET)))
        return targets

    def loadable_modules(self) -> dict[str, nn.Module]:
        return {
            **named_for_kohya(UNET_PREFIX, all_adaptable(self.unet)),
            **self.text_encoder_names(all_adaptable(self.text_encoder)),
        }

    def text_encoder_names(self, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """kohya names (`lora_te_text_model_…`) of text-encoder layers, under transformers 4 and 5 alike."""
        return named_for_kohya(TEXT_ENCODER_PREFIX, kohya_paths(self.text_encoder, modules))

    def frozen_modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    def checkpoint_blocks(self) -> list[nn.Module]:
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]

    def unet_activations(self) -> tuple[float, float]:
        return SD2.unet_activations if base_model_version(self.unet.config) == SD2.version else SD1.unet_activations

    def vae_fingerprint(self) -> str:
        if not hasattr(self, "_vae_fingerprint"):
            self._vae_fingerprint = data_hash(self.vae.state_dict())
        return self._vae_fingerprint

    def sample_images(self, prompts: list[str], seed: int, steps: int) -> list:
        return [generate(self.pipeline, None, prompt, seed=seed, steps=steps) for prompt in prompts]

    def model_info(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.model_hash, "version": base_model_version(self.unet.config)}


def base_model_version(unet_config: Any) -> str:
    """kohya's `ss_base_model_version` of an SD1.x/2.x UNet: SD2 by OpenCLIP-H's 1024-wide context, anything else
    (SD1.x and SD1.x-shaped test models) sd_v1."""
    return SD2.version if unet_config.cross_attention_dim == 1024 else SD1.version


@torch.no_grad()
def generate(
    pipeline: Any,
    network: LoRANetwork | None,
    prompt: str,
    strength: float = 1.0,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    size: int | None = None,
    output_type: str = "pil",
    negative_prompt: str | None = None,
):
    """One image (or latent, with `output_type="latent"`) for `prompt` with `network` applied at `strength`.

    The same seed gives the same starting noise at every strength, so images differ only by the LoRA.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    arguments = dict(
        prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
        generator=generator, output_type=output_type, height=size, width=size,
    )
    if network is None:
        return pipeline(**arguments).images[0]
    with network.applied(strength):
        return pipeline(**arguments).images[0]
