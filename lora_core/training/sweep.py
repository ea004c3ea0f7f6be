"""Sweeps: one run per value of the learning rate, the rank (with its alpha) or the steps, one after another on the
dataset encoded once (latents and text-encoder outputs shared), each with its own validation loss and early stopping.
A variant trains exactly as the same run alone would; the best is the one whose weights have the lowest validation
loss.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..data.dataset import ImageFolderDataset
from ..network import LoRANetwork
from ..network_config import NetworkConfig
from ..settings import Setting, Widget
from .checkpoints import Checkpointer
from .config import TrainingConfig, TrainingError
from .loop import TrainingDiverged, encode, train
from .state import TrainingResult
from .validation import HELD_OUT_FACTOR, validation_images

SWEEP_SETTINGS = (
    Setting("sweep_learning_rate", str, "", "Learning rates to train a variant with each, comma-separated "
            "(1e-4, 3e-4, 1e-3). Empty: learning_rate alone.", widget=Widget()),
    Setting("sweep_rank", str, "", "Ranks to train a variant with each, comma-separated, each with its alpha as "
            "rank/alpha if wanted (8/4, 16/8, 32/16); a bare rank keeps alpha as set. Empty: rank alone.",
            widget=Widget()),
    Setting("sweep_steps", str, "", "Step counts to train a variant with each, comma-separated (500, 1000, 2000); "
            "each is a run of its own, with its own schedule. Empty: steps alone.", widget=Widget()),
)


@dataclass(frozen=True)
class Variant:
    """One run of a sweep: the values it sets (None: as the run's settings have it)."""

    learning_rate: float | None = None
    rank: int | None = None
    alpha: float | None = None
    steps: int | None = None

    @property
    def label(self) -> str:
        """`learning_rate 0.0003, rank 16/8`: what sets this variant apart."""
        parts = [f"learning_rate {self.learning_rate:.6g}" if self.learning_rate is not None else "",
                 f"rank {self.rank}" + (f"/{self.alpha:g}" if self.alpha is not None else "") if self.rank else "",
                 f"steps {self.steps}" if self.steps is not None else ""]
        return ", ".join(part for part in parts if part) or "as set"

    @property
    def slug(self) -> str:
        """The label as a file-name part: `learning_rate_0.0003_rank_16-8`."""
        return "".join(c if c.isalnum() or c in "-." else "_" for c in self.label.replace(", ", "_").replace("/", "-"))

    def adapters(self, adapters: NetworkConfig) -> NetworkConfig:
        """The network settings of this variant: its rank, with its alpha or the one set."""
        if self.rank is None:
            return adapters
        return replace(adapters, rank=self.rank, alpha=adapters.alpha if self.alpha is None else self.alpha)

    def config(self, config: TrainingConfig) -> TrainingConfig:
        return replace(config, learning_rate=self.learning_rate if self.learning_rate is not None else
                       config.learning_rate, steps=self.steps if self.steps is not None else config.steps)


def parse_list(text: str, name: str, parse: Callable[[str], object]) -> list:
    values = [part.strip() for part in text.split(",") if part.strip()]
    try:
        parsed = [parse(value) for value in values]
    except ValueError:
        raise TrainingError(f"{name} = {text!r}: give numbers separated by commas, for example "
                            f"{ {'sweep_rank': '8/4, 16/8', 'sweep_steps': '500, 1000'}.get(name, '1e-4, 3e-4')}"
                            ) from None
    if len(set(parsed)) < len(parsed):
        raise TrainingError(f"{name} = {text!r} names a value twice: each value trains a variant, give it once")
    return parsed


def rank_alpha(text: str) -> tuple[int, float | None]:
    rank, _, alpha = text.partition("/")
    return int(rank), float(alpha) if alpha else None


def parse_sweep(sweep_learning_rate: str = "", sweep_rank: str = "", sweep_steps: str = "") -> list[Variant]:
    """The variants of the swept values: every combination of the lists given, in their order. Empty: none."""
    rates = parse_list(sweep_learning_rate, "sweep_learning_rate", float)
    ranks = parse_list(sweep_rank, "sweep_rank", rank_alpha)
    steps = parse_list(sweep_steps, "sweep_steps", int)
    if any(not 0 < rate < math.inf for rate in rates) or any(rank < 1 or (alpha is not None and alpha <= 0)
                                                               for rank, alpha in ranks) or any(n < 1 for n in steps):
        raise TrainingError("a sweep's learning rates, ranks, alphas and steps must be positive")
    if not (rates or ranks or steps):
        return []
    return [Variant(rate, *(rank or (None, None)), step)
            for rate, rank, step in itertools.product(rates or [None], ranks or [None], steps or [None])]


@dataclass
class VariantResult:
    variant: Variant
    network: LoRANetwork  # on the CPU, with the weights training returned (the best validation's with keep_best)
    result: TrainingResult
    kept_best: bool  # keep_best or early stopping: the weights are those of the lowest validation loss

    @property
    def validation_loss(self) -> float:
        """The validation loss of the weights the variant returned."""
        return self.result.best_loss if self.kept_best else self.result.validation[-1][1]


@dataclass
class SweepResult:
    variants: list[VariantResult]  # those that finished, in order
    diverged: list[tuple[Variant, str]] = field(default_factory=list)  # and why, left out of the best
    stop_reason: str = "completed"  # or "cancelled": the variant then training was dropped

    @property
    def best(self) -> VariantResult:
        if not self.variants:
            raise TrainingError("no variant of the sweep finished: " + "; ".join(
                f"{variant.label}: {reason}" for variant, reason in self.diverged))
        return min(self.variants, key=lambda each: each.validation_loss)


def check_sweep(variants: list[Variant], config: TrainingConfig, continues_a_lora: bool = False) -> None:
    """Refuse, before anything trains, a sweep that cannot pick its best or a variant whose settings its run would
    refuse, naming the fix."""
    if not config.validation_every:
        raise TrainingError("a sweep picks its best variant by the validation loss: set validation_every (and "
                            "validation_images) so that each variant is evaluated")
    if continues_a_lora and any(variant.rank is not None for variant in variants):
        raise TrainingError("sweep_rank: a continued LoRA keeps the rank of its file; clear sweep_rank, or start "
                            "new adapters")
    labels = [variant.label for variant in variants]
    if len(set(labels)) < len(labels):
        raise TrainingError(f"the sweep has two variants named alike ({', '.join(labels)}): give values that differ "
                            "in their first 6 digits")
    for variant in variants:
        run = variant.config(config)
        try:
            run.validate()
        except TrainingError as error:
            raise TrainingError(f"sweep variant {variant.label}: {error}") from None
        if not 0 <= run.lr_warmup_steps < run.steps:
            raise TrainingError(f"sweep variant {variant.label}: lr_warmup_steps = {run.lr_warmup_steps} must be "
                                f"below its {run.steps} steps; lower lr_warmup_steps or the shortest sweep_steps")


def validation_warning(dataset: ImageFolderDataset, config: TrainingConfig) -> str | None:
    """Why a sweep's best may be its most overfit variant, where the dataset is too small to hold images out."""
    if validation_images(dataset, config.validation_images, config.seed)[1]:
        return None
    return (f"the dataset has too few images to hold {config.validation_images} out of training (it needs "
            f"{HELD_OUT_FACTOR}× as many): the validation loss is measured on training images, so the sweep's best "
            "is the variant that fits them best, which favours overfitting; add images or lower validation_images")


def sweep(
    backend, make_network: Callable[[Variant], LoRANetwork], dataset: ImageFolderDataset, config: TrainingConfig,
    variants: list[Variant], callback: Callable[[Variant, int, object], bool | None] | None = None,
    finished: Callable[[VariantResult], None] | None = None,
    checkpointer_for: Callable[[Variant, LoRANetwork], Checkpointer | None] | None = None,
    memory_plan: Callable | None = None,
) -> SweepResult:
    """Train each variant in turn on `dataset` encoded once. `make_network(variant)` builds a variant's fresh adapters
    with the run's seed; all are built before the first step, as a run alone builds its own (they wait on the CPU).
    `callback(variant, index, report)` is each step's, and False stops the sweep, keeping the variants already
    finished; `finished` gets each one as it ends; `checkpointer_for(variant, network)` gives a variant's checkpointer
    (each needs a name of its own). A variant that diverges is recorded and the sweep goes on. A continued LoRA's
    caller checks its sweep first (`check_sweep`)."""
    check_sweep(variants, config)
    networks = [make_network(variant).to("cpu") for variant in variants]
    checkpointers = [checkpointer_for(variant, network) if checkpointer_for else None
                     for variant, network in zip(variants, networks)]
    for checkpointer in checkpointers:
        if checkpointer is not None:
            checkpointer.check_fresh()  # refused now, not after the variants before it trained
    encoded = encode(backend, networks[0], dataset, config)
    done = SweepResult([])
    for index, (variant, network, checkpointer) in enumerate(zip(variants, networks, checkpointers)):
        run = variant.config(config)
        step = None if callback is None else (
            lambda report, variant=variant, index=index: callback(variant, index, report))
        try:
            result = train(backend, network.to(backend.device), dataset, run, callback=step, memory_plan=memory_plan,
                           encoded=encoded, checkpointer=checkpointer)
        except TrainingDiverged as error:
            done.diverged.append((variant, str(error)))
            network.to("cpu")
            continue
        if result.stop_reason == "cancelled" and result.steps < run.steps:
            done.stop_reason = "cancelled"
            break
        each = VariantResult(variant, network.to("cpu"), result, run.keep_best or bool(run.early_stopping_patience))
        done.variants.append(each)
        if finished is not None:
            finished(each)
        if result.stop_reason == "cancelled":  # at its last step: this variant is whole, the next ones are not
            done.stop_reason = "cancelled"
            break
    return done
