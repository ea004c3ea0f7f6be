"""Data-parallel training on PyTorch's own engine: one process per device, started by `torchrun` or
`accelerate launch`, DistributedDataParallel over the LoRA parameters (see `training.BatchLoss`), and with `--fsdp`
the frozen base sharded over the ranks by FSDP2 (`Distributed.shard`), for bases that do not fit one device.

A launcher tells each process its place through the environment: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. `Distributed.from_environment()` reads it and joins the process group (gloo on the CPU, NCCL on
CUDA); without a launcher (or with WORLD_SIZE=1) it is a single process, and then every method here does nothing
and joins nothing.

A process group waits at most `timeout` seconds for its peers, so a rank that died or stalls turns into an error on
the others (`is_peer_failure`) instead of a hang; torchrun also stops the other ranks (SIGTERM) when one exits,
which `stop_on_sigterm()` turns into the same kind of error, after any checkpoint being written is complete.
"""
from __future__ import annotations

import inspect
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LoRALabError

DEFAULT_TIMEOUT_SECONDS = 120.0
LAUNCH_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(LoRALabError, RuntimeError):
    """The process group cannot be joined, or it broke: another rank died, stalled or stopped this one."""


class StoppedByLauncher(DistributedError):
    """The launcher sent SIGTERM: it stops every rank when one of them has failed."""


@dataclass
class Distributed:
    """This process's place among the training processes; a single process by default."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    _shielded: bool = field(default=False, repr=False)
    _stop_pending: bool = field(default=False, repr=False)

    @classmethod
    def from_environment(cls, device: str = "cpu", timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Distributed:
        """Join the process group a launcher set up in the environment; a single process if there is none.

        Under a launcher each process gets the device of its local rank: `cuda` becomes `cuda:<LOCAL_RANK>`.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(device=torch.device(device), timeout=timeout)
        missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} not: start the "
                                   "processes with torchrun or accelerate launch, which set them all")
        if timeout <= 0:
            raise DistributedError(f"the distributed timeout must be a number of seconds > 0, got {timeout}")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        place = torch.device(device)
        if place.type == "cuda":
            place = torch.device("cuda", local_rank)
            torch.cuda.set_device(place)
        backend = "nccl" if place.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        return cls(rank, world_size, local_rank, place, timeout)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints progress and writes files."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in DistributedDataParallel, which averages its parameters' gradients over the ranks in
        backward; the module itself in one process. Buffers (the adapters' alphas) are constant: not re-sent."""
        if not self.enabled:
            return module
        ddp = nn.parallel.DistributedDataParallel
        newer = "forward_sync_buffers" in inspect.signature(ddp).parameters  # newer PyTorch; formerly broadcast_buffers
        return ddp(module, **{"forward_sync_buffers" if newer else "broadcast_buffers": False})

    def shard(self, blocks: list[nn.Module], roots: list[nn.Module]) -> int:
        """FSDP2 (PyTorch's `fully_shard`) over the frozen base: each of `blocks`, then the rest of each of `roots`,
        split over the ranks, so each rank holds 1/world_size of the weights and gathers one block whole only for
        its forward and its backward (again after checkpointing's recompute). The LoRA stays whole on every rank:
        DistributedDataParallel averages its gradients, and rank 0 saves it as an ordinary file. Returns the bytes
        of the base this rank holds."""
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError as error:
            raise DistributedError(f"--fsdp needs PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch "
                                   f"2.6 and newer): {error}") from error
        if not self.enabled:
            raise DistributedError("--fsdp shards the base over the processes torchrun or accelerate launch starts; "
                                   "this is one process: launch several, or leave --fsdp out")
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for module in [*blocks, *roots]:
            fully_shard(module, mesh=mesh)
        return sum(tensor.to_local().nbytes for root in roots for tensor in root.parameters())

    def syncing(self, model: nn.Module, sync: bool):
        """Around a micro-step's forward and backward: gradients are averaged over the ranks only where `sync`
        (the last micro-step of an accumulated step); before it each rank accumulates its own (DDP's no_sync)."""
        if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
            return nullcontext()
        return model.no_sync()

    def mean(self, value: float) -> float:
        """The mean of every rank's `value`, the same on all of them (each sums the gathered values in rank
        order); `value` itself in one process."""
        if not self.enabled:
            return value
        mine = torch.tensor([value], dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        return sum(tensor.item() for tensor in gathered) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        """Leave the process group (after a successful run; a failed process simply exits)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # -- failures --------------------------------------------------------------------------------------------

    def stop_on_sigterm(self) -> None:
        """Turn the launcher's SIGTERM into `StoppedByLauncher`, raised in the main thread (once it is back from a
        blocking collective), so that the process says why it stops; not while `shielded()`."""
        if self.enabled:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self._shielded:
            self._stop_pending = True
            return
        raise StoppedByLauncher("the launcher stopped this rank (SIGTERM), which it does when another rank failed")

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """A SIGTERM inside the block (such as during a checkpoint's writing) takes effect at its end."""
        self._shielded = True
        try:
            yield
        finally:
            self._shielded = False
            if self._stop_pending:
                self._stop_pending = False
                raise StoppedByLauncher("the launcher stopped this rank (SIGTERM), which it does when another "
                                        "rank failed")


PEER_FAILURE_SIGNS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused", "timed out",
                      "broken pipe", "socket", "peer")


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` came from the process group: a collective that failed or timed out, or the launcher's stop."""
    if isinstance(error, DistributedError) or isinstance(error, getattr(dist, "DistError", ())):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(sign in message for sign in PEER_FAILURE_SIGNS)
