"""Optimizers by name, each validated for what it needs, and learning-rate schedules with warmup."""
from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from functools import partial

import torch
from torch.optim import lr_scheduler

from ..errors import LoRALabError

# name users type (lower case) → (module, class) for optimizers outside torch.optim
EXTRA_OPTIMIZERS = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "lion": ("lion_pytorch", "Lion"),
    "prodigy": ("prodigyopt", "Prodigy"),
}
# torch.optim classes a LoRA cannot train with, and why
UNSUITABLE_OPTIMIZERS = {
    "LBFGS": "it needs a closure that re-evaluates the loss, which a stochastic training loop does not have",
    "SparseAdam": "it takes only sparse gradients, and LoRA gradients are dense",
}
# optimizers whose learning rate is a multiplier of a step size they estimate themselves: 1.0 is the usual value
ADAPTIVE_LR_OPTIMIZERS = {"prodigy": 10.0}
OFFERED_OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop", "Adafactor", "AdamW8bit", "Lion", "Prodigy")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


class OptimizerError(LoRALabError, ValueError):
    """An optimizer or scheduler name or setting that cannot be used; the message lists the choices."""


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """`torch.optim.<name>` (AdamW, SGD, Adafactor…) or one of EXTRA_OPTIMIZERS if its package is installed."""
    if name in UNSUITABLE_OPTIMIZERS:
        raise OptimizerError(f"optimizer {name!r} cannot train a LoRA: {UNSUITABLE_OPTIMIZERS[name]}; use AdamW")
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
    raise OptimizerError(f"unknown optimizer {name!r}; use one of {list(OFFERED_OPTIMIZERS)} or another "
                         "torch.optim class")


def learning_rate_range(name: str) -> tuple[float, str]:
    """The largest learning rate that makes sense for optimizer `name`, and a hint for the message."""
    if name.lower() in ADAPTIVE_LR_OPTIMIZERS:
        return ADAPTIVE_LR_OPTIMIZERS[name.lower()], f"{name} estimates its step size: use 1.0"
    return 1.0, "typically 1e-4"


def check_learning_rate(name: str, lr: float, what: str = "learning_rate") -> None:
    """Refuse a learning rate outside (0, limit) for optimizer `name` (0 is allowed for a frozen group)."""
    limit, hint = learning_rate_range(name)
    if not 0 < lr < limit:
        raise OptimizerError(f"{what} = {lr!r} is out of range for {name}: use a value above 0 and below {limit:g} "
                             f"({hint})")


FUSED_OPTIMIZERS = ("Adam", "AdamW", "SGD")
# devices whose fused single-kernel optimizer step torch has (CPU since torch 2.4)
FUSED_DEVICES = ("cuda", "cpu") if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4) else ("cuda",)


def make_optimizer(name: str, parameters: Iterable, lr: float, **options) -> torch.optim.Optimizer:
    """`name` over `parameters` (tensors or parameter groups). Adam, AdamW and SGD use torch's fused single-kernel
    step on CUDA and CPU unless `options` say otherwise: hundreds of small adapter tensors make the default step slow
    (measured on CPU over 456 rank-8 tensors: 3.5 ms a step fused, 18–21 ms unfused)."""
    parameters = list(parameters)
    tensors = [p for item in parameters for p in (item["params"] if isinstance(item, dict) else [item])]
    devices = {p.device.type for p in tensors}
    if name in FUSED_OPTIMIZERS and len(devices) == 1 and devices <= set(FUSED_DEVICES) and "foreach" not in options:
        options.setdefault("fused", True)
    try:
        return optimizer_class(name)(parameters, lr=lr, **options)
    except TypeError as error:
        raise OptimizerError(f"optimizer {name!r} does not take the options {sorted(options)}: {error}") from error


def schedule_factor(step: int, name: str, total_steps: int, warmup_steps: int, cycles: int, power: float) -> float:
    """The learning rate's factor after `step` scheduler steps: a linear warmup reaching 1 at step `warmup_steps`,
    then the shape `name` over the remaining steps (diffusers' `get_scheduler` shapes)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if name == "constant":
        return 1.0
    if progress >= 1:
        return 0.0
    if name == "linear":
        return 1.0 - progress
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":
        return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    return (1.0 - progress) ** power  # polynomial


def make_scheduler(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, cycles: int = 1,
    power: float = 1.0, position: int = 0,
) -> lr_scheduler.LambdaLR:
    """The schedule `name` over `total_steps`, already `position` steps in (a resumed run rebuilds its schedule for
    its own horizon and continues at the step it saved). `cycles` is for cosine_with_restarts, `power` for
    polynomial; either set for another schedule is refused, as it would do nothing."""
    if name not in SCHEDULERS:
        raise OptimizerError(f"unknown lr scheduler {name!r}; choose one of {list(SCHEDULERS)}")
    if not 0 <= warmup_steps < total_steps:
        raise OptimizerError(f"lr warmup steps must be from 0 to {total_steps - 1} (steps - 1), got {warmup_steps}")
    if cycles < 1 or (cycles != 1 and name != "cosine_with_restarts"):
        raise OptimizerError(f"lr scheduler cycles = {cycles}: use a whole number ≥ 1, and other than 1 only with "
                             "cosine_with_restarts")
    if power <= 0 or (power != 1 and name != "polynomial"):
        raise OptimizerError(f"lr scheduler power = {power}: use a value above 0, and other than 1 only with polynomial")
    factor = partial(schedule_factor, name=name, total_steps=total_steps, warmup_steps=warmup_steps, cycles=cycles,
                     power=power)
    scheduler = lr_scheduler.LambdaLR(optimizer, factor)
    if position:
        scheduler.last_epoch = position
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * factor(position)
    return scheduler
