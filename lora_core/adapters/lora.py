"""LoRA (and LoCon on convolutions): down Kaiming-uniform, up zero, scale α/r, applied on activations."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import lora
from .base import Adapter, AdapterError, kaiming_uniform


class LoRAAdapter(Adapter):
    algorithm = "lora"
    file_keys = frozenset({"lora_down.weight", "lora_up.weight", "alpha"})

    def __init__(
        self, base: nn.Module, rank: int = 8, alpha: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(base, rank, alpha)
        device = base.weight.device
        if self.is_conv:
            self.lora_down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                bias=False, device=device, dtype=torch.float32,
            )
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device, dtype=torch.float32)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        kaiming_uniform(self.lora_down.weight, generator)
        nn.init.zeros_(self.lora_up.weight)

    def delta_weight(self) -> torch.Tensor:
        return lora.delta_weight(self.lora_down.weight, self.lora_up.weight, self.scale, self.weight_shape)

    def lora_output(self, x: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        """up(down(x)) · scale · factor: the low-rank path on activations, never forming ΔW. The scale goes into
        the small up weight (in fp32, before the cast) rather than onto the activations, and the weights are cast to
        the activations' dtype as autocast would, so a bf16 base is not slowed by fp32 copies of x."""
        down, up = self.lora_down.weight.to(x.dtype), (self.lora_up.weight * (self.scale * factor)).to(x.dtype)
        if self.is_conv:
            base = self.base
            return F.conv2d(F.conv2d(x, down, None, base.stride, base.padding, base.dilation), up)
        return F.linear(F.linear(x, down), up)

    def forward(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        return self.lora_output(x, self.multiplier)

    @classmethod
    def from_tensors(cls, base: nn.Module, tensors: dict[str, torch.Tensor]) -> LoRAAdapter:
        if "lora_mid.weight" in tensors:
            raise AdapterError("LoCon with a Tucker `lora_mid` weight is not supported")
        down = tensors.get("lora_down.weight")
        if down is None or "lora_up.weight" not in tensors:
            raise AdapterError("a LoRA module needs both `lora_down.weight` and `lora_up.weight`")
        alpha = tensors.get("alpha")
        adapter = cls(base, rank=down.shape[0], alpha=None if alpha is None else float(alpha))
        adapter.load_tensors(tensors)
        return adapter
