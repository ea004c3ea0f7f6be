"""Wan 2.1 and 2.2 text-to-video with diffusers' WanPipeline (the 2.2 TI2V 5B as text-to-video, its time given per
latent token as the pipeline gives it): video latents [B, C, F, H, W] of the Wan VAE (4× temporal, 8× spatial and 16
channels, or the 2.2 VAE's 16× and 48; normalized by its latents_mean/std), umT5 states zero-padded to 512 tokens
(never trained: encoded once and cached), flow matching with the scheduler's fixed shift and σ·1000 as the time
input. Images train as one-frame videos; clips must have 4k+1 frames.

Files name the layers as Wan's own code and ComfyUI do (`blocks.0.self_attn.q`, `…cross_attn.o`, `…ffn.0`), in
diffusion-pipe's layout `diffusion_model.<path>.lora_A/lora_B` with alpha/rank folded into lora_B: ComfyUI's core
loader and diffusers' Wan converter both read it, whatever layers a preset adapts (diffusers' converter for
musubi-tuner's `lora_unet_` names wants every layer of every block). musubi-tuner's `lora_unet_blocks_0_self_attn_q`
and diffusers' `transformer.blocks.0.attn1.to_q` files load too."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..backend import Conditioning
from ..settings import Setting
from ..targets import TargetError, TargetPreset, kohya_name
from ..training.objectives import FlowMatchingObjective
from .family import BlockLayout, Family
from .flow import (
    VideoBackend,
    flow_objective,
    from_diffusers_naming,
    in_diffusers_naming,
    transformer_presets,
)

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

Tensors = dict[str, torch.Tensor]

WAN_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0")
WAN_PRESETS = transformer_presets(
    frozenset({"WanTransformerBlock"}), WAN_ATTENTION, ("ffn.net.0.proj", "ffn.net.2"),
    "q/k/v/out of every block's self-attention and text cross-attention",
    "every Linear of every block (the image cross-attention's add_k/add_v of I2V models too)")
COMFY_ATTENTION = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                   "cross_attn.v", "cross_attn.o")
COMFY_BLOCKS = frozenset({"WanAttentionBlock"})  # ComfyUI's block, with Wan's own layer names
COMFY_WAN_PRESETS = {
    "attention": TargetPreset(COMFY_BLOCKS, False, COMFY_ATTENTION, WAN_PRESETS["attention"].description),
    "transformer": TargetPreset(COMFY_BLOCKS, False, (*COMFY_ATTENTION, "ffn.0", "ffn.2"),
                                WAN_PRESETS["transformer"].description),
    "full": TargetPreset(COMFY_BLOCKS, False, (), WAN_PRESETS["full"].description),
}
WAN = Family(
    "Wan", "wan", "wan", __name__, "WanBackend", ("WanPipeline",),
    {"WAN21_T2V": "Wan 2.1 / 2.2 text-to-video", "WAN22_T2V": "Wan 2.2 TI2V 5B (text-to-video)"}, "WanModel", ("blocks",), WAN_PRESETS, COMFY_WAN_PRESETS, {},
    BlockLayout("Wan", groups=("B",), patterns=(
        (re.compile(r"lora_unet_blocks_(\d+)(_|$)"), "B"),
        (re.compile(r"(?:transformer|diffusion_model)\.blocks\.(\d+)\."), "B"))),
    comfy_variants={"WAN21_I2V": "Wan image-to-video",
                    "WAN21_FunControl2V": "Wan Fun Control", "WAN21_Camera": "Wan camera control",
                    "WAN22_Camera": "Wan 2.2 camera control", "WAN21_Vace": "Wan VACE", "WAN21_HuMo": "Wan HuMo",
                    "WAN22_S2V": "Wan 2.2 speech-to-video", "WAN22_Animate": "Wan 2.2 Animate"},
    flow=True, frame_step=4, file_module_prefix="diffusion_model.", saved_activations=22.0, sample_cfg=5.0,
    sample_scheduler="simple",
    file_prefixes={"diffusion_model.": "lora_unet_", "transformer.": "lora_unet_"},  # diffusion-pipe's; diffusers'
    file_markers=(r"^(lora_unet_|diffusion_model_|transformer_)?blocks_\d+_(self_attn|cross_attn|ffn|attn[12])_",))
# Wan's own layer names (ComfyUI's, and the files') for diffusers' paths inside and outside the blocks
WAN_NAMES = ((r"\.attn1\.to_out\.0$", ".self_attn.o"), (r"\.attn1\.to_([qkv])$", r".self_attn.\1"),
             (r"\.attn2\.to_out\.0$", ".cross_attn.o"), (r"\.attn2\.to_([qkv])$", r".cross_attn.\1"),
             (r"\.attn2\.add_([kv])_proj$", r".cross_attn.\1_img"), (r"\.ffn\.net\.0\.proj$", ".ffn.0"),
             (r"\.ffn\.net\.2$", ".ffn.2"), (r"^condition_embedder\.time_proj$", "time_projection.1"),
             (r"^proj_out$", "head.head"), (r"^condition_embedder\.(text|time)_embedder\.linear_1$", r"\1_embedding.0"),
             (r"^condition_embedder\.(text|time)_embedder\.linear_2$", r"\1_embedding.2"),
             (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$", "img_emb.proj.1"),
             (r"^condition_embedder\.image_embedder\.ff\.net\.2$", "img_emb.proj.3"))


EXPERTS = ("high", "low")
WAN_EXPERT = Setting(
    "wan_expert", str, None, "Wan 2.2 A14B (a WanPipeline with two transformers split at its boundary_ratio): the "
    "expert whose LoRA trains: high (transformer, noise levels σ above the boundary) or low (transformer_2, below "
    "it); each trains on its own σ range unless min_sigma / max_sigma set another.", choices=(None, *EXPERTS))


def wan_path(path: str) -> str:
    """Wan's own name (ComfyUI's) of the diffusers WanTransformer3DModel layer `path`."""
    for pattern, name in WAN_NAMES:
        renamed, count = re.subn(pattern, name, path)
        if count:
            return renamed
    return path


class WanBackend(VideoBackend):
    """WanPipeline for training: the trainer sees video latents [B, C, F, H, W] (an image is one frame) and the
    transformer takes them as they are; text conditioning is umT5's states zero-padded to 512 tokens, as the
    pipeline passes them (no mask)."""

    family = WAN.name
    spec = WAN
    presets = WAN_PRESETS
    sample_guidance = 1.0  # the pipeline's CFG needs a negative prompt; samples are drawn without it
    max_sequence_length = 512  # the pipeline's, and what the I2V attention assumes

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "", expert: str | None = None) -> None:
        """`expert`: which of Wan 2.2 A14B's two transformers trains (required for such a pipeline, refused else)."""
        super().__init__(pipeline, name, model_hash)
        self.expert_range = None
        boundary = pipeline.config.get("boundary_ratio")
        if getattr(pipeline, "transformer_2", None) is not None:
            if expert not in EXPERTS:
                raise ValueError(f"this Wan 2.2 pipeline has two experts split at σ {boundary}: choose wan_expert "
                                 "high (transformer, σ above it) or low (transformer_2, σ below it), one LoRA each")
            self.transformer = pipeline.transformer if expert == "high" else pipeline.transformer_2
            self.expert_range = (boundary, 1.0) if expert == "high" else (0.0, boundary)
        elif expert is not None:
            raise ValueError(f"wan_expert {expert!r} picks one of Wan 2.2 A14B's two transformers; this pipeline has "
                             "one: leave it unset")
        # Wan 2.2 TI2V 5B's pipeline gives each latent token its own time (all the same without a start image)
        self.expand_timesteps = bool(pipeline.config.get("expand_timesteps", False))
        paths = [path for path, module in self.transformer.named_modules() if isinstance(module, nn.Linear)]
        self.file_names = {kohya_name("lora_unet", path): f"{WAN.file_module_prefix}{wan_path(path)}" for path in paths}
        self.network_names = {kohya_name("lora_unet", wan_path(path)): kohya_name("lora_unet", path) for path in paths}

    def objective(self, config: TrainingConfig) -> FlowMatchingObjective:
        """Logit-normal σ with the scheduler's fixed shift (UniPC's flow_shift, FlowMatchEuler's shift: 3.0 for 480p,
        5.0 for 720p), σ·1000 as the transformer's time input (the pipeline passes the scheduler's timesteps); an
        A14B expert's σ restricted to its side of the boundary (the pipeline runs `transformer` where t ≥
        boundary_ratio·1000)."""
        scheduler = self.pipeline.scheduler.config
        objective = flow_objective(config, WAN, 1000, scheduler.get("flow_shift") or scheduler.get("shift", 1.0))
        if self.expert_range is None or objective.sigma_range != (0.0, 1.0):
            return objective
        return dataclasses.replace(objective, sigma_range=self.expert_range)  # the expert's σ, as it denoises

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(z − latents_mean) / latents_std of each clip [B, 3, F, H, W] (an image [B, 3, H, W] as one frame)."""
        video = pixels if pixels.dim() == 5 else pixels[:, :, None]
        return self.normalized(self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist.sample(
            generator=generator))

    def normalized(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return (latents - mean) / std

    def encode_text(self, captions: list[str]) -> Conditioning:
        context, _ = self.pipeline.encode_prompt(captions, do_classifier_free_guidance=False,
                                                 max_sequence_length=self.max_sequence_length,
                                                 device=self.text_encoder.device)
        return {"context": context}

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's velocity for video latents; σ·1000 goes in as fp32 (its time embedding is fp32), one
        per latent token where the pipeline expands it (TI2V 5B)."""
        dtype, timestep = self.transformer.dtype, times.float()
        if self.expand_timesteps:
            patch = self.transformer.config.patch_size
            tokens = math.prod(size // step for size, step in zip(noisy_latents.shape[2:], patch))
            timestep = timestep[:, None].expand(-1, tokens)
        return self.transformer(hidden_states=noisy_latents.to(dtype), timestep=timestep,
                                encoder_hidden_states=conditioning["context"].to(dtype), return_dict=False)[0]

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        if text_encoder:
            raise TargetError(f"{self.family}'s text encoder (umT5) is not trained: its outputs are encoded once and "
                              "cached; train the transformer only (turn train_text_encoder off)")
        return self.denoiser_targets(preset)

    def loadable_modules(self) -> dict[str, nn.Module]:
        return self.denoiser_targets("full")

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.transformer.blocks)

    def file_tensors(self, tensors: Tensors) -> Tensors:
        """`diffusion_model.<Wan's path>`; LoRA as lora_A/lora_B with alpha/rank folded into lora_B and no alpha."""
        return in_diffusers_naming(tensors, self.file_names)

    def network_tensors(self, tensors: Tensors) -> Tensors:
        """The network's names from this layout, musubi-tuner's (`lora_unet_` + Wan's path) and diffusers' (scale 1
        without alpha)."""
        named = {}
        for key, value in from_diffusers_naming(tensors, WAN.file_prefixes).items():
            module, dot, suffix = key.partition(".")
            named[f"{self.network_names.get(module, module)}{dot}{suffix}"] = value
        return named

    def model_info(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.model_hash, "version": WAN.version}
