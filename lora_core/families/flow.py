"""What SD3 and Flux share: the flow-matching objective with a family's defaults, and a backend over a diffusers
pipeline with a transformer denoiser, a 16-channel VAE (scale and shift), CLIP-L (the one text encoder that may
train) beside frozen ones (T5 is never trained)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..backend import TrainingBackend, check_frame_step
from ..formats.files import data_hash
from ..network import grouped_by_module
from ..targets import (
    TEXT_ENCODER_PRESET,
    TargetError,
    TargetPreset,
    all_adaptable,
    find_targets,
    kohya_paths,
    named_for_kohya,
)
from ..training.objectives import FLUX_SEQ_LENS, FlowMatchingObjective
from .family import Family
from .sd1 import generate

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

CLIP_L_PREFIX = "lora_te1"  # kohya's, ComfyUI's and diffusers' name of the first text encoder's layers
DIFFUSERS_PREFIXES = {"transformer.": "lora_unet_", "text_encoder.": f"{CLIP_L_PREFIX}_"}  # file → network names
DIFFUSERS_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}  # network → file


def flow_objective(config: TrainingConfig, family: Family, timestep_multiplier: float, shift: float | None,
                   base_shift: float = 0.5, max_shift: float = 1.15,
                   seq_lens: tuple[int, int] = FLUX_SEQ_LENS) -> FlowMatchingObjective:
    """The family's flow-matching objective with the run's settings: σ drawn as `timestep_sampling` says, else as
    the family's default, shifted by `config.flow_shift` if set, else by the family's fixed `shift`, or by Flux's
    resolution-dependent shift (μ from `base_shift` to `max_shift` over `seq_lens` image tokens) where `shift` is
    None; the loss on preconditioned outputs where `config.precondition_outputs` (else the family's default) says so."""
    config.check_flow_matching(family.name)
    if config.flow_shift is not None:
        shift = config.flow_shift
    return FlowMatchingObjective(
        timestep_multiplier, config.timestep_sampling or family.sigma_sampling, config.logit_mean, config.logit_std,
        config.mode_scale, shift=1.0 if shift is None else shift, resolution_shift=shift is None,
        base_shift=base_shift, max_shift=max_shift, shift_seq_lens=seq_lens, weighting=config.loss_weighting,
        precondition_outputs=(family.precondition_outputs if config.precondition_outputs is None
                              else config.precondition_outputs), sigma_range=(config.min_sigma, config.max_sigma),
    )


def flattened(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}.{suffix}": value for name, parts in modules.items() for suffix, value in parts.items()}


def alpha_folded_up(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A LoRA's lora_up with alpha/rank folded in, as diffusers' files hold it (without alpha)."""
    rank, up = parts["lora_down.weight"].shape[0], parts["lora_up.weight"]
    return (up.float() * (float(parts.get("alpha", rank)) / rank)).to(up.dtype)


def in_diffusers_naming(tensors: dict[str, torch.Tensor], file_names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The network's tensors under `file_names` (network name → the module's name in files), LoRA as lora_A/lora_B
    with alpha/rank folded into lora_B and no alpha, as diffusers reads them; other algorithms' tensors keep their
    suffixes."""
    out = {}
    for name, parts in grouped_by_module(tensors).items():
        if "lora_down.weight" in parts:
            parts["lora_up.weight"] = alpha_folded_up(parts)
            parts.pop("alpha", None)
        out |= {f"{file_names[name]}.{DIFFUSERS_SUFFIXES.get(suffix, suffix)}": value for suffix, value in parts.items()}
    return out


def from_diffusers_naming(tensors: dict[str, torch.Tensor], prefixes: dict[str, str] = DIFFUSERS_PREFIXES
                          ) -> dict[str, torch.Tensor]:
    """Tensors of diffusers' LoRA naming (`transformer.<path>.lora_A.weight`, `text_encoder.<path>…`, as diffusers'
    scripts, ai-toolkit and SD3 files here write them; a family may add `prefixes`) under the network's names
    (`lora_unet_<path>.lora_down.weight`, `lora_te1_…`); other keys unchanged. Without `.alpha` a LoRA's scale is 1,
    as diffusers and ComfyUI apply it."""
    suffixes = {file: network for network, file in DIFFUSERS_SUFFIXES.items()}
    named = {}
    for key, value in tensors.items():
        prefix = next((prefix for prefix in prefixes if key.startswith(prefix)), None)
        if prefix is None:
            named[key] = value
            continue
        module, _, suffix = key.rpartition(".")
        if suffix == "weight":  # lora_A.weight, lora_B.weight
            module, _, leaf = module.rpartition(".")
            suffix = f"{leaf}.weight"
        name = prefixes[prefix] + module[len(prefix):].replace(".", "_")
        named[f"{name}.{suffixes.get(suffix, suffix)}"] = value
    return named


def transformer_presets(blocks: frozenset[str], attention: tuple[str, ...], mlp: tuple[str, ...],
                        attention_description: str = "attention q/k/v/out of every block",
                        full_description: str = "every Linear of every block, modulation included"
                        ) -> dict[str, TargetPreset]:
    """The shared preset names over a transformer's blocks: attention projections, attention + MLP, every Linear.
    They adapt the same layers as the ComfyUI nodes' presets of the same name (tests/comfyui/presets_probe.py)."""
    return {
        "attention": TargetPreset(blocks, False, attention, attention_description),
        "transformer": TargetPreset(blocks, False, attention + mlp, "attention and MLP Linears of every block"),
        "full": TargetPreset(blocks, False, (), full_description),
    }


class FlowBackend(TrainingBackend):
    """A flow-matching pipeline (`pipeline.transformer`, `.vae`, `.text_encoder` = CLIP-L) seen by the trainer.
    Subclasses give the family, presets, text encoding, the denoiser call and the objective's constants."""

    prediction_type = "flow"
    spec: Family
    presets: dict[str, TargetPreset]
    sample_guidance: float  # the guidance scale sample images are drawn with

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "") -> None:
        self.pipeline = pipeline
        self.transformer, self.vae, self.text_encoder = pipeline.transformer, pipeline.vae, pipeline.text_encoder
        self.device = self.transformer.device
        self.name, self.model_hash = name, model_hash
        self.sample_size: int | None = None  # pixels of sample images; None: the pipeline's default

    def compute_dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def saved_activations(self) -> float:
        return self.spec.saved_activations

    def check_packable(self, height: int, width: int) -> None:
        """Refuse latents the transformer's 2×2 patches cannot pack (Flux, Chroma, Qwen-Image, HunyuanVideo)."""
        if height % 2 or width % 2:
            scale = getattr(self.pipeline, "vae_scale_factor", None) or self.pipeline.vae_scale_factor_spatial
            raise ValueError(f"{self.family} packs latents in 2×2 patches, so image sides must be multiples of "
                             f"{2 * scale} pixels; got latents of {height}×{width}")

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(z − shift_factor) · scaling_factor, as the pipelines undo it before decoding."""
        config = self.vae.config
        latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.sample(generator=generator)
        return (latents - config.shift_factor) * config.scaling_factor

    def encode_reference_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior's mean, scaled and shifted, as FluxKontextPipeline encodes its input image."""
        config = self.vae.config
        latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return (latents - config.shift_factor) * config.scaling_factor

    def denoiser_targets(self, preset: str) -> dict[str, nn.Module]:
        """Network name → layer of the transformer for `preset`."""
        if preset not in self.presets:
            raise TargetError(f"unknown target preset {preset!r} for {self.family}; choose one of {sorted(self.presets)}")
        return named_for_kohya("lora_unet", find_targets(self.transformer, self.presets[preset]))

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        targets = self.denoiser_targets(preset)
        if text_encoder:
            targets.update(self.clip_l_names(find_targets(self.text_encoder, TEXT_ENCODER_PRESET)))
        return targets

    def loadable_modules(self) -> dict[str, nn.Module]:
        return {**self.denoiser_targets("full"), **self.clip_l_names(all_adaptable(self.text_encoder))}

    def clip_l_names(self, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """kohya names (`lora_te1_text_model_…`) of CLIP-L's layers, under transformers 4 and 5 alike."""
        return named_for_kohya(CLIP_L_PREFIX, kohya_paths(self.text_encoder, modules))

    def text_encoders(self) -> list[nn.Module]:
        return [module for name, module in self.pipeline.components.items()
                if name.startswith("text_encoder") and module is not None]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.transformer, self.vae, *self.text_encoders()]

    def checkpoint_blocks(self) -> list[nn.Module]:
        return [*self.transformer.transformer_blocks, *getattr(self.transformer, "single_transformer_blocks", [])]

    def vae_fingerprint(self) -> str:
        if not hasattr(self, "_vae_fingerprint"):
            self._vae_fingerprint = data_hash(self.vae.state_dict())
        return self._vae_fingerprint

    @property
    def sample_pipeline(self) -> Any:
        """The pipeline sample images are drawn with."""
        return self.pipeline

    def sample_images(self, prompts: list[str], seed: int, steps: int) -> list:
        return [generate(self.sample_pipeline, None, prompt, seed=seed, steps=steps, guidance_scale=self.sample_guidance,
                         size=self.sample_size) for prompt in prompts]


class VideoBackend(FlowBackend):
    """A text-to-video pipeline (Wan's, HunyuanVideo's) whose transformer takes video latents [B, C, F, H, W]: clips of
    the family's 4k+1 frames train, and samples are clips as long as the dataset's."""

    default_sample_size = 480  # pixels of each side of a sample clip's frames unless `sample_size` says

    def check_clip_frames(self, frames: int) -> None:
        check_frame_step(self.spec, frames)

    def sample_images(self, prompts: list[str], seed: int, steps: int) -> list:
        """A clip of `sample_frames` frames per prompt (an image at 1), from noise of `seed`, at the sample size."""
        size, samples = self.sample_size or self.default_sample_size, []
        for prompt in prompts:
            frames = self.sample_pipeline(prompt, height=size, width=size, num_frames=self.sample_frames,
                                          num_inference_steps=steps, guidance_scale=self.sample_guidance,
                                          generator=torch.Generator().manual_seed(seed), output_type="pil").frames[0]
            samples.append(frames if self.sample_frames > 1 else frames[0])
        return samples
