"""SDXL (ε and v-prediction) with diffusers' StableDiffusionXLPipeline: two text encoders, the size/crop
micro-conditioning, and kohya's file names over the original SGM UNet's blocks.

kohya sd-scripts trains SDXL on Stability's SGM UNet, so its SDXL LoRAs name UNet layers by that UNet's blocks
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); ComfyUI, A1111/Forge and diffusers' kohya converter
read those names. The map from diffusers' blocks to SGM's follows the SGM layout as ComfyUI's
`comfy.utils.unet_to_diffusers` and diffusers' `_maybe_map_sgm_blocks_to_diffusers` describe it: `input_blocks.0` is
conv_in, then per level one input block per res block (res block at `.0`, its transformer at `.1`) and one for the
downsampler (`.0.op`); `middle_block.0/1/2` = res block, transformer, res block; `output_blocks` from the deepest level
up, one per res block, the level's upsampler (`.conv`) after the last one's res block and transformer.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backend import SIZE_CONDITIONING, Conditioning
from ..errors import LoRALabError
from ..targets import (
    TEXT_ENCODER_PRESET,
    UNET_PREFIX,
    UNET_PRESETS,
    all_adaptable,
    find_targets,
    kohya_paths,
    named_for_kohya,
)
from .family import TEXT_ENCODER_BLOCK, BlockLayout, Family, numbered
from .sd1 import UNET_BLOCKS, UNET_MARKERS, DiffusersBackend

# SGM names of the layers inside a res block, by diffusers' names (ComfyUI's UNET_MAP_RESNET)
RESNET_LAYERS = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                 "conv_shortcut": "skip_connection"}
# SGM names of the layers outside the blocks (ComfyUI's UNET_MAP_BASIC)
OUTER_LAYERS = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2"}
TEXT_ENCODERS = {"clip_l": "lora_te1", "clip_g": "lora_te2"}  # ComfyUI's CLIP-L, OpenCLIP-G → kohya prefix
SDXL = Family(
    "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", __name__, "SDXLBackend", ("StableDiffusionXLPipeline",),
    {"SDXL": "SDXL"}, "UNetModel", UNET_BLOCKS, UNET_PRESETS, UNET_PRESETS, TEXT_ENCODERS,
    BlockLayout("SDXL", ((TEXT_ENCODER_BLOCK, *numbered("IN", (4, 5, 7, 8)), "MID", *numbered("OUT", range(6))),
                         (TEXT_ENCODER_BLOCK, *numbered("IN", range(9)), "MID", *numbered("OUT", range(9))))),
    comfy_variants={"SDXLRefiner": "SDXL Refiner", "SDXL_instructpix2pix": "SDXL instruct-pix2pix"},
    modelspec_implementation="https://github.com/Stability-AI/generative-models", adm=True,
    file_markers=(*UNET_MARKERS, r"^lora_te[12]_"), context_width=2048,
    unet_activations=(585.0, 250.0))  # measured on SDXL's UNet at 512 px (docs/benchmarks.md)


class SDXLNamingError(LoRALabError, ValueError):
    """A UNet layer has no place in SDXL's SGM layout; the message names it."""


def sgm_blocks(unet: nn.Module) -> dict[str, str]:
    """diffusers path → SGM path of every block (res block, transformer, sampler conv) of an SDXL-layout UNet."""
    blocks: dict[str, str] = {}
    index = 1  # input_blocks.0 is conv_in
    for level, down in enumerate(unet.down_blocks):
        for i in range(len(down.resnets)):
            blocks[f"down_blocks.{level}.resnets.{i}"] = f"input_blocks.{index}.0"
            if getattr(down, "attentions", None):
                blocks[f"down_blocks.{level}.attentions.{i}"] = f"input_blocks.{index}.1"
            index += 1
        if down.downsamplers:
            blocks[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    blocks.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                   "mid_block.resnets.1": "middle_block.2"})
    index = 0
    for level, up in enumerate(unet.up_blocks):
        attends = bool(getattr(up, "attentions", None))
        for i in range(len(up.resnets)):
            blocks[f"up_blocks.{level}.resnets.{i}"] = f"output_blocks.{index}.0"
            if attends:
                blocks[f"up_blocks.{level}.attentions.{i}"] = f"output_blocks.{index}.1"
            index += 1
        if up.upsamplers:
            blocks[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{2 if attends else 1}.conv"
    return blocks


def sgm_path(path: str, blocks: dict[str, str]) -> str:
    """The SGM module path of the diffusers UNet layer `path` (`blocks` from `sgm_blocks`)."""
    if path in OUTER_LAYERS:
        return OUTER_LAYERS[path]
    for block, sgm in blocks.items():
        if path == block:
            return sgm
        if path.startswith(f"{block}."):
            inner = path[len(block) + 1:]
            if ".resnets." in block:
                if inner not in RESNET_LAYERS:
                    break
                inner = RESNET_LAYERS[inner]
            return f"{sgm}.{inner}"
    raise SDXLNamingError(f"UNet layer {path} has no name in SDXL's SGM layout, so kohya, ComfyUI and diffusers "
                          "could not load a LoRA on it; train on the SDXL UNet as saved, without layers added to it "
                          "(an IP-Adapter's, for example)")


def sgm_names(unet: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """kohya names (`lora_unet_input_blocks_…`) of UNet layers given by their diffusers paths."""
    blocks = sgm_blocks(unet)
    return named_for_kohya(UNET_PREFIX, {sgm_path(path, blocks): module for path, module in modules.items()})


class SDXLBackend(DiffusersBackend):
    """Trains a StableDiffusionXLPipeline: context = CLIP-L and OpenCLIP-G penultimate states side by side, pooled =
    OpenCLIP-G's projected pooled output, `time_ids` = each image's size and crop, as the pipeline computes them."""

    family = SDXL.name

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "") -> None:
        super().__init__(pipeline, name, model_hash)
        self.text_encoder_2, self.tokenizer_2 = pipeline.text_encoder_2, pipeline.tokenizer_2

    def unet_activations(self) -> tuple[float, float]:
        return SDXL.unet_activations

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not (self.vae.dtype == torch.float16 and self.vae.config.force_upcast):
            return super().encode_images(pixels, generator)
        self.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; its config asks for fp32, as the pipeline does
        try:
            return super().encode_images(pixels, generator)
        finally:
            self.vae.to(torch.float16)

    def encode_text(self, captions: list[str]) -> Conditioning:
        states = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                               return_tensors="pt")
            output = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
            states.append(output.hidden_states[-2])
        return {"context": torch.cat(states, dim=-1), "pooled": output.text_embeds}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
                ) -> torch.Tensor:
        if SIZE_CONDITIONING not in conditioning:
            raise ValueError(f"SDXL's denoiser needs each image's size and crop: add {SIZE_CONDITIONING!r} "
                             "(original h, w, crop top, left, target h, w) to the conditioning")
        dtype = self.unet.dtype
        added = {"text_embeds": conditioning["pooled"].to(dtype), "time_ids": conditioning[SIZE_CONDITIONING].to(dtype)}
        return self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=conditioning["context"].to(dtype),
                         added_cond_kwargs=added).sample

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        targets = sgm_names(self.unet, find_targets(self.unet, preset))
        if text_encoder:
            targets.update(self.text_encoders_names(lambda encoder: find_targets(encoder, TEXT_ENCODER_PRESET)))
        return targets

    def loadable_modules(self) -> dict[str, nn.Module]:
        return {**sgm_names(self.unet, all_adaptable(self.unet)), **self.text_encoders_names(all_adaptable)}

    def text_encoders_names(self, select) -> dict[str, nn.Module]:
        """kohya names (`lora_te1_text_model_…`, `lora_te2_text_model_…`) of the layers `select` picks in each text
        encoder, under transformers 4 and 5 alike."""
        names: dict[str, nn.Module] = {}
        for prefix, encoder in zip(TEXT_ENCODERS.values(), (self.text_encoder, self.text_encoder_2)):
            names.update(named_for_kohya(prefix, kohya_paths(encoder, select(encoder))))
        return names

    def frozen_modules(self) -> list[nn.Module]:
        return [*super().frozen_modules(), self.text_encoder_2]

    def model_info(self) -> dict[str, str]:
        return {**super().model_info(), "version": SDXL.version}
