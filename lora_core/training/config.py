"""A training run's settings, their allowed ranges, and the metadata a LoRA file records of them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LoRALabError
from .cpu_convolution import KERNEL_CHOICES
from .objectives import SD3_WEIGHTINGS, SIGMA_SAMPLINGS
from .optim import OptimizerError, check_learning_rate
from .precision import AUTOCAST_DTYPES

# Settings of the flow-matching objective (SD3, Flux), with the values that mean "not set" on other families.
FLOW_MATCHING_SETTINGS = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "flow_shift", "loss_weighting",
                          "precondition_outputs")


class TrainingError(LoRALabError, ValueError):
    """A training setting out of its allowed range; the message names it and the range."""


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
    lr_scheduler_cycles: int = 1  # cosine_with_restarts only
    lr_scheduler_power: float = 1.0  # polynomial only
    min_snr_gamma: float = 0.0
    prior_loss_weight: float = 1.0  # weight of the regularization (class) images' loss, kohya's default 1
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    validation_every: int = 50  # steps between validation losses (0: none; early stopping needs them)
    validation_images: int = 4  # held out when the dataset has 5× as many, else a fixed subset of the training images
    validation_timesteps: int = 4  # stratified timesteps per validation image
    early_stopping_patience: int = 0  # validation evaluations without a new best before stopping (0: off)
    early_stopping_min_steps: int = 0  # never stop before this step
    keep_best: bool = False  # end with the weights of the lowest validation loss (always so with early stopping)
    loss_smoothing: float = 0.9  # of the displayed training loss only
    text_encoder_lr: float | None = None  # None: the learning rate
    mixed_precision: str = "no"  # "bf16" or "fp16": autocast; adapters stay fp32 (see precision.py)
    gradient_checkpointing: bool = False
    cpu_conv_kernels: str = "by_size"  # frozen fp32 convolutions on CPU: "by_size" (see cpu_convolution.py) or "pytorch"
    sample_every: int = 0  # steps between sample images (0: none)
    sample_prompts: tuple[str, ...] = ("a photo of sks",)
    sample_seed: int = 0
    sample_steps: int = 20
    latent_cache_dir: str | None = None  # latents kept on disk between runs, keyed by image, VAE and seed
    # flow matching (SD3, Flux) only; None: the family's default (see `families`)
    timestep_sampling: str | None = None  # how σ is drawn: uniform, logit_normal or mode (SD3 paper §3.1)
    logit_mean: float = 0.0  # logit_normal's mean
    logit_std: float = 1.0  # logit_normal's standard deviation
    mode_scale: float = 1.29  # mode's scale
    flow_shift: float | None = None  # fixed σ shift (SD3.5: 3.0); None: the family's (Flux: by resolution)
    loss_weighting: str = "none"  # none, sigma_sqrt or cosmap (diffusers' SD3 weighting schemes)
    precondition_outputs: bool | None = None  # loss on x̂0 = x_σ − σ·v̂ (diffusers' and kohya's SD3); None: family's

    def validate(self) -> None:
        checks = [
            ("steps", self.steps >= 1, "a whole number ≥ 1"),
            ("batch_size", self.batch_size >= 1, "a whole number ≥ 1"),
            ("gradient_accumulation", self.gradient_accumulation >= 1, "a whole number ≥ 1"),
            ("min_snr_gamma", self.min_snr_gamma >= 0, "0 (off) or more (5 is usual)"),
            ("prior_loss_weight", self.prior_loss_weight >= 0, "0 or more (1 weighs class images like the concept's)"),
            ("noise_offset", 0 <= self.noise_offset <= 1, "from 0 (off) to 1 (0.05–0.1 is usual)"),
            ("max_grad_norm", self.max_grad_norm >= 0, "0 (no clipping) or more"),
            ("validation_every", self.validation_every >= 0, "0 (off) or a number of steps"),
            ("validation_images", self.validation_images >= 1, "a whole number ≥ 1"),
            ("validation_timesteps", self.validation_timesteps >= 1, "a whole number ≥ 1"),
            ("early_stopping_patience", self.early_stopping_patience >= 0,
             "0 (off) or a number of validation evaluations"),
            ("early_stopping_patience", not self.early_stopping_patience or self.validation_every,
             "0 while validation_every is 0: early stopping judges the validation loss, so set validation_every"),
            ("early_stopping_min_steps", self.early_stopping_min_steps >= 0, "0 or a number of steps"),
            ("keep_best", not self.keep_best or self.validation_every,
             "False while validation_every is 0: the best weights are those of the lowest validation loss"),
            ("loss_smoothing", 0 <= self.loss_smoothing < 1, "from 0 to below 1"),
            ("mixed_precision", self.mixed_precision in AUTOCAST_DTYPES, f"one of {sorted(AUTOCAST_DTYPES)}"),
            ("cpu_conv_kernels", self.cpu_conv_kernels in KERNEL_CHOICES, f"one of {KERNEL_CHOICES}"),
            ("sample_every", self.sample_every >= 0, "0 (off) or a number of steps"),
            ("timestep_sampling", self.timestep_sampling in (None, *SIGMA_SAMPLINGS),
             f"one of {SIGMA_SAMPLINGS}, or None for the model family's default"),
            ("loss_weighting", self.loss_weighting in SD3_WEIGHTINGS, f"one of {SD3_WEIGHTINGS}"),
            ("flow_shift", self.flow_shift is None or self.flow_shift > 0, "a number > 0 (1: no shift), or None"),
            ("logit_std", self.logit_std > 0, "a number > 0"),
            ("precondition_outputs", self.precondition_outputs in (None, True, False),
             "True, False, or None for the model family's default"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise TrainingError(f"{name} = {getattr(self, name)!r} is out of range: use {allowed}")
        try:
            check_learning_rate(self.optimizer, self.learning_rate)
            if self.text_encoder_lr:  # 0 keeps the text encoder's LoRA fixed
                check_learning_rate(self.optimizer, self.text_encoder_lr, "text_encoder_lr")
        except OptimizerError as error:
            raise TrainingError(str(error)) from error

    def check_discrete(self, family: str) -> None:
        """Refuse flow-matching settings for a family trained on a discrete ε/v schedule."""
        defaults = TrainingConfig()
        set_here = [name for name in FLOW_MATCHING_SETTINGS if getattr(self, name) != getattr(defaults, name)]
        if set_here:
            raise TrainingError(f"{', '.join(set_here)} set the flow-matching objective of SD3 and Flux; {family} "
                                "trains on a discrete ε/v schedule, so leave them at their defaults (min_snr_gamma and "
                                "noise_offset are its settings)")

    def check_flow_matching(self, family: str) -> None:
        """Refuse discrete-schedule settings for a flow-matching family."""
        set_here = [name for name in ("min_snr_gamma", "noise_offset") if getattr(self, name)]
        if set_here:
            raise TrainingError(f"{', '.join(set_here)} apply to ε/v-prediction on a discrete schedule; {family} "
                                "trains by flow matching: set them to 0 and use timestep_sampling, flow_shift and "
                                "loss_weighting instead")

    @property
    def text_learning_rate(self) -> float:
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    def metadata(self) -> dict[str, object]:
        """kohya's `ss_*` names for these settings (without the prefix)."""
        return {
            "learning_rate": self.learning_rate,
            "unet_lr": self.learning_rate,
            "text_encoder_lr": self.text_learning_rate,
            "mixed_precision": self.mixed_precision,
            "gradient_checkpointing": self.gradient_checkpointing,
            "max_train_steps": self.steps,
            "batch_size_per_device": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation,
            "optimizer": f"torch.optim.{self.optimizer}" if hasattr(torch.optim, self.optimizer) else self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "lr_warmup_steps": self.lr_warmup_steps,
            "lr_scheduler_num_cycles": self.lr_scheduler_cycles,
            "lr_scheduler_power": self.lr_scheduler_power,
            "min_snr_gamma": self.min_snr_gamma or None,
            "prior_loss_weight": self.prior_loss_weight,
            "noise_offset": self.noise_offset or None,
            "max_grad_norm": self.max_grad_norm,
            "seed": self.seed,
            "validate_every_n_steps": self.validation_every or None,
        }
