"""The model families lora_core trains with diffusers, one module each (as ComfyUI's `supported_models.py` keeps a
family's facts in one place): its backend (encoders, denoiser call, objective), its file naming and its defaults."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from ..backend import TrainingBackend

# diffusers pipeline class → (module under lora_core, backend class)
FAMILIES = {
    "StableDiffusionPipeline": ("lora_core.diffusers_backend", "DiffusersBackend"),
    "StableDiffusionXLPipeline": ("lora_core.families.sdxl", "SDXLBackend"),
    "StableDiffusion3Pipeline": ("lora_core.families.sd3", "SD3Backend"),
    "FluxPipeline": ("lora_core.families.flux", "FluxBackend"),
}


class FamilyError(ValueError):
    """A base model lora_core cannot train; the message names it and what is supported."""


def pipeline_class(base: Path) -> str:
    """The diffusers pipeline class a saved pipeline folder names in its model_index.json."""
    index = base / "model_index.json"
    if not index.is_file():
        raise FamilyError(f"{base} is not a diffusers pipeline folder (no model_index.json); point --base at a "
                          "folder written by save_pretrained, such as the demo's out/base")
    name = json.loads(index.read_text()).get("_class_name", "")
    if name not in FAMILIES:
        raise FamilyError(f"{base} holds a {name or 'unnamed'} pipeline; lora_core trains {', '.join(FAMILIES)}")
    return name


def backend_class(pipeline: Any) -> type[TrainingBackend]:
    """The backend for a diffusers pipeline object, by its class (or the nearest supported base class)."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in FAMILIES:
            module, name = FAMILIES[cls.__name__]
            return getattr(importlib.import_module(module), name)
    raise FamilyError(f"a {type(pipeline).__name__} cannot be trained; lora_core trains {', '.join(FAMILIES)}")


def load_pipeline(base: Path, device: str) -> Any:
    """The pipeline saved in the local folder `base` (nothing is downloaded), as its model_index.json names it."""
    import diffusers

    cls = getattr(diffusers, pipeline_class(base))
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls.__name__ == "StableDiffusionPipeline" else {}
    pipeline = cls.from_pretrained(base, local_files_only=True, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def denoiser(pipeline: Any) -> Any:
    """The pipeline's denoiser: its UNet (SD1.x/2.x, SDXL) or its transformer (SD3, Flux)."""
    return pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer
