"""Lumina 2 (Lumina-Image-2.0, NextDiT) with diffusers' Lumina2Pipeline: a single-stream DiT over 2×2 patches of
Flux's VAE latents, conditioned on Gemma-2's second-to-last hidden states of the caption after the pipeline's system
prompt (never trained: encoded once and cached), through two refiners (the image's and the caption's) and the joint
layers. Its output is x0 − ε at time input 1 − σ: the velocity negated (Lumina2Pipeline, ComfyUI's NextDiT).

Files use kohya's names over NextDiT's layers (`lora_unet_layers_0_attention_qkv`), as sd-scripts' Lumina training
writes them and ComfyUI's key map reads them: diffusers' to_q/to_k/to_v are fused exactly into NextDiT's qkv.
diffusion-pipe's `diffusion_model.<NextDiT path>.lora_A/B` and diffusers' `transformer.<path>` files load too.
diffusers 0.42.1's `load_lora_weights` reads none of kohya's names for Lumina 2: only `diffusion_model.` files that
adapt every Linear of every block, at Lumina-Image-2.0's own width (its converter splits qkv at fixed sizes)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backend import Conditioning
from ..targets import TargetError, TargetPreset
from ..training.objectives import FlowMatchingObjective
from .family import BlockLayout, Family
from .flow import flow_objective, transformer_presets
from .flux import FusedFileBackend

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

LUMINA_BLOCKS = frozenset({"Lumina2TransformerBlock"})  # the joint layers and both refiners
LUMINA_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
LUMINA_MLP = ("feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3")
ATTENTION_DESCRIPTION = "q/k/v/out of every block's attention (the joint layers and both refiners)"
FULL_DESCRIPTION = ("every Linear of every block (joint layers and refiners), the modulation included; not the "
                    "embedders or the final layer")
LUMINA_PRESETS = transformer_presets(LUMINA_BLOCKS, LUMINA_ATTENTION, LUMINA_MLP, ATTENTION_DESCRIPTION,
                                     FULL_DESCRIPTION)
NEXTDIT_BLOCKS = frozenset({"JointTransformerBlock"})  # ComfyUI's NextDiT: the same blocks under their own names
NEXTDIT_ATTENTION = ("attention.qkv", "attention.out")
NEXTDIT_PRESETS = {
    "attention": TargetPreset(NEXTDIT_BLOCKS, False, NEXTDIT_ATTENTION, ATTENTION_DESCRIPTION),
    "transformer": TargetPreset(NEXTDIT_BLOCKS, False, (*NEXTDIT_ATTENTION, "feed_forward.w1", "feed_forward.w2",
                                                        "feed_forward.w3"), "attention and MLP Linears of every block"),
    "full": TargetPreset(NEXTDIT_BLOCKS, False, (), FULL_DESCRIPTION),
}
NEXTDIT_GROUPS = ("noise_refiner", "context_refiner", "layers")  # NextDiT's and diffusers' names alike
# What the pipeline puts before every prompt (Lumina2Pipeline's system_prompt; ComfyUI's CLIPTextEncodeLumina2 with
# its "superior" system prompt builds the same text): captions are encoded inside it, as prompts are at sampling time.
SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                 "alignment based on textual prompts or user prompts.")
LUMINA2 = Family(
    "Lumina 2", "lumina2", "lumina-2", __name__, "Lumina2Backend", ("Lumina2Pipeline",), {"Lumina2": "Lumina 2"},
    "NextDiT", NEXTDIT_GROUPS, LUMINA_PRESETS, NEXTDIT_PRESETS, {},
    BlockLayout("Lumina 2", groups=("N", "C", "L"), patterns=(
        (re.compile(r"lora_unet_noise_refiner_(\d+)(_|$)"), "N"),
        (re.compile(r"lora_unet_context_refiner_(\d+)(_|$)"), "C"),
        (re.compile(r"lora_unet_layers_(\d+)(_|$)"), "L"),
        (re.compile(r"(?:transformer|diffusion_model)\.noise_refiner\.(\d+)\."), "N"),
        (re.compile(r"(?:transformer|diffusion_model)\.context_refiner\.(\d+)\."), "C"),
        (re.compile(r"(?:transformer|diffusion_model)\.layers\.(\d+)\."), "L"))),
    flow=True, text_mask_condition=True, caption_template=SYSTEM_PROMPT + " <Prompt Start> {}", sample_cfg=4.0,
    sample_scheduler="simple", file_prefixes={"diffusion_model.": "lora_unet_"},  # diffusion-pipe's
    file_markers=(r"layers_\d+_attention_(qkv|out)", r"(noise|context)_refiner_\d+_", r"layers_\d+_feed_forward_"))


def nextdit_layers(transformer: nn.Module) -> dict[str, tuple[str, ...]]:
    """kohya's file name (over NextDiT's layer names) → the diffusers paths it holds, in its row order."""
    layers: dict[str, tuple[str, ...]] = {}
    for group in NEXTDIT_GROUPS:
        for index in range(len(getattr(transformer, group))):
            block, name = f"{group}.{index}.", f"lora_unet_{group}_{index}"
            layers[f"{name}_attention_qkv"] = tuple(f"{block}attn.{part}" for part in ("to_q", "to_k", "to_v"))
            layers[f"{name}_attention_out"] = (f"{block}attn.to_out.0",)
            for number in (1, 2, 3):
                layers[f"{name}_feed_forward_w{number}"] = (f"{block}feed_forward.linear_{number}",)
            layers[f"{name}_adaLN_modulation_1"] = (f"{block}norm1.linear",)  # modulated blocks only
    return layers


class Lumina2Backend(FusedFileBackend):
    """Lumina2Pipeline for training: latents [B, 16, H, W] as the transformer takes them (it patches them itself).
    Each caption is Gemma-2's states of its own tokens (what the pipeline's mask keeps); a batch of different lengths
    is padded, and the mask keeps the padding out, as the pipeline batches prompts."""

    family = LUMINA2.name
    spec = LUMINA2
    presets = LUMINA_PRESETS
    sample_guidance = 4.0  # the pipeline's default
    max_sequence_length = 256  # Gemma tokens, the pipeline's default

    def objective(self, config: TrainingConfig) -> FlowMatchingObjective:
        """Logit-normal σ with the scheduler's fixed shift (6.0 for Lumina-Image-2.0, as ComfyUI's Lumina2 samples);
        σ itself is the time input, as 1 − σ."""
        return flow_objective(config, LUMINA2, 1, self.pipeline.scheduler.config.shift)

    def file_layers(self) -> dict[str, tuple[str, ...]]:
        return nextdit_layers(self.transformer)

    def encode_text(self, captions: list[str]) -> Conditioning:
        """The pipeline's prompt encoding (system prompt, Gemma-2's hidden_states[-2]), trimmed to the longest
        caption's tokens."""
        context, mask, *_ = self.pipeline.encode_prompt(captions, do_classifier_free_guidance=False,
                                                        device=self.text_encoder.device,
                                                        max_sequence_length=self.max_sequence_length)
        kept = int(mask.sum(1).max())
        return {"context": context[:, :kept], "context_mask": mask[:, :kept].long()}

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The velocity ε − x0: the transformer's output negated, at time input 1 − σ (fp32), as the pipeline
        calls it."""
        self.check_packable(*noisy_latents.shape[-2:])
        dtype = self.transformer.dtype
        output = self.transformer(
            hidden_states=noisy_latents.to(dtype), timestep=1 - times.float(),
            encoder_hidden_states=conditioning["context"].to(dtype),
            encoder_attention_mask=conditioning["context_mask"], return_dict=False,
        )[0]
        return -output

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        if text_encoder:
            raise TargetError(f"{self.family}'s text encoder (Gemma-2) is not trained: its outputs are encoded once "
                              "and cached; train the transformer only (turn train_text_encoder off)")
        return self.denoiser_targets(preset)

    def loadable_modules(self) -> dict[str, nn.Module]:
        return self.denoiser_targets("full")

    def checkpoint_blocks(self) -> list[nn.Module]:
        return [*self.transformer.noise_refiner, *self.transformer.context_refiner, *self.transformer.layers]
