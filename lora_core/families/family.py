"""What a model family is to LoRA Lab, declared once in the family's own module (`sd1.py`, `sdxl.py`, `sd3.py`,
`flux.py`) and read by the engine, the ComfyUI nodes, block weights and metadata. diffusers' and ComfyUI's classes
are named by strings: describing a family imports neither."""
from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..targets import TargetPreset

TEXT_ENCODER_BLOCK = "BASE"  # block weights' name of the text encoders' block
# `Family.file_markers` several families share: Black Forest Labs' double/single blocks (Flux.1, Chroma, HunyuanVideo
# in ComfyUI's names), their modulation layers (which Chroma lacks), diffusers' single blocks and joint attention
BFL_DOUBLE_BLOCKS = r"double_blocks_\d+_(img|txt)_(attn|mlp)"
BFL_SINGLE_BLOCKS = r"single_blocks_\d+_(linear[12]|modulation)"
BFL_MODULATION = r"double_blocks_\d+_(img|txt)_mod"
DIFFUSERS_SINGLE_BLOCKS = r"single_transformer_blocks_\d+_"
DIFFUSERS_JOINT_ATTENTION = r"(?<!single_)transformer_blocks_\d+_attn_add_[qkv]_proj"


def numbered(prefix: str, indices: Iterable[int]) -> tuple[str, ...]:
    return tuple(f"{prefix}{index:02d}" for index in indices)


@dataclass(frozen=True)
class BlockLayout:
    """The blocks a block-weight spec gives one weight each, as the "LoRA Block Weight" extension names them: a
    UNet's fixed layouts (the longest, every block, last), or a transformer's block groups (one weight prefix per
    group of `Family.comfy_blocks`, counted on the model) with the patterns that place a file's module in a block."""

    name: str  # the family's name in specs and messages
    unet_layouts: tuple[tuple[str, ...], ...] = ()
    groups: tuple[str, ...] = ()
    patterns: tuple[tuple[re.Pattern, str], ...] = ()  # (module name pattern, its block index in group 1; prefix)
    presets: dict[str, str] = field(default_factory=dict)  # named specs beside NONE, ALL and ALL0.5


@dataclass(frozen=True)
class Family:
    """One model family: its names, what it is in kohya's, Stability's, ComfyUI's and diffusers' words, its
    objective, the layers presets adapt in both backends, and how its LoRA files name them."""

    name: str  # a reader's name, in messages
    version: str  # kohya's ss_base_model_version
    modelspec: str  # Stability's modelspec architecture id (kohya's library/sai_model_spec.py)
    module: str  # the module that describes it and holds its diffusers backend
    backend: str  # the diffusers backend's class in `module`
    pipelines: tuple[str, ...]  # diffusers pipeline classes the backend trains
    comfy_configs: dict[str, str]  # ComfyUI `supported_models` classes Train LoRA trains → a reader's name of each
    comfy_denoiser: str  # class name of ComfyUI's diffusion model
    comfy_blocks: tuple[str, ...]  # attributes of ComfyUI's denoiser holding its blocks (checkpointed, block weights)
    presets: dict[str, TargetPreset]  # lora_core's, over diffusers' modules
    comfy_presets: dict[str, TargetPreset]  # the nodes', over ComfyUI's modules: the same weights
    text_encoders: dict[str, str]  # ComfyUI's CLIP submodule → kohya prefix of its layers (T5 is never trained)
    block_layout: BlockLayout
    comfy_variants: dict[str, str] = field(default_factory=dict)  # ComfyUI classes of variants Train LoRA refuses
    modelspec_v: str = ""  # the modelspec id of v-prediction bases, where it differs
    modelspec_implementation: str = "diffusers"
    ldm_names: bool = True  # files name denoiser layers lora_unet_ + ComfyUI's (LDM) path; else the diffusers path
    diffusers_files: bool = False  # files in diffusers' naming (lora_A/lora_B, q/k/v apart), as diffusers reads them
    adm: bool = False  # the denoiser takes pooled/ADM conditioning `y`
    flow: bool = False  # flow matching; else ε/v on a discrete schedule
    sigma_sampling: str = "logit_normal"  # flow matching's default σ sampling (the SD3 paper's best, §3.1)
    precondition_outputs: bool = False  # flow matching's loss on x̂0 by default
    guidance: bool = False  # the denoiser may take a guidance input (Flux.1-dev's)
    training_guidance: float = 1.0  # its value while training (kohya's Flux docs; both scripts default to 3.5)
    reference_images: int = 0  # reference images of an edit pair the denoiser takes (Flux.1 Kontext's: 1)
    edit_prompts: dict = field(default_factory=dict)  # name → how the text encoder sees them (Qwen-Image-Edit's); empty:
    # the text encoder sees none
    patched_input: int = 1  # the denoiser's input channels per latent channel (Qwen-Image counts its 2×2 patches: 4)
    frame_step: int = 0  # a video family's clips have frame_step·k + 1 frames (its VAE's temporal compression); 0: an
    # image family (Qwen-Image's one-frame latents are images)
    text_mask_condition: bool = False  # ComfyUI's denoiser counts the caption's tokens from its mask (Lumina 2)
    caption_template: str = "{}"  # the text a caption is encoded in, as the family's prompt node builds it
    text_extras: tuple[str, ...] = ()  # ComfyUI text-encoder outputs the denoiser also takes (HiDream's Llama states)
    file_module_prefix: str = ""  # files name each denoiser layer <prefix><its path> with lora_A/lora_B (HiDream)
    file_paths: tuple[tuple[str, str], ...] = ()  # (pattern, replacement): a denoiser layer's name in files from its
    # path in ComfyUI, where they differ (HunyuanVideo's own names over ComfyUI's Flux layers)
    file_prefixes: dict[str, str] = field(default_factory=dict)  # other trainers' file layouts the family's files may
    # come in: key prefix → the network's name prefix (lora_A/lora_B read as lora_down/lora_up)
    saved_activations: float = 16.0  # the memory plan's values per token and channel autograd keeps of one
    # transformer block (measured: Flux.1's 16, Wan's 22; the other transformers are planned with Flux's)
    unet_activations: tuple[float, float] = (0.0, 0.0)  # a UNet's: values per latent position and channel of its
    # first level autograd keeps in a step, its backward's transients included, without and with gradient
    # checkpointing (measured; zeros: a transformer)
    file_markers: tuple[str, ...] = ()  # patterns of module names (lowercase, dots as "_") that files for this
    # family's layers hold, in its own, kohya's and other trainers' layouts: Check LoRA names the family whose patterns
    # a file matches most (`lora_core.formats.check`)
    context_width: int = 0  # a UNet's cross-attention context width, which its files' attn2 key layers take in
    sample_cfg: float = 7.0  # the nodes' sample images: KSampler's cfg and scheduler
    sample_scheduler: str = "normal"

    def file_path(self, path: str) -> str:
        """The name files give the denoiser layer at ComfyUI's `path` (without `file_module_prefix`)."""
        for pattern, name in self.file_paths:
            path = re.sub(pattern, name, path)
        return path

    def backend_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.backend)
