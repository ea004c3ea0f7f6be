"""Block swap: the frozen weights of a denoiser's last blocks live in (pinned) host memory and visit the device only
for their forward and their backward, the next one copied ahead on a side stream while the current one computes, as
sd-scripts' and musubi-tuner's `blocks_to_swap` do. LoRA parameters (and so their gradients and optimizer state)
stay on the device.

A swapped parameter's `.data` is its device copy while its block runs and its host copy otherwise; autograd's saved
references to the parameter see whichever is current, so a block's backward runs on the weights brought back for it.
Forward: each block's pre-hook waits for its copy and starts the next swapped block's; its post-hook sends it away
(unless a backward is under way, when a checkpointed block is only being recomputed). Backward: a hook on a block's
outputs fires when their gradient is ready, before the block's own backward: it brings the block (and starts the
previous one), and sends away the block after it, whose backward is done. On a CPU there is no device memory to save:
a swapped block's weights are then taken away between its uses (empty tensors), so that a block run out of turn fails
instead of passing unnoticed, and results are bitwise the same as without swap."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import TrainingError


class SwappedBlock:
    """One block's frozen tensors: each one's home (host) copy, and whether the device copy is current."""

    def __init__(self, block: nn.Module, device: torch.device) -> None:
        self.device = device
        self.tensors = [tensor for tensor in [*block.parameters(), *block.buffers()] if not tensor.requires_grad]
        self.started_on = self.tensors[0].device if self.tensors else device
        pin = device.type == "cuda"
        self.homes = [tensor.data.to("cpu").pin_memory() if pin else tensor.data for tensor in self.tensors]
        self.loaded = False
        self.ready: torch.cuda.Event | None = None
        self.evict()

    def evict(self) -> None:
        """The host copies current (on a CPU: none, until the block is loaded again)."""
        for tensor, home in zip(self.tensors, self.homes):
            tensor.data = home if self.device.type == "cuda" else home.new_empty(0)
        self.loaded, self.ready = False, None

    def load(self, stream: torch.cuda.Stream | None) -> None:
        """Start copying the block to the device (on `stream`, where one is given)."""
        if self.loaded:
            return
        if stream is None:
            for tensor, home in zip(self.tensors, self.homes):
                tensor.data = home.to(self.device)
        else:
            with torch.cuda.stream(stream):
                for tensor, home in zip(self.tensors, self.homes):
                    tensor.data = home.to(self.device, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
        self.loaded = True

    def restore(self) -> None:
        """The weights where they were before the swap: the device copies, or the host ones."""
        if self.started_on.type == self.device.type:
            self.load(None)
            self.wait()
        else:
            for tensor, home in zip(self.tensors, self.homes):
                tensor.data = home
            self.loaded = False

    def wait(self) -> None:
        """Let the compute stream use the copies once they have arrived; their memory is freed only after it has."""
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            for tensor in self.tensors:
                tensor.data.record_stream(current)
            self.ready = None


def check_swap_count(blocks: list[nn.Module], count: int) -> None:
    if not 0 < count < len(blocks):
        raise TrainingError(f"blocks_to_swap {count} out of range: this denoiser has {len(blocks)} blocks, and at "
                            f"least one stays on the device (1 to {len(blocks) - 1})")


def frozen_bytes(blocks: list[nn.Module]) -> int:
    """Bytes of the frozen parameters and buffers of `blocks`: what swapping them moves."""
    return sum(tensor.nbytes for block in blocks for tensor in [*block.parameters(), *block.buffers()]
               if not tensor.requires_grad)


class BlockSwap:
    """The last `count` of `blocks` swapped between host and `device` around each use (see the module's doc)."""

    def __init__(self, blocks: list[nn.Module], count: int, device: torch.device) -> None:
        check_swap_count(blocks, count)
        self.blocks = blocks
        self.first = len(blocks) - count
        self.swapped = {index: SwappedBlock(block, device) for index, block in enumerate(blocks) if index >= self.first}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.backward = False
        self.hooks = []
        for index, block in enumerate(blocks):
            self.hooks.append(block.register_forward_pre_hook(self.before_forward(index)))
            self.hooks.append(block.register_forward_hook(self.after_forward(index)))

    def bring(self, index: int, wait: bool) -> None:
        if index in self.swapped:
            self.swapped[index].load(self.stream)
            if wait:
                self.swapped[index].wait()

    def send_away(self, index: int) -> None:
        if index in self.swapped and self.swapped[index].loaded:
            self.swapped[index].evict()

    def before_forward(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if index == 0:  # a new forward: any backward before it is over
                self.backward = False
                for other in self.swapped:
                    self.send_away(other)
            self.bring(index, wait=True)
            if not self.backward:
                self.bring(index + 1, wait=False)
        return hook

    def after_forward(self, index: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if not self.backward:
                self.send_away(index)
            tensors = [tensor for tensor in (output if isinstance(output, tuple) else (output,))
                       if isinstance(tensor, torch.Tensor) and tensor.requires_grad]
            for tensor in tensors:
                tensor.register_hook(self.before_backward(index))
        return hook

    def before_backward(self, index: int):
        def hook(gradient: torch.Tensor) -> None:
            self.backward = True
            self.send_away(index + 1)  # its backward, which made this gradient, is done
            self.bring(index, wait=True)
            self.bring(index - 1, wait=False)
        return hook

    def close(self) -> None:
        """Every block's weights back where they were before (the device, or the host where the base was loaded with
        these blocks there), the hooks removed."""
        for hook in self.hooks:
            hook.remove()
        for swapped in self.swapped.values():
            swapped.restore()


@contextmanager
def swapped_blocks(blocks: list[nn.Module], count: int, device: torch.device) -> Iterator[BlockSwap | None]:
    """`count` of the last `blocks` swapped inside the block (none where `count` is 0); all on `device` afterwards."""
    if not count:
        yield None
        return
    swap = BlockSwap(blocks, count, device)
    try:
        yield swap
    finally:
        swap.close()
