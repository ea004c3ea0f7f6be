"""An exponential moving average of the LoRA's weights (ai-toolkit's, OneTrainer's and SimpleTuner's EMA).

The average starts as the weights after step `start_step` (0: the initial weights) and after every later step moves
`1 − decay` of the way to them: average ← decay · average + (1 − decay) · weights, in fp32 beside the weights. Where the
run uses it (validation, samples, checkpoints, the result) it is copied into the network for the moment (`applied`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    def __init__(self, network: nn.Module, decay: float, start_step: int) -> None:
        self.network, self.decay, self.start_step = network, decay, start_step
        self.average: dict[str, torch.Tensor] | None = self.copy() if start_step == 0 else None

    def copy(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach().clone() for name, parameter in self.network.named_parameters()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step`."""
        if self.average is None:
            if step >= self.start_step:
                self.average = self.copy()
            return
        for name, parameter in self.network.named_parameters():
            self.average[name].lerp_(parameter.detach(), 1 - self.decay)

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The network holds the average inside the block (its own weights before the average starts)."""
        if self.average is None:
            yield
            return
        own = self.copy()
        self.load_into_network()
        try:
            yield
        finally:
            for name, parameter in self.network.named_parameters():
                parameter.copy_(own[name])

    @torch.no_grad()
    def load_into_network(self) -> None:
        """The network's weights become the average (at the end of the run)."""
        if self.average is not None:
            for name, parameter in self.network.named_parameters():
                parameter.copy_(self.average[name])

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The network's state dict with the average for its weights, as copies."""
        with self.applied():
            return {name: value.detach().clone() for name, value in self.network.state_dict().items()}

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.average = state["average"]
