"""The shared base of every adapter: it hooks one frozen Linear/Conv2d and adds `multiplier · Δ(x)` to its output."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoRALabError


class AdapterError(LoRALabError, ValueError):
    """An adapter cannot be built for this module or from these tensors; the message says which and why."""


class Adapter(nn.Module):
    """Base of LoRA, DoRA, LoHa and LoKr.

    The base module is never replaced: a forward hook adds the adapter's output, so the model's module tree and
    state dict stay as they were and `detach()` restores the exact original. Parameters and `alpha` are fp32 whatever
    the base dtype; the state dict's keys are the kohya/LyCORIS suffixes (`lora_down.weight`, `hada_w1_a`, `alpha`…).
    """

    algorithm: ClassVar[str]
    file_keys: ClassVar[frozenset[str]]

    scaled_by_rank: bool = True  # scale = alpha / rank (False where a layout fixes the scale at 1)

    def __init__(self, base: nn.Module, rank: int, alpha: float | None) -> None:
        super().__init__()
        check_supported(base)
        rank, alpha = checked_rank_and_alpha(rank, alpha)
        self.rank = rank
        self.multiplier = 1.0
        self.weight_shape = weight_shape(base)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=base.weight.device))
        self._base = [base]  # in a list, so the base stays out of this module's parameters and state dict
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._weight_backup: torch.Tensor | None = None

    @classmethod
    def rank_limit(cls, base: nn.Module) -> int | None:
        """The largest rank that can add anything on `base`: ΔW's rank is at most min(out, in · kernel).
        None where the algorithm bounds its size itself."""
        shape = weight_shape(base)
        return min(shape[0], math.prod(shape[1:]))

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def scale(self) -> torch.Tensor:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in fp32, the base weight's shape, scale included and multiplier not."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the base output for input `x`, multiplier included."""
        return self.apply_weight(x, self.delta_weight()) * self.multiplier

    def base_weight(self) -> torch.Tensor:
        """The base weight in fp32, dequantized if the layer holds it in 4 bits (QLoRA)."""
        return dense_weight(self.base)

    def merged_weight(self, strength: float) -> torch.Tensor:
        """The base weight with ΔW merged at `strength`, in fp32."""
        return self.base_weight() + strength * self.delta_weight()

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base module's operation with another weight and no bias, in the activations' dtype."""
        weight = weight.to(x.dtype)
        if self.is_conv:
            base = self.base
            return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation)
        return F.linear(x, weight)

    # -- attaching and merging -------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._hook is not None

    @property
    def merged(self) -> bool:
        return self._weight_backup is not None

    def attach(self) -> None:
        if self._hook is None:
            self._hook = self.base.register_forward_hook(self._add_to_output)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _add_to_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0:
            return output
        return output + self(args[0], output).to(output.dtype)

    @torch.no_grad()
    def merge(self, strength: float) -> None:
        """Write ΔW at `strength` into the base weight; `unmerge()` restores the exact original."""
        if self.merged:
            raise AdapterError("this adapter is merged already; unmerge it first")
        if is_quantized(self.base):
            raise AdapterError("a LoRA cannot be merged into a 4-bit quantized layer; apply it attached instead")
        weight = self.base.weight
        self._weight_backup = weight.detach().clone()
        weight.copy_(stored_weight(self.base, self.merged_weight(strength)))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._weight_backup is not None:
            self.base.weight.copy_(self._weight_backup)
            self._weight_backup = None

    # -- files -----------------------------------------------------------------------------------------------

    @classmethod
    def from_tensors(cls, base: nn.Module, tensors: dict[str, torch.Tensor]) -> Adapter:
        """An adapter for `base` holding `tensors` (kohya suffix → tensor), shapes checked against the base."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        for key, value in tensors.items():
            if key not in own:
                raise AdapterError(f"unexpected key {key!r} for a {self.algorithm} adapter")
            if tuple(value.shape) != tuple(own[key].shape):
                raise AdapterError(
                    f"{key!r} has shape {tuple(value.shape)}, but a {self.algorithm} adapter of rank {self.rank} "
                    f"on a weight of shape {tuple(self.weight_shape)} needs {tuple(own[key].shape)}"
                )
        self.load_state_dict({key: value.float() for key, value in tensors.items()}, strict=False)


def checked_rank_and_alpha(rank: int, alpha: float | None) -> tuple[int, float]:
    """`rank` and `alpha` (default: alpha = rank, kohya's), or AdapterError saying what is wrong with them."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"rank must be a whole number ≥ 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"alpha must be a number > 0 (kohya's default is alpha = rank), got {alpha!r}")
    return rank, alpha


def weight_shape(module: nn.Module) -> torch.Size:
    """The shape of `module`'s weight as ΔW has it ([out, in] or [out, in, k, k]), also for a 4-bit packed weight."""
    if isinstance(module, nn.Conv2d):
        return module.weight.shape
    return torch.Size((module.out_features, module.in_features))


def check_supported(module: nn.Module) -> None:
    """Raise AdapterError unless `module` is a Linear or a plain (zero-padded, ungrouped) Conv2d."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise AdapterError("adapters support Conv2d with groups=1 and zero padding only")
    elif not isinstance(module, nn.Linear):
        raise AdapterError(f"adapters support nn.Linear and nn.Conv2d, not {type(module).__name__}")


def is_quantized(module: nn.Module) -> bool:
    return getattr(module.weight, "quant_state", None) is not None


def weight_scale(module: nn.Module) -> torch.Tensor | None:
    """The factor a layer stores its weight divided by, as ComfyUI's "scaled fp8" layers hold it (`scale_weight`:
    true weight = stored weight × scale_weight); None where the weight is stored as it is."""
    scale = getattr(module, "scale_weight", None)
    return scale if isinstance(scale, torch.Tensor) else None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The true `module.weight` in fp32, detached (the base is frozen): a bitsandbytes 4-bit weight is dequantized,
    a scaled-fp8 weight is multiplied by its `scale_weight`."""
    if is_quantized(module):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    weight, scale = module.weight.detach().float(), weight_scale(module)
    return weight if scale is None else weight * scale.detach().float().to(weight.device)


def stored_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A true weight in the units and dtype `module` stores it in (`dense_weight` undone, up to rounding)."""
    scale = weight_scale(module)
    if scale is not None:
        weight = weight / scale.float().to(weight.device)
    return weight.to(module.weight.dtype)


def fp32_parameter(*shape: int, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=torch.float32, device=device))


@torch.no_grad()
def kaiming_uniform(parameter: torch.Tensor, generator: torch.Generator | None) -> None:
    """torch's default layer init (Kaiming-uniform, a = √5), drawn on the CPU: every device gets the same values."""
    values = torch.empty(parameter.shape)
    nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
    parameter.copy_(values)


@torch.no_grad()
def normal(parameter: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """N(0, std²) values drawn on the CPU, so that every device gets the same values."""
    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
