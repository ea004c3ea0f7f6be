"""The model families lora_core trains with diffusers, one module each (as ComfyUI's `supported_models.py` keeps a
family's facts in one place): its backend (encoders, denoiser call, objective), its file naming and its defaults."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

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


BASE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
FP8_COMPUTE_DTYPE = torch.bfloat16  # what fp8-stored layers are cast to for their forward (as ComfyUI does on GPUs)


def base_dtype(name: str, device: str) -> torch.dtype:
    """The dtype `--base-dtype name` loads the denoiser and text encoders in: "auto" is bf16 on CUDA (as kohya's and
    diffusers' scripts train), fp32 elsewhere; fp8 stores their layers' weights in float8_e4m3fn."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in BASE_DTYPES:
        raise FamilyError(f"--base-dtype {name!r} is not a dtype lora_core loads bases in; use auto, "
                          f"{', '.join(BASE_DTYPES)}")
    return BASE_DTYPES[name]


def store_in_fp8(model: torch.nn.Module) -> None:
    """Hold `model`'s Linear and Conv weights in float8_e4m3fn, each cast to bf16 for its own forward only (diffusers'
    layerwise casting, skipping the embeddings and norms it keeps precise); gradients still reach the inputs, so
    adapters on these layers train as on a bf16 base holding the same fp8-rounded weights."""
    try:
        from diffusers.hooks import apply_layerwise_casting
    except ImportError as error:
        raise FamilyError(f"--base-dtype fp8 needs diffusers 0.33 or newer (layerwise casting): pip install -U "
                          f"diffusers, or use --base-dtype bf16 or --qlora ({error})") from error
    if hasattr(model, "enable_layerwise_casting"):  # a diffusers model: its own list of layers to keep
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=FP8_COMPUTE_DTYPE)
    else:
        # embeddings stay bf16 too: small, and transformers reports the first one's dtype as the model's
        apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=FP8_COMPUTE_DTYPE,
                                skip_modules_classes=(torch.nn.Embedding,))


def load_pipeline(base: Path, device: str, dtype: torch.dtype = torch.float32, quantize_denoiser: bool = False) -> Any:
    """The pipeline saved in the local folder `base` (nothing is downloaded), as its model_index.json names it: read on
    the CPU with the denoiser and text encoders in `dtype` (float8_e4m3fn: stored so, computing in bf16) and the VAE
    in fp32 (as diffusers' SDXL script keeps it: SDXL's overflows in fp16), the denoiser's Linear layers quantized to
    NF4 there if asked (QLoRA), then moved to `device`, so no full-precision copy of a big base ever reaches it."""
    import diffusers

    fp8 = dtype == torch.float8_e4m3fn
    if fp8 and quantize_denoiser:
        raise FamilyError("--qlora holds the denoiser's Linear weights in 4-bit NF4 already; use it with --base-dtype "
                          "bf16 (or fp16, fp32), or use --base-dtype fp8 without --qlora")
    cls = getattr(diffusers, pipeline_class(base))
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls.__name__ == "StableDiffusionPipeline" else {}
    _, vae_class = json.loads((base / "model_index.json").read_text())["vae"]
    vae = getattr(diffusers, vae_class).from_pretrained(base, subfolder="vae", local_files_only=True)
    pipeline = cls.from_pretrained(base, local_files_only=True, torch_dtype=FP8_COMPUTE_DTYPE if fp8 else dtype,
                                   vae=vae, **extra)
    pipeline.set_progress_bar_config(disable=True)
    if fp8:
        for name, component in pipeline.components.items():
            if isinstance(component, torch.nn.Module) and name != "vae":
                store_in_fp8(component)
    if quantize_denoiser:
        from ..quantize import quantize_linear_layers

        quantize_linear_layers(denoiser(pipeline))
    return pipeline.to(device)


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
