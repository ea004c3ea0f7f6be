"""The training loop: a reader follows one optimizer step from batch to noise, prediction, loss and update."""
from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_tensors
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backend import PREDICTION_TYPES, TrainingBackend
from .checkpoints import Checkpointer
from .dataset import Batch, ImageFolderDataset
from .distributed import Distributed
from .files import save_file, tensor_bytes
from .network import LoRANetwork
from .optim import make_optimizer, make_scheduler
from .targets import TEXT_ENCODER_PREFIX


AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(ValueError):
    """A training setting out of its allowed range; the message names it and the range."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf. The network keeps the weights of the last good step."""

    def __init__(self, message: str, result: TrainingResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class TrainingConfig:
    """Defaults follow common advice for SD1.x concept LoRAs: lr 1e-4, 1000 steps, batch 1 × accumulation 4."""

    steps: int = 1000
    learning_rate: float = 1e-4
    batch_size: int = 1
    gradient_accumulation: int = 4
    optimizer: str = "AdamW"
    optimizer_options: dict = field(default_factory=dict)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    early_stopping_patience: int = 0
    loss_smoothing: float = 0.9
    text_encoder_lr: float | None = None  # None: the learning rate
    mixed_precision: str = "no"  # "bf16" or "fp16": autocast; adapters stay fp32, fp16 adds a grad scaler
    gradient_checkpointing: bool = False
    sample_every: int = 0  # steps between sample images (0: none)
    sample_prompts: tuple[str, ...] = ("a photo of sks",)
    sample_seed: int = 0
    sample_steps: int = 20
    latent_cache_dir: str | None = None  # latents kept on disk between runs, keyed by image, VAE and seed

    def validate(self) -> None:
        checks = [
            ("steps", self.steps >= 1, "a whole number ≥ 1"),
            ("learning_rate", 0 < self.learning_rate < 1, "between 0 and 1 (typically 1e-4)"),
            ("batch_size", self.batch_size >= 1, "a whole number ≥ 1"),
            ("gradient_accumulation", self.gradient_accumulation >= 1, "a whole number ≥ 1"),
            ("min_snr_gamma", self.min_snr_gamma >= 0, "0 (off) or more (5 is usual)"),
            ("noise_offset", 0 <= self.noise_offset <= 1, "from 0 (off) to 1 (0.05–0.1 is usual)"),
            ("max_grad_norm", self.max_grad_norm >= 0, "0 (no clipping) or more"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, "0 (off) or a number of steps"),
            ("loss_smoothing", 0 <= self.loss_smoothing < 1, "from 0 to below 1"),
            ("text_encoder_lr", self.text_encoder_lr is None or 0 <= self.text_encoder_lr < 1, "None or from 0 to 1"),
            ("mixed_precision", self.mixed_precision in AUTOCAST_DTYPES, f"one of {sorted(AUTOCAST_DTYPES)}"),
            ("sample_every", self.sample_every >= 0, "0 (off) or a number of steps"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise TrainingError(f"{name} = {getattr(self, name)!r} is out of range: use {allowed}")

    def metadata(self) -> dict[str, object]:
        """kohya's `ss_*` names for these settings (without the prefix)."""
        return {
            "learning_rate": self.learning_rate,
            "unet_lr": self.learning_rate,
            "text_encoder_lr": self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr,
            "mixed_precision": self.mixed_precision,
            "gradient_checkpointing": self.gradient_checkpointing,
            "max_train_steps": self.steps,
            "batch_size_per_device": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation,
            "optimizer": f"torch.optim.{self.optimizer}" if hasattr(torch.optim, self.optimizer) else self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "lr_warmup_steps": self.lr_warmup_steps,
            "min_snr_gamma": self.min_snr_gamma or None,
            "noise_offset": self.noise_offset or None,
            "max_grad_norm": self.max_grad_norm,
            "seed": self.seed,
        }


@dataclass
class StepReport:
    """What the progress callback gets after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    smoothed_loss: float
    learning_rate: float
    elapsed: float
    samples: list | None = None  # images generated after this step, if it was a sample step
    checkpoint: Path | None = None  # the LoRA file saved after this step, if any


@dataclass
class TrainingResult:
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    steps: int = 0
    best_step: int = 0
    best_loss: float = math.inf
    stop_reason: str = "completed"
    seconds: float = 0.0
    samples: list[tuple[int, list]] = field(default_factory=list)  # (step, images)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "samples"}, "seconds_per_step": self.seconds_per_step}


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
def checkpointed(blocks: list[nn.Module]) -> Iterator[None]:
    """Gradient checkpointing: inside the block each of `blocks` keeps only its inputs for backward and recomputes
    the rest, trading compute for activation memory; their forwards are restored after it."""
    previous = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block, forward in zip(blocks, previous):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def noised_and_target(
    latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = √ᾱ·x0 + √(1−ᾱ)·ε and the target: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0 (DDPM's `add_noise`, `get_velocity`)."""
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    if prediction_type == "epsilon":
        return noisy, noise
    return noisy, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


class EncodedDataset:
    """Latents of every (image, flip) and the conditioning of every caption, encoded once before the first step.

    Later epochs never run the VAE, nor the text encoder while it is frozen (kohya's `cache_latents`). Each image's
    VAE sample is drawn from a generator seeded by the run's seed and the image's pixels, so a latent is the same
    whatever the order, and with `cache_dir` it is read back from disk by later runs instead of encoded again.
    """

    def __init__(
        self, backend: TrainingBackend, dataset: ImageFolderDataset, seed: int, cache_text: bool,
        cache_dir: str | None = None,
    ) -> None:
        flips = (False, True) if dataset.config.flip else (False,)
        vae = backend.vae_fingerprint() if cache_dir else ""
        with torch.no_grad():
            self.latents = {
                (image, flip): self.encode(backend, dataset.image_pixels(image, flip), seed, vae, cache_dir)
                for image in range(dataset.num_images)
                for flip in flips
            }
            captions = sorted({example.caption for example in dataset.examples}) if cache_text else []
            self.conditioning = {caption: backend.encode_text([caption]) for caption in captions}

    @staticmethod
    def encode(backend: TrainingBackend, pixels: torch.Tensor, seed: int, vae: str, cache_dir: str | None) -> torch.Tensor:
        image_key = hashlib.sha256(f"{seed}:{tuple(pixels.shape)}".encode() + tensor_bytes(pixels)).hexdigest()
        cached = None
        if cache_dir:
            cached = Path(cache_dir) / f"{hashlib.sha256(f'{image_key}:{vae}'.encode()).hexdigest()}.safetensors"
            if cached.is_file():
                return load_tensors(cached)["latent"].to(backend.device)
        generator = torch.Generator().manual_seed(int(image_key[:15], 16))
        latent = backend.encode_images(pixels[None].to(backend.device), generator)[0].float()
        if cached is not None:
            save_file(cached, {"latent": latent}, {"lora_lab": "cached latent"}, overwrite=True)
        return latent

    def batch_latents(self, batch: Batch) -> torch.Tensor:
        return torch.stack([self.latents[key] for key in zip(batch.images, batch.flipped)])

    def batch_conditioning(self, batch: Batch, backend: TrainingBackend) -> Any:
        if self.conditioning:
            return torch.cat([self.conditioning[caption] for caption in batch.captions])
        return backend.encode_text(batch.captions)


def diffusion_loss(
    backend: TrainingBackend,
    latents: torch.Tensor,
    conditioning: Any,
    alphas_cumprod: torch.Tensor,
    config: TrainingConfig,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """MSE between the denoiser's prediction and the ε (or v) target of the model's own schedule.

    With data-parallel ranks, `latents` are rank `rank`'s share of a global batch `world_size` times as large:
    noise and timesteps are drawn for the whole global batch, as one process would, and this rank's share kept.
    """
    size = latents.shape[0]
    every, mine = size * world_size, slice(rank * size, (rank + 1) * size)  # the global batch, this rank's share
    noise = torch.randn((every, *latents.shape[1:]), generator=generator)[mine].to(latents.device)
    if config.noise_offset:
        offset = torch.randn((every, latents.shape[1], 1, 1), generator=generator)[mine]
        noise += config.noise_offset * offset.to(latents.device)
    timesteps = torch.randint(0, len(alphas_cumprod), (every,), generator=generator)[mine].to(latents.device)
    alpha_bar = alphas_cumprod[timesteps]
    noisy_latents, target = noised_and_target(latents, noise, alpha_bar.reshape(-1, 1, 1, 1), backend.prediction_type)

    prediction = backend.predict(noisy_latents, timesteps, conditioning)
    loss = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if config.min_snr_gamma:
        loss = loss * min_snr_weight(alpha_bar, config.min_snr_gamma, backend.prediction_type)
    return loss.mean()


class BatchLoss(nn.Module):
    """The training loss of a batch, as a module that holds the network: what DistributedDataParallel wraps.

    The adapters reach the model through hooks on its layers, so the network itself is never called; calling this
    module is what lets DDP see exactly the adapter parameters and average their gradients over the ranks.
    """

    def __init__(self, network: LoRANetwork, backend: TrainingBackend, encoded: EncodedDataset,
                 alphas_cumprod: torch.Tensor, config: TrainingConfig, generator: torch.Generator,
                 distributed: Distributed) -> None:
        super().__init__()
        self.network = network
        self.backend, self.encoded, self.alphas_cumprod = backend, encoded, alphas_cumprod
        self.config, self.generator, self.distributed = config, generator, distributed

    def forward(self, batch: Batch) -> torch.Tensor:
        return diffusion_loss(
            self.backend, self.encoded.batch_latents(batch), self.encoded.batch_conditioning(batch, self.backend),
            self.alphas_cumprod, self.config, self.generator, self.distributed.rank, self.distributed.world_size,
        )


def parameter_groups(network: LoRANetwork, config: TrainingConfig) -> list[dict]:
    """The UNet adapters at the learning rate, the text-encoder adapters at theirs."""
    text_lr = config.learning_rate if config.text_encoder_lr is None else config.text_encoder_lr
    groups: dict[bool, list[nn.Parameter]] = {False: [], True: []}
    for name, adapter in network.items():
        groups[name.startswith(TEXT_ENCODER_PREFIX)] += [p for p in adapter.parameters() if p.requires_grad]
    return [{"params": params, "lr": text_lr if is_text else config.learning_rate}
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
) -> TrainingResult:
    """Train `network` on `dataset` through `backend`; the callback may return False to stop after any step.

    The base models are frozen and the network attached only for the run: afterwards both are as they were,
    with the network's new weights (the best ones if early stopping is on). `checkpointer` saves checkpoints;
    `resume_state` (from `checkpoints.load_state`) continues a run where its checkpoint left it.

    `distributed` (from `Distributed.from_environment()`) trains data-parallel: every rank runs this with the same
    settings on its share of each global batch of `batch_size × world_size × gradient_accumulation`, DDP averages
    the gradients, the losses reported are the means over the ranks, and only rank 0 writes checkpoints.
    """
    distributed = distributed or Distributed()  # one process
    config.validate()
    if backend.prediction_type not in PREDICTION_TYPES:
        raise TrainingError(f"prediction type {backend.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    groups = parameter_groups(network, config)
    parameters = [parameter for group in groups for parameter in group["params"]]
    if any(parameter.is_inference() for parameter in parameters):
        raise TrainingError("the network was created under torch.inference_mode(); create it outside (for example "
                            "inside `with torch.inference_mode(False):`) so that its parameters can be trained")
    optimizer = make_optimizer(config.optimizer, groups, config.learning_rate, **config.optimizer_options)
    scheduler = make_scheduler(config.lr_scheduler, optimizer, config.steps, config.lr_warmup_steps)
    autocast_dtype = AUTOCAST_DTYPES[config.mixed_precision]
    scaler = torch.amp.GradScaler(backend.device.type) if autocast_dtype == torch.float16 else None
    alphas_cumprod = backend.alphas_cumprod().to(backend.device, torch.float32)
    noise_generator = torch.Generator().manual_seed(config.seed)
    batches = dataset.batches(config.batch_size, torch.Generator().manual_seed(config.seed + 1),
                              distributed.rank, distributed.world_size)
    result = TrainingResult()
    progress = {"smoothed": 0.0, "steps_without_improvement": 0, "best_weights": None}
    first_step = 1
    if checkpointer is not None and resume_state is None:
        checkpointer.check_fresh()
    if resume_state is not None:
        first_step = resume(resume_state, config, network, optimizer, scheduler, scaler, noise_generator, batches,
                            result, progress, distributed.world_size)
    started = time.perf_counter() - result.seconds

    with torch.inference_mode(False), frozen(backend.frozen_modules()):
        encoded = EncodedDataset(backend, dataset, config.seed, not (network.has_text_encoder or
                                 dataset.config.augments_captions), config.latent_cache_dir)
        batch_loss = distributed.wrap(  # in DistributedDataParallel where there are several ranks
            BatchLoss(network, backend, encoded, alphas_cumprod, config, noise_generator, distributed))

    with (torch.inference_mode(False), torch.enable_grad(), frozen(backend.frozen_modules()), network.applied(1.0),
          checkpointed(backend.checkpoint_blocks() if config.gradient_checkpointing else []),
          tuned_convolutions(backend.device.type == "cuda")):
        network.train()
        for step in range(first_step, config.steps + 1):
            learning_rate = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro_step in range(1, config.gradient_accumulation + 1):
                batch = next(batches)
                with distributed.syncing(batch_loss, sync=micro_step == config.gradient_accumulation):
                    with torch.autocast(backend.device.type, autocast_dtype, enabled=autocast_dtype is not None):
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

            result.steps = step
            result.losses.append(step_loss)
            result.learning_rates.append(learning_rate)
            debiased = track_best(result, progress, network, config, step, step_loss)
            report = StepReport(step, config.steps, step_loss, debiased, learning_rate, time.perf_counter() - started)
            if config.sample_every and step % config.sample_every == 0:
                report.samples = sample(backend, network, config)
                result.samples.append((step, report.samples))
            if checkpointer is not None and checkpointer.due(step) and distributed.is_main:
                result.seconds = time.perf_counter() - started
                state = training_state(step, config, network, optimizer, scheduler, scaler, noise_generator, batches,
                                       result, progress, distributed.world_size)
                with distributed.shielded():  # finished even if the launcher stops this rank meanwhile
                    report.checkpoint = checkpointer.save(network, step, state)
            if distributed.any(callback is not None and callback(report) is False):
                result.stop_reason = "cancelled"
                break
            if config.early_stopping_patience and progress["steps_without_improvement"] >= config.early_stopping_patience:
                result.stop_reason = "early_stopping"
                break
        network.eval()
    if progress["best_weights"] is not None:
        network.load_state_dict(progress["best_weights"])
    result.seconds = time.perf_counter() - started
    return result


def track_best(result: TrainingResult, progress: dict, network: LoRANetwork, config: TrainingConfig, step: int,
               step_loss: float) -> float:
    """Update the smoothed loss, the best step and (with early stopping) the best weights; the smoothed loss."""
    progress["smoothed"] = config.loss_smoothing * progress["smoothed"] + (1 - config.loss_smoothing) * step_loss
    debiased = progress["smoothed"] / (1 - config.loss_smoothing**step)
    if debiased < result.best_loss:
        result.best_loss, result.best_step, progress["steps_without_improvement"] = debiased, step, 0
        if config.early_stopping_patience:
            progress["best_weights"] = {k: v.detach().clone() for k, v in network.state_dict().items()}
    elif step > config.lr_warmup_steps:
        progress["steps_without_improvement"] += 1
    return debiased


@torch.no_grad()
def sample(backend: TrainingBackend, network: LoRANetwork, config: TrainingConfig) -> list:
    """Images for the sample prompts with the network as it is now, from a fixed seed."""
    network.eval()
    try:
        return backend.sample_images(list(config.sample_prompts), config.sample_seed, config.sample_steps)
    finally:
        network.train()


RESUMABLE_SETTINGS = ("learning_rate", "batch_size", "gradient_accumulation", "optimizer", "lr_scheduler",
                      "lr_warmup_steps", "seed", "text_encoder_lr", "mixed_precision")


def training_state(step, config, network, optimizer, scheduler, scaler, noise_generator, batches, result,
                   progress, world_size: int = 1) -> dict:
    """Everything a resumed run needs to continue exactly as this one would."""
    return {
        "step": step,
        "world_size": world_size,
        "config": {name: getattr(config, name) for name in RESUMABLE_SETTINGS},
        "network": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "noise_generator": noise_generator.get_state(),
        "batches": batches.state_dict(),
        "result": {"losses": result.losses, "learning_rates": result.learning_rates, "best_step": result.best_step,
                   "best_loss": result.best_loss, "seconds": result.seconds},
        "progress": progress,
    }


def resume(state, config, network, optimizer, scheduler, scaler, noise_generator, batches, result, progress,
           world_size: int = 1) -> int:
    """Load a `training_state` into this run; the first step to train."""
    changed = {name: (value, getattr(config, name)) for name, value in state["config"].items()
               if getattr(config, name) != value}
    if changed:
        raise TrainingError(f"the checkpoint was trained with other settings: {changed} (saved, now); resume with "
                            "the same settings, or start a new run")
    saved_world_size = state.get("world_size", 1)  # states saved before data-parallel training: one process
    if saved_world_size != world_size:
        raise TrainingError(f"the checkpoint was trained by {saved_world_size} process(es) and this run has "
                            f"{world_size}; resume with the same number (torchrun --nproc_per_node … --nnodes …), "
                            "or start a new run")
    if state["step"] >= config.steps:
        raise TrainingError(f"the checkpoint is at step {state['step']}; set steps above it to train on")
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    noise_generator.set_state(state["noise_generator"])
    batches.load_state_dict(state["batches"])
    for name, value in state["result"].items():
        setattr(result, name, value)
    progress.update(state["progress"])
    return state["step"] + 1


def diverged(result: TrainingResult, step: int, what: str, started: float) -> TrainingDiverged:
    result.stop_reason = "diverged"
    result.seconds = time.perf_counter() - started
    return TrainingDiverged(
        f"the {what} became NaN or infinite at step {step}; training stopped and the network keeps the weights "
        f"of step {step - 1}. Lower the learning rate (or raise max_grad_norm clipping), or train in fp32/bf16 "
        "instead of fp16",
        result,
    )
