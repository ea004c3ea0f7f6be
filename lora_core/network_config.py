"""What a LoRA adapts and how: algorithm, rank, alpha, the target layers, the text encoder. Declared once for
`python -m lora_core train` and Inject LoRA; `LoRANetwork.create` builds the adapters and checks the values."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .adapters import ALGORITHMS
from .families import FAMILIES
from .settings import Widget, declared_settings, setting
from .targets import UNET_PRESETS

CLIP_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "clip_h": "CLIP-H"}


def target_help() -> str:
    """What each target preset adapts, per family (families with the same presets together)."""
    described: dict[str, list[str]] = {}
    for family in FAMILIES:
        presets = "; ".join(f"{name}: {preset.description}" for name, preset in family.comfy_presets.items())
        described.setdefault(presets, []).append(family.name)
    return "The layers that get an adapter. " + " ".join(
        f"{', '.join(names)}: {presets}." for presets, names in described.items())


def text_encoder_help() -> str:
    """Which CLIP encoders train_text_encoder adapts, per family; T5 never."""
    encoders = "; ".join(f"{family.name} {' and '.join(CLIP_NAMES[name] for name in family.text_encoders) or 'none'}"
                         for family in FAMILIES)
    return f"Also adapt the CLIP text encoders (q/k/v/out_proj, fc1/fc2): {encoders} (T5 and other encoders never)."


@dataclass(frozen=True)
class NetworkConfig:
    """The adapters a run trains."""

    algorithm: str = setting("lora", "lora: low-rank ΔW; dora: LoRA plus a learned magnitude; loha: Hadamard "
                                     "product; lokr: Kronecker product.", choices=tuple(sorted(ALGORITHMS)),
                             widget=Widget())
    rank: int = setting(8, "Rank (dim) of each adapter: capacity and file size grow with it.", minimum=1,
                        widget=Widget(maximum=256))
    alpha: float | None = setting(None, "Scale α: the update is multiplied by α/rank; α = rank means no scaling "
                                        "(the default where none is given).", above=0.0,
                                  widget=Widget(minimum=0.01, maximum=1024.0, step=0.01, default=8.0))
    target: str = setting("attention", target_help(), choices=tuple(UNET_PRESETS), aliases=("--preset",),
                          widget=Widget())
    train_text_encoder: bool = setting(False, text_encoder_help(), aliases=("--text-encoder",), widget=Widget(
        note="Needs CLIP. When continuing a LoRA (the lora input) that has text-encoder layers, off keeps them "
             "applied as they are, on trains them."))


NETWORK_SETTINGS = declared_settings(NetworkConfig)
EXTRACT_TARGET = replace(next(each for each in NETWORK_SETTINGS if each.name == "target"), default="transformer")
