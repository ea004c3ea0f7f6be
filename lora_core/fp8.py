"""An fp8 base: the denoiser's Linear and Conv2d weights stored in fp8 (e4m3fn or e5m2, one byte a value) and cast to
the activations' dtype layer by layer, as ComfyUI's fp8 weight_dtype and its "scaled fp8" files hold them.

Each weight is stored divided by a per-tensor `scale_weight` (its largest magnitude over the fp8 format's largest
value, ComfyUI's scaled-fp8 convention: true weight = stored × scale_weight), so small weights keep their precision.
The layers diffusers' own layerwise casting keeps in the compute dtype (patch and position embeddings, the model's
input and output projections, and the embedders the model names in `_skip_layerwise_casting_patterns`) keep it here,
but for the Linear layers inside adaptive norms (the modulations: a quarter of Flux.1's weights), which diffusers keeps
by its "norm" pattern and ComfyUI's fp8 weight_dtype and kohya's fp8_base store in fp8, as they are stored here.

The cast copy of a weight lives only while its layer computes: the layer's backward casts the weight again instead of
keeping the copy autograd would otherwise save for the input's gradient, so an fp8 base trained without gradient
checkpointing does not hold a second, wider copy of every weight. The weights are frozen: no gradient reaches them.
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

try:  # diffusers ≥ 0.32: the patterns its layerwise casting keeps out of the storage dtype
    from diffusers.hooks.layerwise_casting import (
        DEFAULT_SKIP_MODULES_PATTERN as KEPT_IN_COMPUTE_DTYPE,
    )
except ImportError:  # older diffusers: the same patterns
    KEPT_IN_COMPUTE_DTYPE = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


def compute_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's true weight in `dtype`: its fp8 values × scale_weight."""
    return layer.weight.to(dtype) * layer.scale_weight.to(dtype)


class CastLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W cast from fp8 for the forward and again for the backward (only x gets a gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Fp8Linear) -> torch.Tensor:
        ctx.layer, ctx.input_dtype = layer, x.dtype
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, compute_weight(layer, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad @ compute_weight(ctx.layer, grad.dtype)).to(ctx.input_dtype), None


class CastConv2d(torch.autograd.Function):
    """A Conv2d with W cast from fp8 for the forward and again for the backward (only x gets a gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Fp8Conv2d) -> torch.Tensor:
        ctx.layer, ctx.input_shape, ctx.input_dtype = layer, x.shape, x.dtype
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.conv2d(x, compute_weight(layer, x.dtype), bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer
        return torch.nn.grad.conv2d_input(ctx.input_shape, compute_weight(layer, grad.dtype), grad, layer.stride,
                                          layer.padding, layer.dilation, layer.groups).to(ctx.input_dtype), None


class Fp8Linear(nn.Linear):
    """An nn.Linear whose weight is stored in fp8 (with `scale_weight`) and cast per forward and backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return CastLinear.apply(x, self)


class Fp8Conv2d(nn.Conv2d):
    """An nn.Conv2d (zero padding) whose weight is stored in fp8 (with `scale_weight`) and cast per use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return CastConv2d.apply(x, self)


FP8_CLASSES = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def kept_in_compute_dtype(model: nn.Module) -> tuple[str, ...]:
    """The name patterns of the layers an fp8 `model` keeps in its compute dtype (norm layers are neither Linear nor
    Conv2d: "norm" would only keep the modulations)."""
    patterns = (*KEPT_IN_COMPUTE_DTYPE, *(getattr(model, "_skip_layerwise_casting_patterns", None) or ()))
    return tuple(pattern for pattern in patterns if pattern != "norm")


@torch.no_grad()
def store_in_fp8(model: nn.Module, storage_dtype: torch.dtype) -> tuple[int, int]:
    """Store the weights of `model`'s plain Linear and zero-padded Conv2d layers in `storage_dtype` (scaled per
    tensor), but for the layers `kept_in_compute_dtype` names; returns (layers stored in fp8, layers kept). Do it
    before creating adapters, and with the model on the host: the wide copy is freed layer by layer."""
    patterns = kept_in_compute_dtype(model)
    largest = torch.finfo(storage_dtype).max
    stored = kept = 0
    unhandled = []  # Linear/Conv2d layers this module cannot cast: subclasses with their own forward, other paddings
    for name, layer in model.named_modules():
        fp8_class = FP8_CLASSES.get(type(layer))
        if fp8_class is None or (fp8_class is Fp8Conv2d and (layer.padding_mode != "zeros"
                                                              or isinstance(layer.padding, str))):
            if isinstance(layer, (nn.Linear, nn.Conv2d)) and not isinstance(layer, (Fp8Linear, Fp8Conv2d)):
                unhandled.append(f"{name} ({type(layer).__name__})")
            continue
        if any(re.search(pattern, name) for pattern in patterns):
            kept += 1
            continue
        weight = layer.weight.float()
        scale = (weight.abs().max() / largest).clamp(min=torch.finfo(torch.float32).tiny)
        layer.weight = nn.Parameter((weight / scale).to(storage_dtype), requires_grad=False)
        layer.register_buffer("scale_weight", scale.to(torch.float32))
        layer.__class__ = fp8_class
        stored += 1
    if stored and isinstance(getattr(type(model), "dtype", None), property):
        model.__class__ = reporting_compute_dtype(type(model))
    if unhandled:
        warnings.warn(f"fp8: {len(unhandled)} Linear/Conv2d layers stay in the compute dtype, not being plain "
                      f"nn.Linear or zero-padded nn.Conv2d: {', '.join(unhandled[:5])}", stacklevel=2)
    return stored, kept


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: its parameters' where they are not fp8 (fp8 layers compute in their input's)."""
    return next((p.dtype for p in model.parameters() if p.dtype not in FP8_DTYPES.values()), torch.float32)


REPORTING_CLASSES: dict[type, type] = {}


def reporting_compute_dtype(cls: type) -> type:
    """`cls` (a diffusers model, same name) whose `dtype` is the compute dtype: pipelines cast latents and prompts to
    `model.dtype`, which would otherwise be the first parameter's, fp8 (diffusers' layerwise casting answers alike)."""
    if cls not in REPORTING_CLASSES:
        REPORTING_CLASSES[cls] = type(cls.__name__, (cls,), {"dtype": property(compute_dtype),
                                                            "__qualname__": cls.__qualname__,
                                                            "__module__": cls.__module__})
    return REPORTING_CLASSES[cls]
