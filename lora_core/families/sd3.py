"""SD3 / SD3.5 with diffusers' StableDiffusion3Pipeline: CLIP-L and CLIP-G penultimate states beside T5's as the
context and their pooled outputs (the pipeline's own `encode_prompt`), σ·1000 as the time input, SD3's fixed shift.

Files use diffusers' naming (`transformer.<path>.lora_A/lora_B`, `text_encoder.<path>` for CLIP-L), which diffusers'
`load_lora_weights` and ComfyUI's key maps both read; diffusers has no converter for kohya's SD3 names. Neither
needs `.alpha`: alpha/rank is folded into lora_B, so both apply the exact ΔW. LoHa/LoKr/DoRA keep their LyCORIS
suffixes (with alpha) under the same names: ComfyUI reads them, diffusers reads LoRA only."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backend import Conditioning
from ..network import grouped_by_module
from ..targets import all_adaptable, find_targets, kohya_name, kohya_paths
from ..training.config import TrainingConfig
from ..training.objectives import FlowMatchingObjective
from .flow import (
    CLIP_L_PREFIX,
    DIFFUSERS_SUFFIXES,
    FlowBackend,
    flow_objective,
    from_diffusers_naming,
    transformer_presets,
)

SD3_BLOCKS = frozenset({"JointTransformerBlock"})
SD3_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
SD3_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SD3_PRESETS = transformer_presets(
    SD3_BLOCKS, SD3_ATTENTION, SD3_MLP,
    full_description="every Linear of every block, adaLN modulation included but the last block's context adaLN")

Tensors = dict[str, torch.Tensor]


class SD3Backend(FlowBackend):
    """StableDiffusion3Pipeline for training; latents [B, 16, H, W] go to the transformer as they are."""

    family = "SD3"
    presets = SD3_PRESETS
    sample_guidance = 7.0
    max_sequence_length = 256  # T5 tokens, the pipeline's default

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "") -> None:
        super().__init__(pipeline, name, model_hash)
        self.file_names = {  # network name → the module's name in files
            **{kohya_name("lora_unet", path): f"transformer.{path}"
               for path in find_targets(self.transformer, SD3_PRESETS["full"])},
            **{kohya_name(CLIP_L_PREFIX, path): f"text_encoder.{path}"
               for path in kohya_paths(self.text_encoder, all_adaptable(self.text_encoder))},
        }

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        """The preset's layers but the last block's context adaLN (`norm1_context.linear` of a `context_pre_only`
        block), whose rows Stability's and ComfyUI's layout hold as (shift, scale) where diffusers has (scale, shift):
        the nodes leave it out, so both backends adapt the same layers. Files that adapt it still load."""
        reordered = {kohya_name("lora_unet", f"transformer_blocks.{index}.norm1_context.linear")
                     for index, block in enumerate(self.transformer.transformer_blocks) if block.context_pre_only}
        return {name: layer for name, layer in super().adapter_targets(preset, text_encoder).items()
                if name not in reordered}

    def objective(self, config: TrainingConfig) -> FlowMatchingObjective:
        """Logit-normal σ with the scheduler's fixed shift (3.0 for SD3.5), σ·1000 as the transformer's time input
        (StableDiffusion3Pipeline passes the scheduler's timesteps, σ·1000); the loss on preconditioned outputs by
        default, as diffusers' SD3 script and kohya's SD3 trainer (bench/sd3_precondition.py measured no difference
        between the two losses on the tiny SD3)."""
        return flow_objective(config, self.family, 1000, self.pipeline.scheduler.config.shift,
                              precondition_outputs=True)

    def encode_text(self, captions: list[str]) -> Conditioning:
        context, _, pooled, _ = self.pipeline.encode_prompt(
            captions, None, None, device=self.text_encoder.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"context": context, "pooled": pooled}

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's velocity; σ·1000 goes in as fp32, as the pipeline, its training script and ComfyUI
        pass it (in bf16 731.1 would be 732)."""
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=noisy_latents.to(dtype), timestep=times.float(),
            encoder_hidden_states=conditioning["context"].to(dtype),
            pooled_projections=conditioning["pooled"].to(dtype), return_dict=False,
        )[0]

    def model_info(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.model_hash, "version": "sd3"}

    def file_tensors(self, tensors: Tensors) -> Tensors:
        """diffusers' names; LoRA as lora_A/lora_B with alpha/rank folded into lora_B and no alpha."""
        out: Tensors = {}
        for name, parts in grouped_by_module(tensors).items():
            if "lora_down.weight" in parts:
                rank = parts["lora_down.weight"].shape[0]
                up = parts["lora_up.weight"]
                parts["lora_up.weight"] = (up.float() * (float(parts.pop("alpha", rank)) / rank)).to(up.dtype)
            out |= {f"{self.file_names[name]}.{DIFFUSERS_SUFFIXES.get(suffix, suffix)}": value
                    for suffix, value in parts.items()}
        return out

    def network_tensors(self, tensors: Tensors) -> Tensors:
        """The network's names back (lora_A/lora_B as lora_down/lora_up, scale 1 without alpha)."""
        return from_diffusers_naming(tensors)
