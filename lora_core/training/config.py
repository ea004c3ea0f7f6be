"""A training run's settings, their allowed ranges, and the metadata a LoRA file records of them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LoRALabError
from ..settings import (
    DISCRETE,
    FLOW_MATCHING,
    Widget,
    declared_settings,
    out_of_range,
    setting,
)
from .cpu_convolution import KERNEL_CHOICES
from .objectives import SD3_WEIGHTINGS, SIGMA_SAMPLINGS
from .optim import OFFERED_OPTIMIZERS, SCHEDULERS, OptimizerError, check_learning_rate
from .precision import AUTOCAST_DTYPES


class TrainingError(LoRALabError, ValueError):
    """A training setting out of its allowed range; the message names it and the range."""


@dataclass
class TrainingConfig:
    """Defaults follow common advice for SD1.x concept LoRAs: lr 1e-4, 1000 steps, batch 1 × accumulation 4.

    Each field is declared once with `setting` (see settings.py): the CLI's options, the nodes' widgets and the range
    checks of `validate` are made from these declarations.
    """

    steps: int = setting(1000, "Optimizer steps; each sees batch_size × gradient_accumulation images.",
                         minimum=1, allowed="a whole number ≥ 1", widget=Widget(maximum=100000))
    learning_rate: float = setting(1e-4, "Peak learning rate (1e-4 is a common start for LoRA; Prodigy wants 1.0). "
                                         "Checked against the optimizer's range.",
                                   aliases=("--lr",), widget=Widget(minimum=0.000001, maximum=10.0, step=0.000001))
    batch_size: int = setting(1, "Images per forward pass.", minimum=1, allowed="a whole number ≥ 1",
                              widget=Widget(maximum=64))
    gradient_accumulation: int = setting(4, "Forward passes averaged into one optimizer step: each step sees "
                                            "batch_size × this many images.",
                                         minimum=1, allowed="a whole number ≥ 1", widget=Widget(maximum=64))
    optimizer: str = setting("AdamW", "AdamW8bit, Lion and Prodigy need their packages installed; Prodigy wants "
                                      "learning_rate 1.0.",
                             widget=Widget(choices=OFFERED_OPTIMIZERS))  # any torch.optim class: checked by optim.py
    optimizer_options: dict = field(default_factory=dict)
    lr_scheduler: str = setting("constant", "How the learning rate changes after warmup.", choices=SCHEDULERS,
                                widget=Widget())  # checked by optim.py
    lr_warmup_steps: int = setting(0, "Steps of linear warmup from 0 to the learning rate.",
                                   widget=Widget(minimum=0, maximum=100000))  # checked by optim.py against steps
    lr_scheduler_cycles: int = setting(1, "cosine_with_restarts: the number of cosine cycles")
    lr_scheduler_power: float = setting(1.0, "polynomial: the power of the decay")
    min_snr_gamma: float = setting(0.0, "SD1.x/2.x/SDXL (ε/v): Min-SNR-γ loss weighting; 0 is off, 5 is usual. "
                                        "Refused for SD3/Flux.",
                                   minimum=0.0, allowed="0 (off) or more (5 is usual)", families=DISCRETE,
                                   widget=Widget(maximum=20.0, step=0.1))
    prior_loss_weight: float = setting(1.0, "Weight of the class images' loss (Load Dataset's regularization_folder), "
                                            "kohya's prior_loss_weight; refused without class images.",
                                       minimum=0.0, allowed="0 or more (1 weighs class images like the concept's)",
                                       widget=Widget(maximum=10.0, step=0.01))
    noise_offset: float = setting(0.0, "Offset noise for darker/brighter images; 0 is off, 0.05 is usual.",
                                  minimum=0.0, maximum=1.0, allowed="from 0 (off) to 1 (0.05–0.1 is usual)",
                                  families=DISCRETE, widget=Widget(step=0.01))
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm", minimum=0.0,
                                   allowed="0 (no clipping) or more", cli=False)
    seed: int = setting(0, "The same seed and settings give the same LoRA.",
                        widget=Widget(minimum=0, maximum=0xFFFFFFFFFFFFFFFF))
    validation_every: int = setting(50, "Steps between validation losses: fixed images, noise and timesteps, so it "
                                        "moves only when the weights do. Early stopping and keep_best judge it; 0 is "
                                        "off.",
                                    minimum=0, allowed="0 (off) or a number of steps", widget=Widget(maximum=100000))
    validation_images: int = setting(4, "images the validation loss uses: held out of training when the dataset has "
                                        "5× as many", minimum=1, allowed="a whole number ≥ 1")
    validation_timesteps: int = setting(4, "stratified timesteps per validation image", minimum=1,
                                        allowed="a whole number ≥ 1")
    early_stopping_patience: int = setting(0, "Stop after this many validation losses without a new lowest one, and "
                                              "keep the weights of the lowest; 0 is off.",
                                           minimum=0, allowed="0 (off) or a number of validation evaluations",
                                           widget=Widget(maximum=100000))
    early_stopping_min_steps: int = setting(0, "never stop early before this step", minimum=0,
                                            allowed="0 or a number of steps")
    keep_best: bool = setting(False, "End with the weights of the lowest validation loss (early stopping always "
                                     "does).", widget=Widget())
    ema_decay: float = setting(0.0, "Keep an exponential moving average of the LoRA's weights (0: off; 0.999 is "
                                    "usual): after each step it moves 1 − decay of the way to them. Validation, "
                                    "samples, checkpoints and the saved LoRA use the average.", minimum=0.0, below=1.0,
                               allowed="0 (off) or from 0 to below 1", widget=Widget(maximum=0.99999, step=0.0001))
    ema_start_step: int = setting(0, "The average starts as the weights after this step (0: the initial weights) and "
                                     "follows every later step; before it, validation and samples use the weights "
                                     "themselves.", minimum=0, allowed="0 or a step", widget=Widget(maximum=100000))
    loss_smoothing: float = setting(0.9, "smoothing of the displayed training loss only", minimum=0.0, below=1.0,
                                    allowed="from 0 to below 1", cli=False)
    text_encoder_lr: float | None = setting(None, "the text encoder LoRA's learning rate (default: the learning "
                                                  "rate; 0 keeps it fixed)")  # the nodes show it as a choice
    mixed_precision: str = setting("no", "Compute in bf16/fp16 (autocast) to save memory and time; the LoRA stays "
                                         "fp32. fp16 adds a gradient scaler.",
                                   choices=tuple(AUTOCAST_DTYPES), allowed=f"one of {sorted(AUTOCAST_DTYPES)}",
                                   widget=Widget())
    gradient_checkpointing: bool = setting(False, "Recompute the denoiser's block activations (UNet or transformer "
                                                  "blocks) in backward: much less memory, about a third slower.",
                                           widget=Widget())
    cpu_offload_checkpointing: bool = setting(
        False, "With gradient_checkpointing: keep each transformer block's input in host memory instead of on the "
               "device, copied back for its recompute in backward (kohya's cpu_offload_checkpointing): the device "
               "holds one block's activations instead of every block's input, at the cost of the copies. Refused for "
               "UNets and when training on the CPU.", widget=Widget())
    blocks_to_swap: int | None = setting(
        0, "Keep the frozen weights of the denoiser's last N blocks in host memory and bring each to the device only "
           "for its forward and backward, the next one copied ahead while one computes (sd-scripts' and musubi-tuner's "
           "blocks_to_swap): less device memory, slower where the copies outlast the compute. 0: none; auto: the "
           "fewest the memory plan says fit the GPU's free memory (none on a CPU).",
        minimum=0, allowed="0 (none), a number of blocks, or auto", words=(("auto", None),),
        widget=Widget(minimum=-1, maximum=200, unset=-1, note=(
            "-1 is auto. In ComfyUI: ComfyUI's own partial loading frees as many bytes as N blocks hold (its smallest "
            "layers first) and casts those layers to the device per use, with no copy ahead; needs "
            "gradient_checkpointing and a ComfyUI from mid-2024 on.")))
    cpu_conv_kernels: str = setting("by_size", "frozen fp32 convolutions on CPU: by_size runs those with small outputs "
                                               "on PyTorch's GEMM kernel (faster there than oneDNN's); pytorch leaves "
                                               "the choice to PyTorch (see cpu_convolution.py)",
                                    choices=KERNEL_CHOICES, allowed=f"one of {KERNEL_CHOICES}")
    sample_every: int = setting(0, "Generate sample images every N steps (0: none); they come out as the samples IMAGE "
                                   "and as previews.",
                                minimum=0, allowed="0 (off) or a number of steps", widget=Widget(maximum=100000))
    sample_prompts: tuple[str, ...] = setting(("a photo of sks",), "One prompt per line for the samples; the seed is "
                                                                   "fixed, so samples show only the LoRA changing.",
                                              aliases=("--sample-prompt",), widget=Widget())
    sample_seed: int = 0
    sample_steps: int = setting(20, "Sampler steps for each sample image.", widget=Widget(minimum=1, maximum=200))
    latent_cache_dir: str | None = setting(None, "keep encoded latents on disk for later runs, keyed by image, VAE and "
                                                 "seed")  # the nodes: a folder of ComfyUI's output, on or off
    timestep_sampling: str | None = setting(
        None, "SD3/Flux (flow matching): how noise levels σ are drawn.", choices=(None, *SIGMA_SAMPLINGS),
        allowed=f"one of {SIGMA_SAMPLINGS}, or None for the model family's default", families=FLOW_MATCHING,
        widget=Widget(labels={None: "default"}, note="default: logit_normal, as lora_core trains SD3 and Flux. "
                                                     "Refused for SD1.x/2.x/SDXL."))
    logit_mean: float = setting(0.0, "SD3/Flux, logit_normal sampling: mean of the logit of σ (positive: noisier).",
                                families=FLOW_MATCHING, widget=Widget(minimum=-10.0, maximum=10.0, step=0.01))
    logit_std: float = setting(1.0, "SD3/Flux, logit_normal sampling: standard deviation of the logit of σ.",
                               above=0.0, allowed="a number > 0", families=FLOW_MATCHING,
                               widget=Widget(minimum=0.01, maximum=10.0, step=0.01))
    mode_scale: float = setting(1.29, "SD3/Flux, mode sampling: its scale", families=FLOW_MATCHING)
    flow_shift: float | None = setting(
        None, "SD3/Flux: a fixed shift of σ (kohya's discrete_flow_shift; 3.0 for SD3.5).", above=0.0,
        allowed="a number > 0 (1: no shift), or None", families=FLOW_MATCHING,
        widget=Widget(minimum=0.0, maximum=100.0, step=0.01, unset=0.0,
                      note="0: the model's own schedule, including a ModelSamplingSD3 / ModelSamplingFlux node before "
                           "Train LoRA."))
    min_sigma: float = setting(0.0, "Flow matching: train only on noise levels σ (after the shift) of at least this: "
                                    "one expert of a model split at a σ boundary (Wan 2.2 A14B's high-noise expert: "
                                    "0.875, its boundary).", minimum=0.0, below=1.0, allowed="a number in [0, 1)",
                               families=FLOW_MATCHING, widget=Widget(maximum=0.999, step=0.001))
    max_sigma: float = setting(1.0, "Flow matching: train only on noise levels σ (after the shift) of at most this "
                                    "(Wan 2.2 A14B's low-noise expert: 0.875, its boundary).", above=0.0, maximum=1.0,
                               allowed="a number in (0, 1]", families=FLOW_MATCHING,
                               widget=Widget(minimum=0.001, step=0.001))
    loss_weighting: str = setting("none", "SD3/Flux: diffusers' loss weighting over σ (none, sigma_sqrt, cosmap).",
                                  choices=SD3_WEIGHTINGS, allowed=f"one of {SD3_WEIGHTINGS}", families=FLOW_MATCHING,
                                  widget=Widget())
    precondition_outputs: bool | None = setting(
        None, "SD3/Flux: on, the loss compares the denoised estimate x_σ − σ·v̂ with x0 (σ² times the velocity loss), "
              "as diffusers' SD3 script (its default) and kohya's SD3 trainer train; off, the plain velocity loss.",
        choices=(None, True, False), allowed="True, False, or None for the model family's default",
        families=FLOW_MATCHING, widget=Widget(labels={None: "default", True: "on", False: "off"},
                                              note="default: on for SD3, off for Flux. Refused for SD1.x/2.x/SDXL."))

    def validate(self) -> None:
        problem = out_of_range(self, TRAINING_SETTINGS)
        if problem:
            raise TrainingError(problem)
        relations = [
            ("early_stopping_patience", not self.early_stopping_patience or self.validation_every,
             "0 while validation_every is 0: early stopping judges the validation loss, so set validation_every"),
            ("keep_best", not self.keep_best or self.validation_every,
             "False while validation_every is 0: the best weights are those of the lowest validation loss"),
            ("min_sigma", self.min_sigma < self.max_sigma, f"a value below max_sigma ({self.max_sigma})"),
            ("cpu_offload_checkpointing", not self.cpu_offload_checkpointing or self.gradient_checkpointing,
             "False while gradient_checkpointing is off: it moves the inputs checkpointing keeps, so turn that on"),
        ]
        for name, ok, allowed in relations:
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
        set_here = [name for name in DISCRETE_SETTINGS if getattr(self, name)]
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
            "ema_decay": self.ema_decay or None,
        }


TRAINING_SETTINGS = declared_settings(TrainingConfig)
# the flow-matching objective's (SD3, Flux), at values that mean "not set" on other families; and the discrete one's
FLOW_MATCHING_SETTINGS = tuple(each.name for each in TRAINING_SETTINGS if each.families == FLOW_MATCHING)
DISCRETE_SETTINGS = tuple(each.name for each in TRAINING_SETTINGS if each.families == DISCRETE)
