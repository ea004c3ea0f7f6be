"""Chroma (Flux.1-schnell's architecture without its modulation layers: a distilled guidance approximator makes the
modulations) with diffusers' ChromaPipeline: T5 alone, no pooled or guidance input, Flux's 2×2 packing, σ as the
time input, the scheduler's resolution shift.

Files use kohya's names over Black Forest Labs' layers, as for Flux (`lora_unet_double_blocks_0_img_attn_qkv`,
`…single_blocks_0_linear1`, diffusers' q/k/v fused exactly), which kohya's Chroma training writes, ComfyUI's key map
reads and diffusers' Flux converter reads at Chroma's full width; ai-toolkit's `diffusion_model.<BFL path>.lora_A/B`
and diffusers' `transformer.<path>` files load too."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backend import Conditioning
from ..targets import TargetError, TargetPreset
from ..training.objectives import FlowMatchingObjective
from .family import (
    BFL_DOUBLE_BLOCKS,
    BFL_SINGLE_BLOCKS,
    DIFFUSERS_SINGLE_BLOCKS,
    BlockLayout,
    Family,
)
from .flow import flow_objective, transformer_presets
from .flux import BFL_ATTENTION, BFL_BLOCKS, FLUX_ATTENTION, FLUX_MLP, BflBackend

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

CHROMA_BLOCKS = frozenset({"ChromaTransformerBlock", "ChromaSingleTransformerBlock"})
ATTENTION_DESCRIPTION = ("q/k/v/out of the double blocks' attention (both streams); the single blocks' linear1 and "
                         "linear2 whole, where attention is fused with the MLP")
FULL_DESCRIPTION = ("every Linear of the double and single blocks (Chroma's modulations come from its distilled "
                    "guidance layer, which no preset adapts)")
CHROMA_PRESETS = transformer_presets(CHROMA_BLOCKS, FLUX_ATTENTION, FLUX_MLP, ATTENTION_DESCRIPTION, FULL_DESCRIPTION)
BFL_CHROMA_PRESETS = {  # ComfyUI's Chroma blocks are Flux's classes, without modulation Linears
    "attention": TargetPreset(BFL_BLOCKS, False, BFL_ATTENTION, ATTENTION_DESCRIPTION),
    "transformer": TargetPreset(BFL_BLOCKS, False, (*BFL_ATTENTION, "_mlp.0", "_mlp.2"),
                                "attention plus the double blocks' MLPs"),
    "full": TargetPreset(BFL_BLOCKS, False, (), FULL_DESCRIPTION),
}
CHROMA = Family(
    "Chroma", "chroma", "chroma", __name__, "ChromaBackend", ("ChromaPipeline",), {"Chroma": "Chroma"}, "Chroma",
    ("double_blocks", "single_blocks"), CHROMA_PRESETS, BFL_CHROMA_PRESETS, {},
    BlockLayout("Chroma", groups=("D", "S"), patterns=(
        (re.compile(r"lora_unet_double_blocks_(\d+)(_|$)"), "D"),
        (re.compile(r"lora_unet_single_blocks_(\d+)(_|$)"), "S"),
        (re.compile(r"(?:transformer|diffusion_model)\.transformer_blocks\.(\d+)\."), "D"),
        (re.compile(r"(?:transformer|diffusion_model)\.single_transformer_blocks\.(\d+)\."), "S"))),
    comfy_variants={"ChromaRadiance": "Chroma Radiance (pixel space)"}, flow=True, sample_cfg=4.0,
    sample_scheduler="simple", file_prefixes={"diffusion_model.": "lora_unet_"},  # ai-toolkit's
    file_markers=(BFL_DOUBLE_BLOCKS, BFL_SINGLE_BLOCKS, DIFFUSERS_SINGLE_BLOCKS, r"distilled_guidance_layer"))


class ChromaBackend(BflBackend):
    """ChromaPipeline for training: the trainer sees unpacked latents [B, 16, H, W]; `predict` packs them 2×2.
    Each caption is T5's states of its tokens, EOS and one pad token (what the pipeline's mask keeps, as kohya trims
    them); a batch of different lengths is padded with a mask that attention honours."""

    family = CHROMA.name
    spec = CHROMA
    presets = CHROMA_PRESETS
    sample_guidance = 4.0
    max_sequence_length = 512  # T5 tokens, the pipeline's limit

    def objective(self, config: TrainingConfig) -> FlowMatchingObjective:
        """Logit-normal σ shifted as the pipeline's scheduler shifts it (by resolution where it shifts dynamically,
        else by its fixed shift); σ itself is the transformer's time input (the pipeline passes timestep / 1000)."""
        scheduler = self.pipeline.scheduler.config
        shift = None if scheduler.use_dynamic_shifting else scheduler.shift
        return flow_objective(config, CHROMA, 1, shift, scheduler.base_shift, scheduler.max_shift)

    def encode_text(self, captions: list[str]) -> Conditioning:
        context, _, mask, *_ = self.pipeline.encode_prompt(
            captions, device=self.text_encoder.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        kept = int(mask.sum(1).max())
        return {"context": context[:, :kept], "context_mask": mask[:, :kept].long()}

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's velocity; σ goes in as fp32. The text mask goes in as booleans: ChromaPipeline (diffusers
        0.42.1) passes it as 0/1 floats, which attention adds to its scores instead of masking (diffusers#12116)."""
        from diffusers import ChromaPipeline

        batch, channels, height, width = noisy_latents.shape
        self.check_packable(height, width)
        dtype = self.transformer.dtype
        packed = ChromaPipeline._pack_latents(noisy_latents.to(dtype), batch, channels, height, width)
        image_ids = ChromaPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, dtype)
        context, mask = conditioning["context"].to(dtype), conditioning["context_mask"].bool()
        attention_mask = None if bool(mask.all()) else torch.cat([mask, mask.new_ones(batch, packed.shape[1])], 1)
        velocity = self.transformer(
            hidden_states=packed, timestep=times.float(), encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=self.device, dtype=dtype), img_ids=image_ids,
            attention_mask=attention_mask, return_dict=False,
        )[0]
        scale = self.pipeline.vae_scale_factor
        return ChromaPipeline._unpack_latents(velocity, height * scale, width * scale, scale)

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        if text_encoder:
            raise TargetError(f"{self.family}'s only text encoder is T5, which LoRA Lab never trains: its outputs are "
                              "encoded once and cached; turn train_text_encoder off")
        return self.denoiser_targets(preset)

    def loadable_modules(self) -> dict[str, nn.Module]:
        return self.denoiser_targets("full")
