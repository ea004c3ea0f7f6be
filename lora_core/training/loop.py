"""The training loop: a reader follows one optimizer step from batch to noise, prediction, loss and update.

The pieces it runs live beside it: the objective (`objectives.py`), the encoded dataset (`encoded.py`), the
validation loss (`validation.py`), the precision policy (`precision.py`) and the run's state (`state.py`).
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backend import Conditioning, TrainingBackend
from ..data.dataset import Batch, ImageFolderDataset
from ..errors import LoRALabError
from ..network import LoRANetwork
from ..targets import TEXT_ENCODER_PREFIX
from . import cpu_convolution
from .checkpoints import Checkpointer
from .config import TrainingConfig, TrainingError
from .distributed import Distributed
from .ema import WeightAverage
from .encoded import EncodedDataset
from .memory_plan import MemoryPlan, plan_memory
from .objectives import Objective
from .optim import make_optimizer, make_scheduler
from .precision import Precision
from .state import TrainerState, TrainingResult, check_resumable, run_identity
from .validation import ValidationSet, validation_images

__all__ = ["StepReport", "TrainingConfig", "TrainingDiverged", "TrainingError", "TrainingResult", "train"]


class TrainingDiverged(LoRALabError, RuntimeError):
    """The loss or the gradients became NaN/inf. The network keeps the weights of the last good step."""

    def __init__(self, message: str, result: TrainingResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class StepReport:
    """What the progress callback gets after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    smoothed_loss: float
    learning_rate: float
    elapsed: float
    validation_loss: float | None = None  # on the steps where it was evaluated
    samples: list | None = None  # images (clips: lists of frames) generated after this step, if a sample step
    checkpoint: Path | None = None  # the LoRA file saved after this step, if any


ProgressCallback = Callable[[StepReport], bool | None]


@contextmanager
def frozen(modules: list[nn.Module]) -> Iterator[None]:
    """Base parameters get no gradients inside the block; their `requires_grad` flags are restored after it.

    (Inference tensors are left alone: autograd cannot use them, and their flag cannot be set back to True.)
    """
    parameters = [p for module in modules for p in module.parameters() if not p.is_inference()]
    flags = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


@contextmanager
def tuned_convolutions(enabled: bool) -> Iterator[None]:
    """cuDNN benchmark mode inside the block: a training run repeats a few input shapes thousands of times, so
    timing the convolution algorithms once pays off. The global setting is restored afterwards."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextmanager
def attention_without_cudnn() -> Iterator[None]:
    """PyTorch's scaled-dot-product attention without its cuDNN kernels inside the block (flash, memory-efficient
    and math kernels stay): on an H200 with torch 2.11 (CUDA 13), cuDNN's attention backward failed on Flux.1's
    4608-token attention at 1024 px ("mha_graph.execute(...) is_good()", then an illegal memory access), in
    diffusers' + PEFT's loop as in ours, and trained with it off (bench/results/h200_flux_block_cudnn_off.json).
    The global setting is restored afterwards."""
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


@contextmanager
def checkpointed(blocks: list[nn.Module], offload_to: torch.device | None = None) -> Iterator[None]:
    """Gradient checkpointing: inside the block each of `blocks` keeps only its inputs for backward and recomputes
    the rest, trading compute for activation memory; with `offload_to` (host memory) those inputs are kept there
    instead of on the device (`offloaded`). Their forwards are restored after it."""
    previous = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = (functools.partial(checkpoint, block.forward, use_reentrant=False) if offload_to is None
                         else offloaded(block.forward, offload_to))
    try:
        yield
    finally:
        for block, forward in zip(blocks, previous):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def offloaded(forward: Callable, host: torch.device) -> Callable:
    """`forward` checkpointed with the inputs that carry gradients (the activations flowing through the blocks) kept
    in `host` memory for the recompute, copied back to their device for it (kohya's cpu_offload_checkpointing). The
    forward itself reads the device tensors, and nothing holds them once the next block has read them, so the device
    keeps one block's activations instead of every block's input. Inputs without gradients (times, rotary
    embeddings, masks) stay where they are: the caller holds them anyway."""

    def run(*args, **kwargs):
        values = [*args, *kwargs.values()]
        devices = {index: value.device for index, value in enumerate(values)
                   if isinstance(value, torch.Tensor) and value.requires_grad}
        kept = [value.detach().to(host, non_blocking=True, copy=True).requires_grad_() if index in devices else value
                for index, value in enumerate(values)]
        first_call = [values]  # the forward's own inputs; the recompute copies the kept ones back
        positional, names = len(args), tuple(kwargs)  # not the tensors: the closure must not hold them

        def on_device(*kept):
            inputs = first_call.pop() if first_call else [
                value.to(devices[index], non_blocking=True) if index in devices else value
                for index, value in enumerate(kept)]
            return forward(*inputs[:positional], **dict(zip(names, inputs[positional:])))

        return checkpoint(on_device, *kept, use_reentrant=False)

    return run


def diffusion_loss(backend: TrainingBackend, objective: Objective, latents: torch.Tensor, conditioning: Conditioning,
                   generator: torch.Generator, rank: int = 0, world_size: int = 1,
                   weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The objective's mean loss on `latents` with noise and times drawn from `generator`, each sample's loss
    multiplied by its entry of `weights` first if given (kohya's prior-loss weighting of class images), each latent
    value's error by `mask` where given (the loss masks, `EncodedDataset.batch_masks`).

    With data-parallel ranks, `latents` are rank `rank`'s share of a global batch `world_size` times as large: noise
    and timesteps are drawn for the whole global batch, as one process would, and this rank's share kept.
    """
    size = latents.shape[0]
    noise, times = objective.draw((size * world_size, *latents.shape[1:]), generator,
                                  slice(rank * size, (rank + 1) * size))
    predict = functools.partial(backend.predict, conditioning=conditioning)
    losses = objective.loss(predict, latents, noise, times, mask)
    return (losses if weights is None else losses * weights.to(losses.device)).mean()


class BatchLoss(nn.Module):
    """The training loss of a batch, as a module that holds the network: what DistributedDataParallel wraps.

    The adapters reach the model through hooks on its layers, so the network itself is never called; calling this
    module is what lets DDP see exactly the adapter parameters and average their gradients over the ranks.
    """

    def __init__(self, network: LoRANetwork, backend: TrainingBackend, encoded: EncodedDataset,
                 objective: Objective, generator: torch.Generator, distributed: Distributed,
                 prior_loss_weight: float = 1.0) -> None:
        super().__init__()
        self.network = network
        self.backend, self.encoded, self.objective = backend, encoded, objective
        self.generator, self.distributed, self.prior_loss_weight = generator, distributed, prior_loss_weight

    def forward(self, batch: Batch) -> torch.Tensor:
        weights = torch.tensor([self.prior_loss_weight if regularization else 1.0
                                for regularization in batch.regularization]) if any(batch.regularization) else None
        return diffusion_loss(self.backend, self.objective, self.encoded.batch_latents(batch),
                              self.encoded.batch_conditioning(batch), self.generator, self.distributed.rank,
                              self.distributed.world_size, weights, self.encoded.batch_masks(batch))


def parameter_groups(network: LoRANetwork, config: TrainingConfig) -> list[dict]:
    """The UNet adapters at the learning rate, the text-encoder adapters at theirs."""
    groups: dict[bool, list[nn.Parameter]] = {False: [], True: []}
    for name, adapter in network.items():
        groups[name.startswith(TEXT_ENCODER_PREFIX)] += [p for p in adapter.parameters() if p.requires_grad]
    return [{"params": params, "lr": config.text_learning_rate if is_text else config.learning_rate}
            for is_text, params in groups.items() if params]


def train(
    backend: TrainingBackend,
    network: LoRANetwork,
    dataset: ImageFolderDataset,
    config: TrainingConfig,
    callback: ProgressCallback | None = None,
    checkpointer: Checkpointer | None = None,
    resume_state: dict | None = None,
    distributed: Distributed | None = None,
    memory_plan: Callable[[MemoryPlan], None] | None = None,
    encoded: EncodedDataset | None = None,
) -> TrainingResult:
    """Train `network` on `dataset` through `backend`; the callback may return False to stop after any step.

    The base models are frozen and the network attached only for the run: afterwards both are as they were,
    with the network's new weights (those of the lowest validation loss with `keep_best` or early stopping).
    `checkpointer` saves checkpoints; `resume_state` (from `checkpoints.load_state`) continues a run where its
    checkpoint left it. `memory_plan` is called with the run's memory plan once the dataset is encoded, before the
    first step; on a CUDA device a run the plan says will not fit is refused then, naming what would make it fit.
    `encoded` is the dataset already encoded for this backend, seed and caching (a sweep's variants share it).

    `distributed` (from `Distributed.from_environment()`) trains data-parallel: every rank runs this with the same
    settings on its share of each global batch of `batch_size × world_size × gradient_accumulation`, DDP averages
    the gradients, the losses reported are the means over the ranks, and only rank 0 writes checkpoints.
    """
    distributed = distributed or Distributed()  # one process
    config.validate()
    if config.prior_loss_weight != 1 and not dataset.num_regularization_images:
        raise TrainingError(f"prior_loss_weight = {config.prior_loss_weight} weighs regularization images, and the "
                            "dataset has none: add a regularization folder or leave it at 1")
    frames = max(example.frames for example in dataset.examples)
    if frames > 1:
        backend.check_clip_frames(frames)
    counts = sorted({len(example.references) for example in dataset.examples})
    if len(counts) > 1 and config.batch_size > 1:
        raise TrainingError(f"the dataset's images have {' or '.join(map(str, counts))} reference images, and one "
                            "batch stacks images with the same number: set batch_size 1, or give every image as many")
    references = counts[-1] if counts else 0
    if references > backend.reference_images:
        raise TrainingError(
            f"the dataset's images have up to {references} reference images (control_images), and {backend.family} "
            f"takes {backend.reference_images or 'none'}: " + (
                "train an edit model on edit pairs (Flux.1 Kontext, Qwen-Image-Edit), or turn control_images off"
                if not backend.reference_images else f"give each image at most {backend.reference_images}"))
    backend.sample_frames = frames  # samples of a clip dataset are clips
    if config.cpu_offload_checkpointing and (problem := backend.cpu_offload_problem()):
        raise TrainingError(f"cpu_offload_checkpointing: {problem}")
    if config.blocks_to_swap:  # refused now, before the dataset is encoded
        backend.check_block_swap(config.blocks_to_swap, config.gradient_checkpointing, network.algorithm)
    objective = backend.objective(config)
    precision = Precision.for_run(config.mixed_precision, backend.compute_dtype(), backend.device)
    groups = parameter_groups(network, config)
    parameters = [parameter for group in groups for parameter in group["params"]]
    if any(parameter.is_inference() for parameter in parameters):
        raise TrainingError("the network was created under torch.inference_mode(); create it outside (for example "
                            "inside `with torch.inference_mode(False):`) so that its parameters can be trained")
    optimizer = make_optimizer(config.optimizer, groups, config.learning_rate, **config.optimizer_options)
    held_images, held_out = (validation_images(dataset, config.validation_images, config.seed)
                             if config.validation_every else ([], False))
    batches = dataset.batches(config.batch_size, torch.Generator().manual_seed(config.seed + 1), distributed.rank,
                              distributed.world_size, exclude=held_images if held_out else ())
    average = WeightAverage(network, config.ema_decay, config.ema_start_step) if config.ema_decay else None
    state = TrainerState(run_identity(config, dataset, distributed.world_size), network, optimizer, precision.scaler(),
                         torch.Generator().manual_seed(config.seed), batches, average)
    if resume_state is not None:
        check_resumable(resume_state, state.identity, config.steps)
        state.load_state_dict(resume_state)
    elif checkpointer is not None:
        checkpointer.check_fresh()
    scheduler = make_scheduler(config.lr_scheduler, optimizer, config.steps, config.lr_warmup_steps,
                               config.lr_scheduler_cycles, config.lr_scheduler_power, position=state.step)
    result, scaler = state.result, state.scaler
    result.validation_held_out, result.precision = held_out, precision.describe()
    keep_best = config.keep_best or bool(config.early_stopping_patience)
    started = time.perf_counter() - result.seconds

    with torch.inference_mode(False), frozen(backend.frozen_modules()):
        encoded = encode(backend, network, dataset, config) if encoded is None else encoded
        validation = ValidationSet.build(dataset, held_images, held_out, objective, encoded, config.seed,
                                         config.validation_timesteps, config.batch_size) if held_images else None
        batch_loss = distributed.wrap(  # in DistributedDataParallel where there are several ranks
            BatchLoss(network, backend, encoded, objective, state.noise_generator, distributed,
                      config.prior_loss_weight))

    # the text encoders and VAE off a GPU while the denoiser trains, where their outputs are cached
    parked = backend.parkable_modules() if backend.device.type == "cuda" and encoded.text_cache else []

    averaged = average.applied if average else nullcontext  # the network as validation, samples and files see it

    def validation_loss() -> float:
        network.eval()
        try:
            with precision.autocast(), averaged():
                return validation.loss(objective, encoded, backend.predict)
        finally:
            network.train()

    with (torch.inference_mode(False), torch.enable_grad(), frozen(backend.frozen_modules()),
          moved(parked, torch.device("cpu")), backend.training(network.has_text_encoder), network.applied(1.0),
          checkpointed(backend.checkpoint_blocks() if config.gradient_checkpointing else [],
                       torch.device("cpu") if config.cpu_offload_checkpointing else None),
          tuned_convolutions(backend.device.type == "cuda"), attention_without_cudnn(),
          cpu_convolution.kernels_by_size(backend.frozen_modules(), config.cpu_conv_kernels == "by_size"),
          ExitStack() as swap):
        swapped = config.blocks_to_swap or 0  # None: auto, decided from the plan on a GPU
        plan = plan_memory(backend.frozen_modules(), backend.checkpoint_blocks(), network, backend.device,
                           encoded.largest_latent_values(), encoded.longest_text(), config.batch_size,
                           (precision.autocast_dtype or precision.base_dtype).itemsize, config.gradient_checkpointing,
                           config.optimizer, backend.saved_activations(), swapped, backend.unet_activations(),
                           config.cpu_offload_checkpointing, average is not None)
        available = None
        if backend.device.type == "cuda":
            # what PyTorch already holds here, weights and cached blocks, is this run's too
            available = torch.cuda.mem_get_info(backend.device)[0] + torch.cuda.memory_reserved(backend.device)
            if config.blocks_to_swap is None and (swapped := plan.fewest_swapped(available) or 0):
                plan = plan.with_swap(swapped)
        plan = replace(plan, auto_swap=config.blocks_to_swap is None)
        result.memory_plan = plan.describe()
        if memory_plan is not None:
            memory_plan(plan)
        if available is not None and (refusal := plan.refusal(available)):
            raise TrainingError(refusal)
        if swapped and config.blocks_to_swap is None:  # auto's count, checked as a given one is at the start
            backend.check_block_swap(swapped, config.gradient_checkpointing, network.algorithm)
        swap.enter_context(backend.block_swap(swapped, config.gradient_checkpointing))
        network.train()
        if validation and not result.validation:  # the untrained network's loss: what learning must beat
            state.record_validation(validation_loss(), keep_best)
        while state.step < config.steps:
            step = state.step + 1
            learning_rate = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro_step in range(1, config.gradient_accumulation + 1):
                batch = next(batches)
                with distributed.syncing(batch_loss, sync=micro_step == config.gradient_accumulation):
                    with precision.autocast():
                        loss = batch_loss(batch)
                    loss_value = distributed.mean(loss.item())  # over all ranks' shares: the loss of the global batch
                    if not math.isfinite(loss_value):
                        raise diverged(result, step, "loss", started)
                    scaled = loss / config.gradient_accumulation
                    (scaler.scale(scaled) if scaler else scaled).backward()
                step_loss += loss_value / config.gradient_accumulation
            if scaler:
                scaler.unscale_(optimizer)  # clip the true gradients; a step with inf ones is skipped by the scaler
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm or math.inf)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            elif not torch.isfinite(grad_norm):
                raise diverged(result, step, "gradient", started)
            else:
                optimizer.step()
            scheduler.step()
            if average:
                average.update(step)

            smoothed = state.record_step(step_loss, learning_rate, config.loss_smoothing)
            report = StepReport(step, config.steps, step_loss, smoothed, learning_rate, time.perf_counter() - started)
            if validation and (step % config.validation_every == 0 or step == config.steps):
                report.validation_loss = validation_loss()
                state.record_validation(report.validation_loss, keep_best)
            if config.sample_every and step % config.sample_every == 0:
                with moved(parked, backend.device), averaged():
                    report.samples = sample(backend, network, config)
                result.samples.append((step, report.samples))
            if checkpointer is not None and checkpointer.due(step) and distributed.is_main:
                result.seconds = time.perf_counter() - started
                with distributed.shielded():  # finished even if the launcher stops this rank meanwhile
                    saved_state = state.state_dict()
                    with averaged():
                        report.checkpoint = checkpointer.save(network, step, saved_state)
            if distributed.any(callback is not None and callback(report) is False):
                result.stop_reason = "cancelled"
                break
            if (config.early_stopping_patience and state.stale_evaluations >= config.early_stopping_patience
                    and step >= config.early_stopping_min_steps):
                result.stop_reason = "early_stopping"
                break
        network.eval()
    if state.best_weights is not None:
        network.load_state_dict(state.best_weights)
    elif average:
        average.load_into_network()
    result.seconds = time.perf_counter() - started
    return result


def encode(backend: TrainingBackend, network: LoRANetwork, dataset: ImageFolderDataset, config: TrainingConfig
           ) -> EncodedDataset:
    """The dataset's latents, and its captions' text-encoder outputs where the text encoder is frozen and the captions
    fixed, as a run with `config` encodes them before its first step."""
    with torch.inference_mode(False), frozen(backend.frozen_modules()):
        return EncodedDataset(backend, dataset, config.seed, not (network.has_text_encoder or
                              dataset.config.augments_captions), config.latent_cache_dir)


@contextmanager
def moved(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """`modules` on `device` inside the block, back where each was afterwards."""
    places = [next(module.parameters()).device for module in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, place in zip(modules, places):
            module.to(place)


@torch.no_grad()
def sample(backend: TrainingBackend, network: LoRANetwork, config: TrainingConfig) -> list:
    """Images for the sample prompts with the network as it is now, from a fixed seed: on PyTorch's own convolution
    kernels, so that they equal what generating with the saved LoRA gives later, bit for bit."""
    network.eval()
    try:
        with cpu_convolution.pytorch_kernels(backend.frozen_modules()):
            return backend.sample_images(list(config.sample_prompts), config.sample_seed, config.sample_steps)
    finally:
        network.train()


def diverged(result: TrainingResult, step: int, what: str, started: float) -> TrainingDiverged:
    result.stop_reason = "diverged"
    result.seconds = time.perf_counter() - started
    return TrainingDiverged(
        f"the {what} became NaN or infinite at step {step}; training stopped and the network keeps the weights "
        f"of step {step - 1}. Lower the learning rate (or raise max_grad_norm clipping), or train in fp32/bf16 "
        "instead of fp16",
        result,
    )
