"""The model families LoRA Lab trains, one module each (as ComfyUI's `supported_models.py` keeps a family's facts
in one place): its description (`Family`: names, ids, presets, block layout, file naming, defaults, for the engine
and the ComfyUI nodes alike) and its diffusers backend (encoders, denoiser call, objective, files)."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..backend import TrainingBackend
from ..errors import LoRALabError
from .chroma import CHROMA
from .family import Family
from .flux import FLUX
from .hidream import HIDREAM
from .hunyuan_video import HUNYUAN_VIDEO
from .lumina2 import LUMINA2
from .qwen_image import QWEN_IMAGE
from .sd1 import SD1, SD2
from .sd3 import SD3
from .sdxl import SDXL
from .wan import WAN

FAMILIES = (SD1, SD2, SDXL, SD3, FLUX, QWEN_IMAGE, CHROMA, LUMINA2, HIDREAM, WAN, HUNYUAN_VIDEO)
PIPELINES = {pipeline: family for family in FAMILIES for pipeline in family.pipelines}  # diffusers class → family


def comfy_family(config_classes: Iterable[str]) -> Family | None:
    """The family of the first of these ComfyUI `supported_models` classes (a config's own, then its bases') that
    Train LoRA trains."""
    for name in config_classes:
        for family in FAMILIES:
            if name in family.comfy_configs:
                return family
    return None


def comfy_model_name(config_class: str) -> str:
    """A reader's name of the model of a ComfyUI `supported_models` class ("Flux.1 schnell"); else the class name."""
    for family in FAMILIES:
        names = {**family.comfy_configs, **family.comfy_variants}
        if config_class in names:
            return names[config_class]
    return config_class


def version_family(version: str) -> Family:
    """The family of kohya's `ss_base_model_version` `version`."""
    for family in FAMILIES:
        if family.version == version:
            return family
    versions = [family.version for family in FAMILIES]
    raise FamilyError(f"unknown base model version {version!r}; expected {', '.join(versions[:-1])} or "
                      f"{versions[-1]}")


class FamilyError(LoRALabError, ValueError):
    """A base model lora_core cannot train; the message names it and what is supported."""


def pipeline_class(base: Path) -> str:
    """The diffusers pipeline class a saved pipeline folder names in its model_index.json."""
    index = base / "model_index.json"
    if not index.is_file():
        raise FamilyError(f"{base} is not a diffusers pipeline folder (no model_index.json); point --base at a "
                          "folder written by save_pretrained, such as the demo's out/base")
    name = json.loads(index.read_text()).get("_class_name", "")
    if name not in PIPELINES:
        raise FamilyError(f"{base} holds a {name or 'unnamed'} pipeline; lora_core trains {', '.join(PIPELINES)}")
    return name


def backend_class(pipeline: Any) -> type[TrainingBackend]:
    """The backend for a diffusers pipeline object, by its class (or the nearest supported base class)."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in PIPELINES:
            return PIPELINES[cls.__name__].backend_class()
    raise FamilyError(f"a {type(pipeline).__name__} cannot be trained; lora_core trains {', '.join(PIPELINES)}")


BASE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def base_dtype(name: str, device: str) -> torch.dtype:
    """The dtype `--base-dtype name` loads the denoiser and text encoders in, and an fp8 denoiser computes in: "auto"
    (and fp8's compute) is bf16 on CUDA (as kohya's and diffusers' scripts train), fp32 elsewhere."""
    from ..fp8 import FP8_DTYPES

    if name == "auto" or name in FP8_DTYPES:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in BASE_DTYPES:
        raise FamilyError(f"--base-dtype {name!r} is not a dtype lora_core loads bases in; use auto, "
                          f"{', '.join([*BASE_DTYPES, *FP8_DTYPES])}")
    return BASE_DTYPES[name]


def fp8_storage(name: str) -> torch.dtype | None:
    """The fp8 dtype `--base-dtype name` stores the denoiser's weights in (fp8 is e4m3fn); None: not fp8."""
    from ..fp8 import FP8_DTYPES

    return FP8_DTYPES.get(name)


def load_pipeline(base: Path, device: str, dtype: torch.dtype = torch.float32, quantize_denoiser: bool = False,
                  to_device: bool = True, fp8: torch.dtype | None = None) -> Any:
    """The pipeline saved in the local folder `base` (nothing is downloaded), as its model_index.json names it: read on
    the CPU with the denoiser and text encoders in `dtype` and the VAE in fp32 (as diffusers' SDXL script keeps it:
    SDXL's overflows in fp16), the denoiser's Linear layers quantized to NF4 there if asked (QLoRA), or its weights
    stored in `fp8` (cast per layer to `dtype`), then moved to `device` (unless `to_device` is False: then
    `place_except` places it), so no full-precision copy of a big base ever reaches the device."""
    import diffusers

    if quantize_denoiser and fp8 is not None:
        raise FamilyError("a denoiser is stored either in NF4 (--qlora) or in fp8 (--base-dtype fp8), not both")
    cls = getattr(diffusers, pipeline_class(base))
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls.__name__ == "StableDiffusionPipeline" else {}
    _, vae_class = json.loads((base / "model_index.json").read_text())["vae"]
    vae = getattr(diffusers, vae_class).from_pretrained(base, subfolder="vae", local_files_only=True)
    pipeline = cls.from_pretrained(base, local_files_only=True, torch_dtype=dtype, vae=vae, **extra)
    pipeline.set_progress_bar_config(disable=True)
    if quantize_denoiser:
        from ..quantize import quantize_linear_layers

        quantize_linear_layers(denoiser(pipeline))
    for model in denoisers(pipeline) if fp8 is not None else ():
        from ..fp8 import store_in_fp8

        store_in_fp8(model, fp8)
    return pipeline.to(device) if to_device else pipeline


def place_except(pipeline: Any, host_blocks: list[torch.nn.Module], device: str) -> None:
    """A pipeline loaded on the host moved to `device`, but for the weights of `host_blocks` (the blocks a block
    swap keeps on the host and brings one at a time; a denoiser FSDP2 has sharded and placed), so that a denoiser
    larger than the device trains."""
    host = {id(tensor) for block in host_blocks for tensor in [*block.parameters(), *block.buffers()]}
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                if id(tensor) not in host:
                    tensor.data = tensor.data.to(device)


def memory_of(pipeline: Any) -> dict[str, tuple[int, list[str]]]:
    """Bytes of each model component's parameters and buffers (4-bit weights as packed), and their dtypes."""
    sizes = {}
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            sizes[name] = (sum(tensor.numel() * tensor.element_size() for tensor in tensors),
                           sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors
                                   if tensor.is_floating_point()}))
    return sizes


def describe_memory(pipeline: Any) -> str:
    """One line: what the base takes in memory, component by component."""
    sizes = memory_of(pipeline)
    parts = [f"{name} {size / 2**20:,.1f} MiB ({'/'.join(dtypes)})" for name, (size, dtypes) in sizes.items()]
    return f"base in memory: {', '.join(parts)}; {sum(size for size, _ in sizes.values()) / 2**30:.2f} GiB in all"


def denoiser(pipeline: Any) -> Any:
    """The pipeline's denoiser: its UNet (SD1.x/2.x, SDXL) or its transformer (SD3, Flux)."""
    return pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer


def denoisers(pipeline: Any) -> list[Any]:
    """Every denoiser the pipeline holds: Wan 2.2 A14B's two experts, else the one."""
    return [denoiser(pipeline), *[model for model in [getattr(pipeline, "transformer_2", None)] if model is not None]]
