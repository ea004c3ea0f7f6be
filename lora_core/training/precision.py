"""One precision policy for a run: which dtype the forward computes in, and when gradients need a scaler.

LoRA parameters are always fp32. A forward in fp16 — fp16 weights (how ComfyUI loads SD1.5 on most GPUs), a
ComfyUI manual cast to fp16, or fp16 autocast — gives gradients that flush to zero below fp16's range (6e-8): small
LoRA gradients are lost. Whenever any forward runs in fp16, the loss is scaled before backward and the gradients
unscaled before clipping and the step (a dynamic `GradScaler`). bf16 and fp32 have fp32's range and need none.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    autocast_dtype: torch.dtype | None  # None: the base's own dtype throughout
    base_dtype: torch.dtype  # what the denoiser computes in outside autocast (its weights' or its cast dtype)
    device_type: str

    @classmethod
    def for_run(cls, mixed_precision: str, base_dtype: torch.dtype, device: torch.device) -> Precision:
        return cls(AUTOCAST_DTYPES[mixed_precision], base_dtype, device.type)

    @property
    def needs_scaler(self) -> bool:
        """fp16 anywhere in the forward: autocast's matmuls, or the base's own layers outside autocast."""
        return torch.float16 in (self.autocast_dtype, self.base_dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.needs_scaler else None

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def describe(self) -> str:
        scaler = ", dynamic gradient scaler" if self.needs_scaler else ""
        cast = f", autocast to {self.autocast_dtype}" if self.autocast_dtype else ""
        return f"base computes in {self.base_dtype}{cast}; LoRA parameters in torch.float32{scaler}"
