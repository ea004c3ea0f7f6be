"""DoRA: LoRA plus a learned per-output-channel magnitude (`dora_scale`), as PEFT, LyCORIS and ComfyUI read it."""
from __future__ import annotations

import torch
from torch import nn

from ..functional import dora
from .lora import LoRAAdapter


class DoRAAdapter(LoRAAdapter):
    algorithm = "dora"
    file_keys = LoRAAdapter.file_keys | {"dora_scale"}

    def __init__(
        self, base: nn.Module, rank: int = 8, alpha: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(base, rank, alpha, generator)
        self.dora_scale = nn.Parameter(dora.output_norm(self.base_weight().detach()))

    def forward(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """multiplier · (DoRA output − base output), from the base output: W itself is never multiplied again."""
        weight = self.base_weight()
        magnitude = self.per_channel(dora.magnitude_scale(weight, self.delta_weight(), self.dora_scale))
        plain = base_output.float()
        if self.base.bias is not None:
            plain = plain - self.per_channel(self.base.bias.float())
        return ((magnitude - 1) * plain + magnitude * self.lora_output(x)) * self.multiplier

    def per_channel(self, values: torch.Tensor) -> torch.Tensor:
        """Per-output-channel values shaped to broadcast over this module's output."""
        return values.reshape(1, -1, 1, 1) if self.is_conv else values.reshape(-1)

    def merged_weight(self, strength: float) -> torch.Tensor:
        return dora.merged_weight(self.base_weight(), self.delta_weight(), self.dora_scale, strength)
