"""Frozen 2-D convolutions on CPU through the faster of PyTorch's two fp32 kernels for their size.

PyTorch runs every fp32 convolution on CPU whose input has more than 20,480 values through oneDNN, which reorders
the weight into its blocked layout on every call, forward and backward. Where the output has few pixels (a UNet's
deepest levels: 1280 channels at 8×8), reordering a weight of up to 118 MB costs more than the arithmetic, and
PyTorch's own im2col + GEMM kernel ("slow_conv2d") is up to 5× faster; from 32×32 output pixels on, oneDNN wins,
and weights below about a million values reorder too fast to matter (numbers in docs/benchmarks.md). A frozen layer needs only the gradient of its input, so its backward
(`conv2d_input`) picks its kernel by the same rule and keeps no copy of the input. Both kernels compute the same
convolution; results differ by fp32 rounding only.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

GEMM_MAX_OUTPUT_PIXELS = 256  # batch × height × width of the output up to which im2col + GEMM beats oneDNN
GEMM_MIN_WEIGHT_VALUES = 1_000_000  # smaller weights (4 MB) reorder in microseconds: routing them only adds overhead
ONEDNN_MIN_INPUT_VALUES = 20_481  # PyTorch's own rule: smaller single-image inputs already take GEMM
KERNEL_CHOICES = ("by_size", "pytorch")  # TrainingConfig.cpu_conv_kernels: this module's choice, or PyTorch's own


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class FrozenConvolution(torch.autograd.Function):
    """conv2d with a frozen weight and bias on the GEMM kernel, forward and backward (input gradient only)."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple,
                padding: tuple) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.stride, ctx.padding = input.shape, stride, padding
        with onednn(False):
            return F.conv2d(input, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple:
        (weight,) = ctx.saved_tensors
        with onednn(False):
            grad_input = conv2d_input(ctx.input_shape, weight, grad_output, ctx.stride, ctx.padding)
        return grad_input, None, None, None, None


def output_pixels(module: nn.Conv2d, input: torch.Tensor) -> int:
    height, width = ((size + 2 * pad - kernel) // step + 1 for size, pad, kernel, step in
                     zip(input.shape[-2:], module.padding, module.kernel_size, module.stride))
    return input.shape[0] * height * width


def takes_gemm(module: nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A frozen fp32 convolution on CPU, outside autocast, whose weight is large and output small enough for GEMM to
    win."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    plain = not weight.is_inference() and input.dim() == 4 and (bias is None or bias.dtype == torch.float32)
    onednn_by_default = input.shape[0] > 1 or input.numel() >= ONEDNN_MIN_INPUT_VALUES
    return (frozen and plain and onednn_by_default and input.device.type == "cpu"
            and input.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and weight.numel() >= GEMM_MIN_WEIGHT_VALUES and output_pixels(module, input) <= GEMM_MAX_OUTPUT_PIXELS)


def conv_forward(module: nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """`module._conv_forward` (which torch's Conv2d and ComfyUI's cast-weight Conv2d both call) by size."""
    if takes_gemm(module, input, weight, bias):
        return FrozenConvolution.apply(input, weight, bias, module.stride, module.padding)
    return type(module)._conv_forward(module, input, weight, bias)


def routable(module: nn.Module) -> bool:
    """A plain zero-padded 2-D convolution up to 3×3 whose `_conv_forward` nobody else has replaced."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.dilation == (1, 1)
            and max(module.kernel_size) <= 3  # the sizes measured (larger kernels always take oneDNN in PyTorch)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and "_conv_forward" not in module.__dict__)


@contextmanager
def kernels_by_size(modules: list[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Inside the block, the 2-D convolutions under `modules` run frozen fp32 CPU work on the faster kernel for its
    size (see the module docstring); everything else as before. Their methods are restored after it."""
    convolutions = modules_under(modules, routable) if enabled else []
    for module in convolutions:
        module._conv_forward = functools.partial(conv_forward, module)
    try:
        yield
    finally:
        for module in convolutions:
            del module._conv_forward


@contextmanager
def pytorch_kernels(modules: list[nn.Module]) -> Iterator[None]:
    """Inside the block, convolutions under `modules` that `kernels_by_size` routes take PyTorch's own kernels again,
    as they do outside training (for sample images that must equal later generations bit for bit)."""
    routed = modules_under(modules, is_routed)
    for module in routed:
        del module._conv_forward
    try:
        yield
    finally:
        for module in routed:
            module._conv_forward = functools.partial(conv_forward, module)


def modules_under(roots: list[nn.Module], predicate) -> list[nn.Module]:
    """Each module under `roots` for which `predicate` holds, once."""
    return list({id(m): m for root in roots for m in root.modules() if predicate(m)}.values())


def is_routed(module: nn.Module) -> bool:
    patched = module.__dict__.get("_conv_forward")
    return isinstance(patched, functools.partial) and patched.func is conv_forward
