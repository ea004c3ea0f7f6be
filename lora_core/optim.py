"""Optimizers by name and learning-rate schedules with warmup, built from torch's own classes."""
from __future__ import annotations

import importlib
import math
from collections.abc import Iterable

import torch
from torch.optim import lr_scheduler

# name users type (lower case) → (module, class) for optimizers outside torch.optim
EXTRA_OPTIMIZERS = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "lion": ("lion_pytorch", "Lion"),
    "prodigy": ("prodigyopt", "Prodigy"),
}
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


class OptimizerError(ValueError):
    """An optimizer or scheduler name or setting that cannot be used; the message lists the choices."""


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """`torch.optim.<name>` (AdamW, SGD, Adafactor…) or one of EXTRA_OPTIMIZERS if its package is installed."""
    torch_class = getattr(torch.optim, name, None)
    if isinstance(torch_class, type) and issubclass(torch_class, torch.optim.Optimizer):
        return torch_class
    if name.lower() in EXTRA_OPTIMIZERS:
        module_name, class_name = EXTRA_OPTIMIZERS[name.lower()]
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except ImportError as error:
            raise OptimizerError(
                f"optimizer {name!r} needs the package {module_name.split('.')[0]!r}: pip install it ({error})"
            ) from error
    known = sorted(n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type) and n[0].isupper())
    raise OptimizerError(f"unknown optimizer {name!r}; use a torch.optim class ({', '.join(known)}) or {sorted(EXTRA_OPTIMIZERS)}")


FUSED_OPTIMIZERS = ("Adam", "AdamW", "SGD")


def make_optimizer(name: str, parameters: Iterable, lr: float, **options) -> torch.optim.Optimizer:
    """`name` over `parameters` (tensors or parameter groups). On CUDA, Adam, AdamW and SGD use torch's fused
    single-kernel step unless `options` say otherwise: hundreds of small adapter tensors make the default step slow."""
    parameters = list(parameters)
    tensors = [p for item in parameters for p in (item["params"] if isinstance(item, dict) else [item])]
    if name in FUSED_OPTIMIZERS and tensors and all(p.is_cuda for p in tensors):
        options.setdefault("fused", True)
    try:
        return optimizer_class(name)(parameters, lr=lr, **options)
    except TypeError as error:
        raise OptimizerError(f"optimizer {name!r} does not take the options {sorted(options)}: {error}") from error


def make_scheduler(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, cycles: int = 1
) -> lr_scheduler.LRScheduler:
    """The schedule `name` over the steps after a linear warmup of `warmup_steps` (diffusers' names)."""
    if name not in SCHEDULERS:
        raise OptimizerError(f"unknown lr scheduler {name!r}; choose one of {list(SCHEDULERS)}")
    if not 0 <= warmup_steps < total_steps:
        raise OptimizerError(f"lr warmup steps must be from 0 to {total_steps - 1} (steps - 1), got {warmup_steps}")
    after_warmup = total_steps - warmup_steps
    if name == "constant":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif name == "linear":
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=after_warmup)
    elif name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=after_warmup)
    elif name == "cosine_with_restarts":
        main = lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=max(1, math.ceil(after_warmup / cycles)))
    else:
        main = lr_scheduler.PolynomialLR(optimizer, total_iters=after_warmup, power=1.0)
    if not warmup_steps:
        return main
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
    return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
