"""Qwen-Image with diffusers' QwenImagePipeline: an MMDiT over 2×2-packed latents of a Wan-style VAE (one frame,
normalized by the VAE's latents_mean/std), conditioned on Qwen2.5-VL's last hidden states after the prompt template
(never trained: encoded once and cached), σ as the time input, the scheduler's resolution-dependent shift.

Files use kohya's names over the transformer's own layer paths (`lora_unet_transformer_blocks_0_attn_to_q`), as
musubi-tuner writes them: ComfyUI's layer names are diffusers', so its key map reads them, and diffusers'
`load_lora_weights` converts them. Files in the layout other trainers share (`diffusion_model.<path>.lora_A/lora_B`,
ai-toolkit, diffusion-pipe; `transformer.<path>`, diffusers) load too."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backend import Conditioning
from ..targets import TargetError
from ..training.objectives import FlowMatchingObjective
from .family import BlockLayout, Family
from .flow import FlowBackend, flow_objective, from_diffusers_naming, transformer_presets

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

QWEN_BLOCKS = frozenset({"QwenImageTransformerBlock"})  # diffusers' and ComfyUI's class, with the same layer names
QWEN_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out")
QWEN_MLP = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
QWEN_PRESETS = transformer_presets(
    QWEN_BLOCKS, QWEN_ATTENTION, QWEN_MLP, "q/k/v/out of every block's joint attention (image and text streams)",
    "every Linear of every block, the img_mod/txt_mod modulation included (musubi-tuner leaves it out by default)")
QWEN_IMAGE = Family(
    "Qwen-Image", "qwen_image", "Qwen-Image", __name__, "QwenImageBackend", ("QwenImagePipeline",),
    {"QwenImage": "Qwen-Image"}, "QwenImageTransformer2DModel", ("transformer_blocks",), QWEN_PRESETS, QWEN_PRESETS,
    {},
    BlockLayout("Qwen-Image", groups=("T",), patterns=(
        (re.compile(r"lora_unet_transformer_blocks_(\d+)(_|$)"), "T"),
        (re.compile(r"(?:transformer|diffusion_model)\.transformer_blocks\.(\d+)\."), "T"))),
    flow=True, patched_input=4, sample_cfg=2.5, sample_scheduler="simple",
    file_prefixes={"transformer.": "lora_unet_", "diffusion_model.": "lora_unet_"})  # diffusers'; ai-toolkit's,
# diffusion-pipe's and ComfyUI-converted musubi-tuner files


class QwenImageBackend(FlowBackend):
    """QwenImagePipeline for training: the trainer sees one-frame latents as [B, 16, H, W]; `predict` packs them 2×2
    as the pipeline does. Text conditioning is the prompt's hidden states with their mask (captions differ in
    length; batches are zero-padded, and the mask keeps padding out of attention, as the pipeline batches prompts)."""

    family = QWEN_IMAGE.name
    presets = QWEN_PRESETS
    sample_guidance = None  # the pipeline's true CFG needs a negative prompt; samples are drawn without it
    max_sequence_length = 512  # text tokens after the template, the pipeline's default

    def objective(self, config: TrainingConfig) -> FlowMatchingObjective:
        """Logit-normal σ shifted as the pipeline's scheduler shifts it: by resolution (μ from base_shift at
        base_image_seq_len to max_shift at max_image_seq_len image tokens: 0.5–0.9 over 256–8192 for Qwen-Image)
        or by its fixed shift; σ itself is the transformer's time input (the pipeline passes timestep / 1000)."""
        scheduler = self.pipeline.scheduler.config
        if not scheduler.use_dynamic_shifting:
            return flow_objective(config, QWEN_IMAGE, 1, scheduler.shift)
        return flow_objective(config, QWEN_IMAGE, 1, None, scheduler.base_shift, scheduler.max_shift,
                              (scheduler.base_image_seq_len, scheduler.max_image_seq_len))

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(z − latents_mean) / latents_std of each image as a one-frame video, the frame axis dropped."""
        config = self.vae.config
        frames = pixels.to(self.vae.device, self.vae.dtype)[:, :, None]
        latents = self.vae.encode(frames).latent_dist.sample(generator=generator)
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return ((latents - mean) / std)[:, :, 0]

    def encode_text(self, captions: list[str]) -> Conditioning:
        context, mask = self.pipeline.encode_prompt(captions, device=self.text_encoder.device,
                                                    max_sequence_length=self.max_sequence_length)
        if mask is None:  # every caption as long as the longest
            mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
        return {"context": context, "context_mask": mask}

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's velocity for 2×2-packed latents with the pipeline's img_shapes; σ goes in as fp32."""
        from diffusers import QwenImagePipeline

        batch, channels, height, width = noisy_latents.shape
        self.check_packable(height, width)
        dtype = self.transformer.dtype
        packed = QwenImagePipeline._pack_latents(noisy_latents.to(dtype), batch, channels, height, width)
        mask = conditioning["context_mask"]
        velocity = self.transformer(
            hidden_states=packed, timestep=times.float(), encoder_hidden_states=conditioning["context"].to(dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, height // 2, width // 2)]] * batch, return_dict=False,
        )[0]
        scale = self.pipeline.vae_scale_factor
        return QwenImagePipeline._unpack_latents(velocity, height * scale, width * scale, scale)[:, :, 0]

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        if text_encoder:
            raise TargetError(f"{self.family}'s text encoder (Qwen2.5-VL) is not trained: its outputs are encoded once "
                              "and cached; train the transformer only (turn train_text_encoder off)")
        return self.denoiser_targets(preset)

    def loadable_modules(self) -> dict[str, nn.Module]:
        return self.denoiser_targets("full")

    def model_info(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.model_hash, "version": QWEN_IMAGE.version}

    def network_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Files in the shared `diffusion_model.`/`transformer.` layouts under the network's kohya names (lora_A/B as
        lora_down/up; without `.alpha` the scale is 1, as ComfyUI and diffusers apply them); kohya's as they are."""
        return from_diffusers_naming(tensors, QWEN_IMAGE.file_prefixes)
