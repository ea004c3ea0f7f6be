"""Which modules of a model get adapters, and their kohya names.

Presets follow kohya sd-scripts: modules are picked inside blocks of a given class (diffusers' class names and
the LDM/ComfyUI names of the same blocks), so one preset works on a diffusers UNet and on ComfyUI's UNetModel.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import LoRALabError

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"

TRANSFORMER_BLOCKS = frozenset({"Transformer2DModel", "SpatialTransformer"})
RESNET_AND_SAMPLER_BLOCKS = frozenset(
    {"ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample"}
)
TEXT_ENCODER_BLOCKS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"})
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


class TargetError(LoRALabError, ValueError):
    """A preset is unknown or selects nothing in this model."""


@dataclass(frozen=True)
class TargetPreset:
    """Linear and Conv2d layers inside blocks of these classes, optionally only 1×1 convs or named leaves."""

    blocks: frozenset[str]
    any_conv_kernel: bool
    leaf_names: tuple[str, ...] = ()
    description: str = ""


UNET_PRESETS: dict[str, TargetPreset] = {
    "attention": TargetPreset(
        TRANSFORMER_BLOCKS, False, ATTENTION_PROJECTIONS, "to_q/to_k/to_v/to_out.0 of every attention layer"
    ),
    "transformer": TargetPreset(
        TRANSFORMER_BLOCKS, False, (), "every Linear and 1×1 conv inside transformer blocks (kohya's default)"
    ),
    "full": TargetPreset(
        TRANSFORMER_BLOCKS | RESNET_AND_SAMPLER_BLOCKS, True, (),
        "transformer blocks plus ResNet and down/up-sampling convs, 3×3 included (LoCon)",
    ),
}
TEXT_ENCODER_PRESET = TargetPreset(TEXT_ENCODER_BLOCKS, False, (), "q/k/v/out_proj and fc1/fc2 of every CLIP layer")


def is_adaptable(module: nn.Module, any_conv_kernel: bool = True) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and (any_conv_kernel or module.kernel_size == (1, 1))


def find_targets(root: nn.Module, preset: TargetPreset | str) -> dict[str, nn.Module]:
    """Module path (as `named_modules` gives it) → module, for every layer `preset` selects under `root`."""
    if isinstance(preset, str):
        if preset not in UNET_PRESETS:
            raise TargetError(f"unknown target preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
        preset = UNET_PRESETS[preset]
    found: dict[str, nn.Module] = {}
    for block_path, block in root.named_modules():
        if type(block).__name__ not in preset.blocks:
            continue
        for leaf_path, leaf in block.named_modules():
            if not is_adaptable(leaf, preset.any_conv_kernel):
                continue
            if preset.leaf_names and not leaf_path.endswith(preset.leaf_names):
                continue
            found[f"{block_path}.{leaf_path}" if block_path else leaf_path] = leaf
    return found


def all_adaptable(root: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d under `root`: what a LoRA file from any trainer may name."""
    return {path: module for path, module in root.named_modules() if path and is_adaptable(module)}


# Wrappers that transformers 5 folded into the model itself (class name → wrapper). kohya's names were fixed under
# transformers 4, where CLIPTextModel kept its layers under `text_model`: `lora_te_text_model_encoder_layers_0_…`.
FOLDED_WRAPPERS = {"CLIPTextModel": "text_model"}


def kohya_paths(root: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """`modules` (paths under `root`) keyed by the paths kohya names them by, whatever transformers' module tree."""
    wrapper = FOLDED_WRAPPERS.get(type(root).__name__)
    if wrapper is None or hasattr(root, wrapper):
        return dict(modules)
    return {f"{wrapper}.{path}": module for path, module in modules.items()}


def kohya_name(prefix: str, path: str) -> str:
    """kohya's module name: `lora_unet_down_blocks_0_attentions_0_…` from a diffusers module path."""
    return f"{prefix}_{path}".replace(".", "_")


def named_for_kohya(prefix: str, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    return {kohya_name(prefix, path): module for path, module in modules.items()}
