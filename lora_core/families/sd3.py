"""SD3 / SD3.5 with diffusers' StableDiffusion3Pipeline: CLIP-L and CLIP-G penultimate states beside T5's as the
context and their pooled outputs (the pipeline's own `encode_prompt`), σ·1000 as the time input, SD3's fixed shift.

Files use diffusers' naming (`transformer.<path>.lora_A/lora_B`, `text_encoder.<path>` for CLIP-L), which diffusers'
`load_lora_weights` and ComfyUI's key maps both read; diffusers has no converter for kohya's SD3 names. Neither
needs `.alpha`: alpha/rank is folded into lora_B, so both apply the exact ΔW. LoHa/LoKr/DoRA keep their LyCORIS
suffixes (with alpha) under the same names: ComfyUI reads them, diffusers reads LoRA only."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..backend import Conditioning
from ..targets import TargetPreset, all_adaptable, find_targets, kohya_name, kohya_paths
from ..training.objectives import FlowMatchingObjective
from .family import DIFFUSERS_JOINT_ATTENTION, BlockLayout, Family
from .flow import (
    CLIP_L_PREFIX,
    FlowBackend,
    alpha_folded_up,
    flow_objective,
    from_diffusers_naming,
    in_diffusers_naming,
    transformer_presets,
)

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

SD3_BLOCKS = frozenset({"JointTransformerBlock"})
SD3_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
SD3_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SD3_PRESETS = transformer_presets(
    SD3_BLOCKS, SD3_ATTENTION, SD3_MLP,
    full_description="every Linear of every block, adaLN modulation included but the last block's context adaLN")
# The same layers in ComfyUI's MMDiT, whose attention projections are fused (qkv)
MMDIT_BLOCKS = frozenset({"JointBlock"})
MMDIT_ATTENTION = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj")
MMDIT_PRESETS = {
    "attention": TargetPreset(MMDIT_BLOCKS, False, MMDIT_ATTENTION, "qkv/proj of every joint block's attention"),
    "transformer": TargetPreset(MMDIT_BLOCKS, False, (*MMDIT_ATTENTION, "mlp.fc1", "mlp.fc2"),
                                "attention plus the MLPs"),
    "full": TargetPreset(MMDIT_BLOCKS, False, (), "every Linear of the joint blocks, adaLN modulation included but "
                         "the last block's context adaLN"),
}
SD3 = Family(
    "SD3", "sd3", "stable-diffusion-3", __name__, "SD3Backend", ("StableDiffusion3Pipeline",),
    {"SD3": "SD3"}, "OpenAISignatureMMDITWrapper", ("joint_blocks",), SD3_PRESETS, MMDIT_PRESETS,
    {"clip_l": CLIP_L_PREFIX},
    BlockLayout("SD3", groups=("J",), patterns=((re.compile(r"lora_unet_joint_blocks_(\d+)(_|$)"), "J"),
                                                (re.compile(r"lora_unet_transformer_blocks_(\d+)(_|$)"), "J"),
                                                (re.compile(r"transformer\.transformer_blocks\.(\d+)\."), "J"))),
    diffusers_files=True, adm=True, flow=True, precondition_outputs=True, sample_cfg=5.0, sample_scheduler="simple",
    file_markers=(r"joint_blocks_\d+_(x|context)_block_", DIFFUSERS_JOINT_ATTENTION))

Tensors = dict[str, torch.Tensor]
FilePart = tuple[str, "tuple[int, int] | None"]  # a file's module name, and the rows of the fused layer it holds


def split_lora(parts: Tensors, pieces: list[FilePart]) -> dict[str, Tensors]:
    """A LoRA module's tensors as diffusers' files hold them: alpha/rank folded into lora_B (no alpha), and a fused
    layer's lora_B (ComfyUI's qkv) split by rows over its pieces, each with the same lora_A; ΔW of the pieces is that
    of the module."""
    down, up = parts["lora_down.weight"], alpha_folded_up(parts)
    return {module: {"lora_A.weight": down, "lora_B.weight": up if rows is None else up[rows[0]:rows[0] + rows[1]]}
            for module, rows in pieces}


def fused_lora(pieces: list[tuple[tuple[int, int], Tensors]], out_features: int) -> Tensors:
    """The LoRA of a fused layer from its pieces' (rows, {lora_A, lora_B}): one lora_A where all pieces share it,
    else the pieces' ranks side by side (lora_B block-diagonal); rows no piece covers stay zero. Scale 1."""
    downs = [tensors["lora_A.weight"] for _, tensors in pieces]
    shared = all(torch.equal(down, downs[0]) for down in downs)
    down = downs[0] if shared else torch.cat(downs)
    up = torch.zeros(out_features, down.shape[0], dtype=pieces[0][1]["lora_B.weight"].dtype)
    column = 0
    for (start, size), tensors in pieces:
        rank = tensors["lora_A.weight"].shape[0]
        up[start:start + size, (0 if shared else column):(0 if shared else column) + rank] = tensors["lora_B.weight"]
        column += rank
    return {"lora_down.weight": down, "lora_up.weight": up}


class SD3Backend(FlowBackend):
    """StableDiffusion3Pipeline for training; latents [B, 16, H, W] go to the transformer as they are."""

    family = SD3.name
    spec = SD3
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
        return flow_objective(config, SD3, 1000, self.pipeline.scheduler.config.shift)

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
        return {"name": self.name, "hash": self.model_hash, "version": SD3.version}

    def file_tensors(self, tensors: Tensors) -> Tensors:
        """diffusers' names; LoRA as lora_A/lora_B with alpha/rank folded into lora_B and no alpha."""
        return in_diffusers_naming(tensors, self.file_names)

    def network_tensors(self, tensors: Tensors) -> Tensors:
        """The network's names back (lora_A/lora_B as lora_down/lora_up, scale 1 without alpha)."""
        return from_diffusers_naming(tensors)
