"""HunyuanVideo (text-to-video) with diffusers' HunyuanVideoPipeline: video latents [B, 16, F, H, W] of its VAE (4×
temporal and 8× spatial compression, scaled by its scaling_factor), LLaVA-Llama-3's states (its third-last layer) of
the caption inside the pipeline's video template with the template's tokens cropped and a mask, CLIP-L's pooled output,
the embedded guidance of the distilled model (1.0 while training, musubi-tuner's default), flow matching with the
scheduler's shift (7.0) and σ·1000 as the time input. Images train as one-frame videos; clips have 4k+1 frames.
The text encoders never train: their outputs are encoded once and cached.

Files are diffusion-pipe's layout over HunyuanVideo's own layer names (`diffusion_model.double_blocks.0.img_attn_qkv.
lora_A.weight`, alpha folded into lora_B), diffusers' q/k/v (and the single blocks' MLP input) fused exactly into qkv
and linear1: ComfyUI's core loader and diffusers' HunyuanVideo converter both read it. musubi-tuner's
`lora_unet_double_blocks_0_img_attn_qkv` and diffusers' `transformer.transformer_blocks.0.attn.to_q` files load too."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..backend import Conditioning
from ..targets import TargetError, kohya_name
from ..training.objectives import FlowMatchingObjective
from .family import (
    BFL_DOUBLE_BLOCKS,
    BFL_MODULATION,
    BFL_SINGLE_BLOCKS,
    DIFFUSERS_SINGLE_BLOCKS,
    BlockLayout,
    Family,
)
from .flow import (
    VideoBackend,
    flow_objective,
    from_diffusers_naming,
    in_diffusers_naming,
    transformer_presets,
)
from .flux import (
    BFL_PRESETS,
    FLUX_ATTENTION,
    FLUX_MLP,
    FLUX_PRESETS,
    BflBackend,
    bfl_paths,
)

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

Tensors = dict[str, torch.Tensor]

HUNYUAN_VIDEO_PRESETS = transformer_presets(
    frozenset({"HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"}), FLUX_ATTENTION, FLUX_MLP,
    FLUX_PRESETS["attention"].description)
# HunyuanVideo's own names (its files', Tencent's code's) of the layers ComfyUI builds from Flux's classes
HUNYUAN_NAMES = ((r"_attn\.qkv$", "_attn_qkv"), (r"_attn\.proj$", "_attn_proj"), (r"_mlp\.0$", "_mlp.fc1"),
                 (r"_mlp\.2$", "_mlp.fc2"), (r"_mod\.lin$", "_mod.linear"), (r"\.modulation\.lin$", ".modulation.linear"))
HUNYUAN_VIDEO = Family(
    "HunyuanVideo", "hunyuan_video", "hunyuan-video", __name__, "HunyuanVideoBackend", ("HunyuanVideoPipeline",),
    {"HunyuanVideo": "HunyuanVideo"}, "HunyuanVideo", ("double_blocks", "single_blocks"), HUNYUAN_VIDEO_PRESETS,
    BFL_PRESETS, {},
    BlockLayout("HunyuanVideo", groups=("D", "S"), patterns=(
        (re.compile(r"lora_unet_double_blocks_(\d+)(_|$)"), "D"),
        (re.compile(r"lora_unet_single_blocks_(\d+)(_|$)"), "S"),
        (re.compile(r"(?:transformer|diffusion_model)\.double_blocks\.(\d+)\."), "D"),
        (re.compile(r"(?:transformer|diffusion_model)\.single_blocks\.(\d+)\."), "S"),
        (re.compile(r"transformer\.transformer_blocks\.(\d+)\."), "D"),
        (re.compile(r"transformer\.single_transformer_blocks\.(\d+)\."), "S"))),
    comfy_variants={"HunyuanVideoI2V": "HunyuanVideo image-to-video",
                    "HunyuanVideoSkyreelsI2V": "SkyReels image-to-video", "HunyuanImage21": "HunyuanImage 2.1",
                    "HunyuanImage21Refiner": "the HunyuanImage 2.1 refiner"},
    flow=True, guidance=True, frame_step=4, file_module_prefix="diffusion_model.", file_paths=HUNYUAN_NAMES,
    sample_cfg=1.0, sample_scheduler="simple",
    file_prefixes={"diffusion_model.": "lora_unet_", "transformer.": "lora_unet_"},  # diffusion-pipe's; diffusers'
    file_markers=(BFL_DOUBLE_BLOCKS, BFL_SINGLE_BLOCKS, BFL_MODULATION, DIFFUSERS_SINGLE_BLOCKS, r"token_refiner",
                  r"guidance_in_"))


class HunyuanVideoBackend(BflBackend, VideoBackend):
    """HunyuanVideoPipeline for training: the transformer takes video latents [B, 16, F, H, W] as they are (an image
    is one frame), the Llama states with their mask (trimmed to the batch's longest caption: padding is masked out
    either way), CLIP-L's pooled output and the guidance input ×1000, as the pipeline passes them.

    `guidance` is the embedded guidance while training: 1.0 by default, as musubi-tuner trains (samples are drawn at
    the pipeline's 6.0)."""

    family = HUNYUAN_VIDEO.name
    spec = HUNYUAN_VIDEO
    presets = HUNYUAN_VIDEO_PRESETS
    sample_guidance = 6.0  # the pipeline's default embedded guidance
    max_sequence_length = 256  # Llama tokens after the template, the pipeline's default

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "",
                 guidance: float = HUNYUAN_VIDEO.training_guidance) -> None:
        super().__init__(pipeline, name, model_hash)
        self.guidance = float(guidance)
        paths = {kohya_name("lora_unet", path): path for path in bfl_paths(self.transformer)}
        self.file_names = {name: f"{HUNYUAN_VIDEO.file_module_prefix}{HUNYUAN_VIDEO.file_path(path)}"
                           for name, path in paths.items()}
        self.own_names = {kohya_name("lora_unet", HUNYUAN_VIDEO.file_path(path)): name for name, path in paths.items()}

    def objective(self, config: TrainingConfig) -> FlowMatchingObjective:
        """Logit-normal σ with the scheduler's fixed shift (7.0), σ·1000 as the transformer's time input (the
        pipeline passes the scheduler's timesteps)."""
        return flow_objective(config, HUNYUAN_VIDEO, 1000, self.pipeline.scheduler.config.shift)

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z · scaling_factor of each clip [B, 3, F, H, W] (an image [B, 3, H, W] as one frame), as the pipeline
        divides it before decoding."""
        video = pixels if pixels.dim() == 5 else pixels[:, :, None]
        latents = self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist.sample(generator=generator)
        return latents * self.vae.config.scaling_factor

    def encode_text(self, captions: list[str]) -> Conditioning:
        context, pooled, mask = self.pipeline.encode_prompt(captions, device=self.text_encoder.device,
                                                            max_sequence_length=self.max_sequence_length)
        kept = int(mask.sum(1).max())
        return {"context": context[:, :kept], "context_mask": mask[:, :kept].long(), "pooled": pooled}

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's velocity; σ·1000 and the guidance ×1000 go in as fp32 (their embeddings project them
        before casting)."""
        self.check_packable(*noisy_latents.shape[-2:])
        dtype, batch = self.transformer.dtype, noisy_latents.shape[0]
        return self.transformer(
            hidden_states=noisy_latents.to(dtype), timestep=times.float(),
            encoder_hidden_states=conditioning["context"].to(dtype),
            encoder_attention_mask=conditioning["context_mask"], pooled_projections=conditioning["pooled"].to(dtype),
            guidance=torch.full((batch,), self.guidance * 1000.0, device=self.device), return_dict=False)[0]

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        if text_encoder:
            raise TargetError(f"{self.family}'s text encoders (LLaVA-Llama-3 and CLIP-L) are not trained: their "
                              "outputs are encoded once and cached; train the transformer only (turn "
                              "train_text_encoder off)")
        return self.denoiser_targets(preset)

    def loadable_modules(self) -> dict[str, nn.Module]:
        return self.denoiser_targets("full")

    def file_tensors(self, tensors: Tensors) -> Tensors:
        """diffusers' layers fused exactly into HunyuanVideo's, named `diffusion_model.<its path>`; LoRA as
        lora_A/lora_B with alpha/rank folded into lora_B."""
        return in_diffusers_naming(super().file_tensors(tensors), self.file_names)

    def network_tensors(self, tensors: Tensors) -> Tensors:
        """This layout's, musubi-tuner's (`lora_unet_` + HunyuanVideo's path) and diffusers' files, split into the
        network's layers."""
        named = {}
        for key, value in from_diffusers_naming(tensors, HUNYUAN_VIDEO.file_prefixes).items():
            module, dot, suffix = key.partition(".")
            named[f"{self.own_names.get(module, module)}{dot}{suffix}"] = value
        return super().network_tensors(named)
