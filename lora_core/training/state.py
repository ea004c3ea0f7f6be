"""A run's state between steps: its position and history, the best weights so far, and what resuming needs.

`TrainerState.state_dict()` is what a checkpoint's sidecar holds; `load_state_dict()` continues a run exactly
where it stopped, after `check_resumable` has made sure the run being continued is the same run.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import torch

from ..data.dataset import BatchSampler, ImageFolderDataset
from ..formats.files import tensor_bytes
from ..network import LoRANetwork
from .config import FLOW_MATCHING_SETTINGS, TrainingConfig, TrainingError
from .ema import WeightAverage
from .plots import smoothing_step

STATE_FORMAT = 2
# settings a resumed run must share with the run it continues (steps may grow: the schedule is rebuilt for them)
RESUMABLE_SETTINGS = (
    "learning_rate", "batch_size", "gradient_accumulation", "optimizer", "lr_scheduler", "lr_warmup_steps",
    "lr_scheduler_cycles", "lr_scheduler_power", "seed", "text_encoder_lr", "mixed_precision", "min_snr_gamma", "prior_loss_weight",
    "noise_offset", "max_grad_norm", "validation_every", "validation_images", "validation_timesteps", "ema_decay",
    "ema_start_step",
    *FLOW_MATCHING_SETTINGS,
)


@dataclass
class TrainingResult:
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss); step 0 = untrained
    validation_held_out: bool = False  # validation images are held out of training (else a subset of them)
    steps: int = 0
    best_step: int | None = None  # the step of the lowest validation loss
    best_loss: float | None = None
    stop_reason: str = "completed"
    seconds: float = 0.0
    precision: str = ""
    memory_plan: str = ""  # what the run was planned to hold on its device (MemoryPlan.describe)
    samples: list[tuple[int, list]] = field(default_factory=list)  # (step, images)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "samples"}, "seconds_per_step": self.seconds_per_step}


def dataset_identity(dataset: ImageFolderDataset) -> dict[str, str]:
    """The dataset's folder name and a hash of its settings, images and captions: a resumed run needs the same."""
    digest = hashlib.sha256(repr(dataset.config).encode())
    for example in dataset.examples:
        digest.update(f"{example.caption}\0{example.repeats}\0{example.regularization}\0".encode())
        for pixels in (example.pixels, *example.references, *([] if example.mask is None else [example.mask])):
            digest.update(tensor_bytes(pixels))
    return {"name": dataset.root.name, "hash": digest.hexdigest()}


def run_identity(config: TrainingConfig, dataset: ImageFolderDataset, world_size: int) -> dict:
    return {"config": {name: getattr(config, name) for name in RESUMABLE_SETTINGS}, "dataset": dataset_identity(dataset),
            "world_size": world_size}


def check_resumable(state: dict, identity: dict, steps: int) -> None:
    """Refuse, with what differs and what to do, to continue a state that another run saved."""
    if state.get("format") != STATE_FORMAT:
        raise TrainingError("the training state was saved by an older LoRA Lab and cannot be continued exactly; "
                            "start a new run from its LoRA file (the .safetensors beside it) instead")
    saved = state["identity"]
    if saved["dataset"] != identity["dataset"]:
        raise TrainingError(f"the checkpoint was trained on the dataset {saved['dataset']['name']!r} and this run's "
                            f"is {identity['dataset']['name']!r} with other images, captions or settings; resume on "
                            "the same dataset, or start a new run")
    changed = {name: (value, identity["config"][name]) for name, value in saved["config"].items()
               if identity["config"][name] != value}
    if changed:
        raise TrainingError(f"the checkpoint was trained with other settings: {changed} (saved, now); resume with "
                            "the same settings, or start a new run")
    if saved["world_size"] != identity["world_size"]:
        raise TrainingError(f"the checkpoint was trained by {saved['world_size']} process(es) and this run has "
                            f"{identity['world_size']}; resume with the same number (torchrun --nproc_per_node … "
                            "--nnodes …), or start a new run")
    if state["step"] >= steps:
        raise TrainingError(f"the checkpoint is at step {state['step']}; set steps above it to train on (the "
                            "learning-rate schedule is rebuilt for the new number of steps)")


class TrainerState:
    """The run's stateful parts and its history; the scheduler is not saved: it is rebuilt for the run's steps."""

    def __init__(self, identity: dict, network: LoRANetwork, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, noise_generator: torch.Generator, batches: BatchSampler,
                 average: WeightAverage | None = None) -> None:
        self.identity, self.network, self.optimizer, self.scaler = identity, network, optimizer, scaler
        self.average = average  # the EMA of the weights, which validation judges
        self.noise_generator, self.batches = noise_generator, batches
        self.result = TrainingResult()
        self.smoothed = 0.0  # running mean of the training loss, for display
        self.stale_evaluations = 0  # validation evaluations since the best one
        self.best_weights: dict[str, torch.Tensor] | None = None

    @property
    def step(self) -> int:
        return self.result.steps

    def record_step(self, loss: float, learning_rate: float, smoothing: float) -> float:
        """Add a step's loss; the bias-corrected smoothed training loss (for display only)."""
        self.result.steps += 1
        self.result.losses.append(loss)
        self.result.learning_rates.append(learning_rate)
        self.smoothed, smoothed = smoothing_step(self.smoothed, loss, smoothing, self.step)
        return smoothed

    def record_validation(self, loss: float, keep_best: bool) -> None:
        """Add a validation loss; a new lowest one becomes the best (and its weights, the EMA's where there is one,
        are kept if asked)."""
        result = self.result
        result.validation.append((self.step, loss))
        if result.best_loss is None or loss < result.best_loss:
            result.best_step, result.best_loss, self.stale_evaluations = self.step, loss, 0
            if keep_best:
                self.best_weights = (self.average.averaged_state_dict() if self.average else
                                     {k: v.detach().clone() for k, v in self.network.state_dict().items()})
        else:
            self.stale_evaluations += 1

    def state_dict(self) -> dict:
        result = self.result
        return {
            "format": STATE_FORMAT,
            "identity": self.identity,
            "step": self.step,
            "network": {k: v.detach().clone() for k, v in self.network.state_dict().items()},  # not the EMA's,
            # which a checkpoint's LoRA file is written with while this is saved
            "average": self.average.state_dict() if self.average else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "noise_generator": self.noise_generator.get_state(),
            "batches": self.batches.state_dict(),
            "result": {"losses": result.losses, "learning_rates": result.learning_rates,
                       "validation": [list(pair) for pair in result.validation], "steps": result.steps,
                       "best_step": result.best_step, "best_loss": result.best_loss, "seconds": result.seconds},
            "smoothed": self.smoothed,
            "stale_evaluations": self.stale_evaluations,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        if self.average:
            if state.get("average") is None:
                raise TrainingError("the checkpoint was trained without ema_decay, so it has no average of the weights "
                                    "to continue: resume with ema_decay 0, or start a new run")
            self.average.load_state_dict(state["average"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.noise_generator.set_state(state["noise_generator"])
        self.batches.load_state_dict(state["batches"])
        for name, value in state["result"].items():
            setattr(self.result, name, value)
        self.result.validation = [(int(step), float(loss)) for step, loss in self.result.validation]
        self.smoothed, self.stale_evaluations = state["smoothed"], state["stale_evaluations"]
        self.best_weights = state["best_weights"]

