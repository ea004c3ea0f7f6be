"""QLoRA: the frozen base's Linear layers held in 4-bit NF4 (bitsandbytes), with LoRA trained in fp32 on top."""
from __future__ import annotations

import logging

from torch import nn

from .errors import LoRALabError

# bitsandbytes logs this at import on CPUs with AVX512-BF16 when the optional `kernels` package cannot fetch a
# fused kernel from the Hugging Face hub; its own fallback works, and LoRA Lab never downloads kernels.
KERNELS_COMMUNITY_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_COMMUNITY_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def hide_kernels_community_warning() -> None:
    """Drop that one bitsandbytes line (imported by diffusers and transformers on every run); nothing else."""
    logging.getLogger(KERNELS_COMMUNITY_LOGGER).addFilter(not_kernels_community)  # once: filters are a set


def not_kernels_community(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(KERNELS_COMMUNITY_MESSAGE)


class QuantizationError(LoRALabError, RuntimeError):
    """4-bit quantization is not available here; the message says what to install."""


def quantize_linear_layers(root: nn.Module, compute_dtype=None) -> int:
    """Replace every nn.Linear under `root` by a bitsandbytes NF4 `Linear4bit` holding the same weights (quantized);
    returns how many. Do it before creating adapters: they attach to the layers that are there."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise QuantizationError(f"QLoRA needs bitsandbytes (pip install bitsandbytes): {error}") from error
    targets = [(name, module) for name, module in root.named_modules()
               if isinstance(module, nn.Linear) and not isinstance(module, bnb.nn.Linear4bit)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        quantized = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, quant_type="nf4",
            compute_dtype=compute_dtype or linear.weight.dtype, device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, child, quantized.to(linear.weight.device))
    return len(targets)
