"""The ComfyUI backend: MODEL, CLIP and VAE as `lora_core` sees a model. No math here, only ComfyUI plumbing: what a
family is (presets, file naming, fused layers and how their LoRAs split) is lora_core's family description.

The denoiser is trained as ComfyUI's samplers run it: noise levels and the prediction type come from the MODEL's
*patched* `model_sampling` (so ModelSamplingDiscrete v_prediction / zsnr, ModelSamplingSD3 and ModelSamplingFlux
applied before Train LoRA count), and the diffusion model is called with the conditions `BaseModel.extra_conds` builds
per sample (SDXL's size/crop ADM, pooled outputs, Flux's guidance) and the MODEL's transformer_options. Layers are
named as ComfyUI's own LoRA key maps (`comfy.lora.model_lora_keys_unet` / `_clip`) read them.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.ops
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from torch import nn

from ..lora_core.backend import (
    REFERENCE_LATENTS,
    SIZE_CONDITIONING,
    Conditioning,
    TrainingBackend,
    check_frame_step,
    concatenated,
)
from ..lora_core.errors import LoRALabError
from ..lora_core.families import FLUX, Family, comfy_family, comfy_model_name
from ..lora_core.families.flow import DIFFUSERS_SUFFIXES, from_diffusers_naming
from ..lora_core.families.qwen_image import EDIT_PROMPT
from ..lora_core.families.sd3 import FilePart, fused_lora, split_lora
from ..lora_core.formats.files import data_hash
from ..lora_core.targets import (
    TEXT_ENCODER_PRESET,
    UNET_PREFIX,
    all_adaptable,
    find_targets,
    kohya_name,
)
from ..lora_core.training.block_swap import check_swap_count, frozen_bytes
from ..lora_core.training.objectives import FlowMatchingObjective, Objective

if TYPE_CHECKING:
    from ..lora_core.training.config import TrainingConfig

# A discrete schedule's prediction type is what its `calculate_denoised` does with the denoiser's output.
DISCRETE_PREDICTION_TYPES = {
    comfy.model_sampling.EPS.calculate_denoised: "epsilon",
    comfy.model_sampling.V_PREDICTION.calculate_denoised: "v_prediction",
}
# Flow matching (SD3, Flux): ComfyUI's CONST sampling and its schedules (absent from ComfyUI before mid-2024)
CONST = getattr(comfy.model_sampling, "CONST", None)
FLOW_SAMPLING_NAMES = ("ModelSamplingDiscreteFlow", "ModelSamplingFlux")
FLOW_SAMPLINGS = tuple(getattr(comfy.model_sampling, name) for name in FLOW_SAMPLING_NAMES
                       if hasattr(comfy.model_sampling, name))
IMAGE_INPUT_FAMILIES = {9: "inpainting", 8: "instruct-pix2pix"}  # extra input channels: masked image (+ mask)
SUPPORTED = ("Train LoRA trains SD1.x and SD2.x and SDXL text-to-image models with ε- or v-prediction (also as set by "
             "ModelSamplingDiscrete eps / v_prediction, with or without zsnr), and SD3/SD3.5, Flux.1 dev/schnell "
             "(and Kontext), Chroma, Qwen-Image (and Edit), Lumina 2, HiDream-I1, Wan 2.1/2.2 text-to-video and "
             "HunyuanVideo text-to-video by flow matching (also as shifted by ModelSamplingSD3 / ModelSamplingFlux / "
             "ModelSamplingAuraFlow)")


def batched(values: list, device: torch.device):
    """One condition of a batch from its samples' values: tensors concatenated; a constant (CONDConstant: Lumina 2's
    token count) shared, as ComfyUI batches only conditions whose constants are equal."""
    if torch.is_tensor(values[0]):
        return torch.cat(values).to(device)
    if any(value != values[0] for value in values):
        raise ComfyBackendError(f"samples of one batch differ in a constant condition: {values}")
    return values[0]


class ComfyBackendError(LoRALabError, ValueError):
    """The model cannot be trained here; the message says why."""


def model_sampling(model: Any) -> Any:
    """The MODEL's noise schedule with its object patches applied, as the samplers use it."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    # ComfyUI before mid-2024: while another clone's patch is applied, the shared backup holds the original
    if "model_sampling" in model.object_patches:
        return model.object_patches["model_sampling"]
    return model.object_patches_backup.get("model_sampling", model.model.model_sampling)


def model_family(model: Any) -> str:
    """A reader's name for the MODEL's family: "SDXL", "SD1.x inpainting (9-channel)", …"""
    config = model.model.model_config
    name = comfy_model_name(type(config).__name__)
    channels = config.unet_config.get("in_channels", 4)
    if channels in IMAGE_INPUT_FAMILIES and IMAGE_INPUT_FAMILIES[channels] not in name:
        name = f"{name} {IMAGE_INPUT_FAMILIES[channels]} ({channels}-channel)"
    return name


def config_family(model: Any) -> Family | None:
    """The family of the MODEL's config class or of the nearest class it derives from (SSD-1B is an SDXL)."""
    return comfy_family(cls.__name__ for cls in type(model.model.model_config).__mro__)


def trainable_family(model: Any) -> tuple[Family, str]:
    """The family and prediction type ("epsilon", "v_prediction" or "flow") of a MODEL the trainer can train;
    otherwise a ComfyBackendError naming the family, what stands in the way and what is supported."""
    base, sampling, family = model.model, model_sampling(model), config_family(model)
    unet_config = base.model_config.unet_config
    in_channels = unet_config.get("in_channels", 4)
    denoised = type(sampling).calculate_denoised
    if family is None:
        problem = "Train LoRA does not train this family"
    elif type(base.diffusion_model).__name__ != family.comfy_denoiser:
        problem = (f"its denoiser is a {type(base.diffusion_model).__name__}, not {family.name}'s "
                   f"{family.comfy_denoiser}")
    elif in_channels != unet_config.get("out_channels", in_channels) * family.patched_input:
        problem = f"its denoiser takes {in_channels} input channels (image/mask conditioning)"
    elif not family.adm and (unet_config.get("adm_in_channels") or unet_config.get("num_classes") is not None):
        problem = "it needs pooled/ADM conditioning (the UNet's `y` input)"
    elif family.flow and not (isinstance(sampling, FLOW_SAMPLINGS) and denoised is CONST.calculate_denoised):
        problem = f"its sampling is {type(sampling).__name__}, not a flow-matching (CONST) schedule"
    elif type(base.model_config).__name__ in family.comfy_variants:
        problem = (f"it is {family.comfy_variants[type(base.model_config).__name__]}, whose extra inputs Train LoRA "
                   "does not give yet")
    elif family.flow:
        return family, "flow"
    elif not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        problem = f"its sampling is {type(sampling).__name__}, not a discrete DDPM schedule"
    elif denoised not in DISCRETE_PREDICTION_TYPES:
        problem = "its sampling predicts neither ε nor v (lcm, x0)"
    else:
        return family, DISCRETE_PREDICTION_TYPES[denoised]
    raise ComfyBackendError(f"this MODEL is {model_family(model)}: {problem}. {SUPPORTED}; other families are not "
                            "supported yet")


def diffusers_paths(model: Any) -> dict[str, str]:
    """LDM module path of the UNet → diffusers module path, from ComfyUI's own key map (kohya names use the latter)."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {
        ldm[: -len(".weight")]: diffusers[: -len(".weight")]
        for diffusers, ldm in mapping.items()
        if diffusers.endswith(".weight")
    }


def denoiser_layer_names(model: Any, family: Family) -> dict[str, str]:
    """Module path of each denoiser layer → its kohya name, kept where ComfyUI's own key map
    (`comfy.lora.model_lora_keys_unet`) reads that name back to that layer's weight."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    paths = all_adaptable(model.model.diffusion_model)
    kohya_paths = {path: path for path in paths} if family.ldm_names else diffusers_paths(model)
    names = {path: kohya_name(UNET_PREFIX, kohya_paths[path]) for path in paths if path in kohya_paths}
    return {path: name for path, name in names.items() if key_map.get(name) == f"diffusion_model.{path}.weight"}


def text_encoder_layer_names(clip: Any, family: Family) -> dict[str, str]:
    """Module path of each trainable text-encoder layer (`clip_l.transformer.text_model.…`) → its kohya name
    (`lora_te1_text_model_…` for SDXL's CLIP-L), kept where `comfy.lora.model_lora_keys_clip` reads it back."""
    if clip is None:
        return {}
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    names = {}
    for path in all_adaptable(clip.cond_stage_model):
        prefix = family.text_encoders.get(path.partition(".")[0])
        if prefix is not None and "text_model." in path:
            name = kohya_name(prefix, path[path.index("text_model."):])
            if key_map.get(name) == f"{path}.weight":
                names[path] = name
    return names


def trainable_alias(tensor: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor on the same memory as an inference tensor: autograd may save it for backward, and
    nothing is copied. (The weights are frozen, so the inference tensor's missing version counter is no risk.)"""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


@contextmanager
def trainable_weights(modules: list[nn.Module]) -> Iterator[list]:
    """Inside the block, parameters and buffers made under `torch.inference_mode()` (as ComfyUI loads every model)
    are replaced by trainable aliases of the same memory; afterwards the originals are put back wherever ComfyUI
    has not meanwhile moved or re-patched the weight itself. Yields the (module, name, original, alias) list, which
    `release_moved` trims."""
    replaced: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode(False):
        for root in modules:
            for module in root.modules():
                for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    if tensor is None or not tensor.is_inference():
                        continue
                    alias = trainable_alias(tensor)
                    if isinstance(tensor, nn.Parameter):
                        alias = nn.Parameter(alias, requires_grad=False)
                        setattr(module, name, alias)
                    else:
                        module._buffers[name] = alias
                    replaced.append((module, name, tensor, alias))
    try:
        yield replaced
    finally:
        for module, name, original, alias in reversed(replaced):
            current = getattr(module, name)
            if current is alias and alias.data_ptr() == original.data_ptr():
                (module._parameters if name in module._parameters else module._buffers)[name] = original


def release_moved(replaced: list) -> None:
    """Drop the originals whose alias ComfyUI has since moved (partial unloading) or replaced by its own tensor: they
    would never be put back, and holding them would keep their device memory."""
    replaced[:] = [(module, name, original, alias) for module, name, original, alias in replaced
                   if getattr(module, name) is alias and alias.data_ptr() == original.data_ptr()]


IN_PLACE_RESIDUAL_BLOCKS = frozenset({"BasicTransformerBlock", "CLIPLayer", "DoubleStreamBlock", "SingleStreamBlock"})


@contextmanager
def copied_norm_inputs(roots: list[nn.Module]) -> Iterator[None]:
    """Older ComfyUI (and Flux's blocks in every version) add attention outputs in place (`x += n`) into the tensor
    their LayerNorms saved for backward; feeding each such block's norms a copy keeps autograd's saved input intact.
    Outputs are unchanged."""
    handles = [
        module.register_forward_pre_hook(lambda _, args: (args[0].clone(), *args[1:]))
        for root in roots
        for block in root.modules() if type(block).__name__ in IN_PLACE_RESIDUAL_BLOCKS
        for module in block.modules() if isinstance(module, nn.LayerNorm)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fp8_matmul_layers(roots: list[nn.Module]) -> list[nn.Module]:
    """ComfyUI's fp8 Linear layers (`comfy.ops.fp8_ops` and the scaled-fp8 ops; both hold `scale_weight`): on a GPU
    with fp8 compute they multiply through `torch._scaled_mm`, which has no backward."""
    cast_linear = comfy.ops.manual_cast.Linear
    return [module for root in roots for module in root.modules()
            if isinstance(module, cast_linear) and hasattr(module, "scale_weight")]


@contextmanager
def differentiable_fp8_layers(roots: list[nn.Module]) -> Iterator[None]:
    """Inside the block, ComfyUI's fp8 Linear layers run the path ComfyUI takes without fp8 matrix multiplication
    (weight cast to the compute dtype per layer, times `scale_weight`, `F.linear`), through which gradients flow;
    the same numbers as ComfyUI's own path on devices without fp8 compute."""
    layers = fp8_matmul_layers(roots)

    def unfused(layer: nn.Module):
        def forward_comfy_cast_weights(input: torch.Tensor) -> torch.Tensor:
            weight, bias = comfy.ops.cast_bias_weight(layer, input)
            if layer.scale_weight is not None:
                weight = weight * layer.scale_weight.to(device=weight.device, dtype=weight.dtype)
            return nn.functional.linear(input, weight, bias)
        return forward_comfy_cast_weights

    for layer in layers:
        layer.forward_comfy_cast_weights = unfused(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward_comfy_cast_weights


def sd3_file_parts(model: Any) -> dict[str, list[FilePart]]:
    """ComfyUI's SD3 module path → the diffusers module(s) SD3 LoRA files name it by, from ComfyUI's own map
    (`comfy.utils.mmdit_to_diffusers`): fused qkv → to_q/to_k/to_v (add_*_proj for the context stream), each with its
    rows. Layers whose diffusers weight is reordered (the last context block's adaLN) have no file name."""
    parts: dict[str, list[FilePart]] = {}
    reordered = set()
    mapping = comfy.utils.mmdit_to_diffusers(model.model.model_config.unet_config, output_prefix="diffusion_model.")
    for diffusers, target in mapping.items():
        if not diffusers.endswith(".weight"):
            continue
        module = f"transformer.{diffusers[:-len('.weight')]}"
        key, rows = (target, None) if isinstance(target, str) else target[:2]
        path = key[len("diffusion_model."):-len(".weight")]
        if not isinstance(target, str) and (len(target) != 2 or rows[0] != 0):  # (key, None, swap_scale_shift)
            reordered.add(path)
            continue
        parts.setdefault(path, []).append((module, None if rows is None else (rows[1], rows[2])))
    return {path: sorted(found, key=lambda part: part[1] or (0, 0)) for path, found in parts.items()
            if path not in reordered}


IN_PLACE_INPUT_BLOCKS = frozenset({"DoubleStreamBlock", "SingleStreamBlock"})


@contextmanager
def copied_block_inputs(roots: list[nn.Module]) -> Iterator[None]:
    """Flux's blocks add into their own inputs (`img += …`, `x += …`); gradient checkpointing saves a block's inputs
    to recompute it, so each such block works on a copy of its streams. Outputs are unchanged."""
    blocks = [block for root in roots for block in root.modules() if type(block).__name__ in IN_PLACE_INPUT_BLOCKS]

    def copying(forward):
        def forward_on_copies(*args, **kwargs):
            args = (args[0].clone(), *args[1:]) if args else args
            kwargs.update({name: kwargs[name].clone() for name in ("img", "txt") if name in kwargs})
            return forward(*args, **kwargs)
        return forward_on_copies

    for block in blocks:
        block.forward = copying(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@contextmanager
def sampled_posterior(vae: Any) -> Iterator[None]:
    """Inside the block the VAE samples its diagonal-Gaussian posterior, as lora_core, kohya and diffusers encode
    training images: ComfyUI 0.3.64's VAE returns the posterior mean (`DiagonalGaussianRegularizer(sample=False)`),
    the 2024 one samples. A VAE without such a posterior encodes as it is, with a warning."""
    regularizer = getattr(vae.first_stage_model, "regularization", None)
    if not hasattr(regularizer, "sample"):
        if type(vae.first_stage_model).__name__ not in _WARNED_DETERMINISTIC_VAES:
            _WARNED_DETERMINISTIC_VAES.add(type(vae.first_stage_model).__name__)
            logging.warning("LoRA Lab: this VAE (%s) has no posterior to sample; training latents are its encoder's "
                            "deterministic output", type(vae.first_stage_model).__name__)
        yield
        return
    sampling = regularizer.sample
    regularizer.sample = True
    try:
        yield
    finally:
        regularizer.sample = sampling


_WARNED_DETERMINISTIC_VAES: set[str] = set()


class ComfyBackend(TrainingBackend):
    """Trains MODEL's denoiser through its patched `model_sampling`; encodes with the given VAE and CLIP."""

    def __init__(self, model: Any, clip: Any, vae: Any = None, sample_size: int = 512,
                 guidance: float = FLUX.training_guidance, edit_prompt: str | None = None) -> None:
        """`edit_prompt`: how the text encoder sees edit pairs' references, for a family whose encoder sees them
        (Qwen-Image-Edit: the ComfyUI prompt node the workflow uses); None: the family's first."""
        self.spec, self.prediction_type = trainable_family(model)
        self.family = model_family(model)
        self.model, self.clip, self.vae, self.sample_size = model, clip, vae, sample_size
        self.base_model = model.model
        self.unet = model.model.diffusion_model
        self.sampling = model_sampling(model)
        self.device = comfy.model_management.get_torch_device()
        has_guidance = self.spec.guidance and model.model.model_config.unet_config.get("guidance_embed", False)
        if guidance != FLUX.training_guidance and not has_guidance:
            raise ComfyBackendError(f"flux_guidance {guidance} sets the embedded guidance input of Flux.1-dev and "
                                    f"HunyuanVideo; {self.family} has none, so leave it at {FLUX.training_guidance}")
        self.guidance = guidance if has_guidance else None
        self.frames = getattr(model.model.latent_format, "latent_dimensions", 2) == 3  # video latents [B, C, F, H, W]
        self.video = self.spec.frame_step > 0  # clips train; else (Qwen-Image) images as one-frame latents, axis dropped
        self.reference_images = self.spec.reference_images  # Flux.1 Kontext's, as ReferenceLatent gives them
        prompts = self.spec.edit_prompts
        self.edit_prompt = prompts.get(edit_prompt or next(iter(prompts), None))
        if prompts and self.edit_prompt is None:
            raise ComfyBackendError(f"edit_prompt {edit_prompt!r} is not one of {', '.join(prompts)}")
        if self.edit_prompt is not None:  # Qwen-Image-Edit: Qwen2.5-VL sees the references with the caption
            self.reference_images, self.text_sees_references = self.edit_prompt.references, True
        elif edit_prompt not in (None, EDIT_PROMPT.widget.default):
            raise ComfyBackendError(f"edit_prompt {edit_prompt!r} sets how Qwen-Image-Edit's text encoder sees "
                                    f"reference images; {self.family}'s sees none, so leave it at "
                                    f"{EDIT_PROMPT.widget.default}")
        self._unet_names = denoiser_layer_names(model, self.spec)
        self._text_names = text_encoder_layer_names(clip, self.spec)
        self._file_parts: dict[str, list[FilePart]] = {}  # network name → file module name(s), for diffusers files
        self._file_aliases: dict[str, str] = {}  # other trainers' kohya names of the file's layers → network name
        self._aliases: list = []  # training()'s trainable aliases of ComfyUI's weights
        self._swap_bytes = 0  # what block_swap has ComfyUI keep off the device, while it lasts
        if self.spec.file_module_prefix:  # <prefix><the layer's name in files>: ComfyUI's path (Wan; HiDream's, which
            # is diffusers' path too) or HunyuanVideo's own names over ComfyUI's Flux layers
            files = {name: self.spec.file_path(path) for path, name in self._unet_names.items()}
            self._file_parts = {name: [(f"{self.spec.file_module_prefix}{path}", None)] for name, path in files.items()}
            self._file_aliases = {kohya_name(UNET_PREFIX, path): name for name, path in files.items()
                                  if kohya_name(UNET_PREFIX, path) != name}  # musubi-tuner's HunyuanVideo names
        elif self.spec.diffusers_files:
            parts = sd3_file_parts(model)
            self._unet_names = {path: name for path, name in self._unet_names.items() if path in parts}
            self._file_parts = {
                **{name: parts[path] for path, name in self._unet_names.items()},
                **{name: [(f"text_encoder.{path[path.index('text_model.'):]}", None)]
                   for path, name in self._text_names.items()},
            }

    @contextmanager
    def training(self, train_text_encoder: bool) -> Iterator[None]:
        """The denoiser (and CLIP, if its LoRA trains) loaded on the compute device with the MODEL's patches,
        trainable without a second copy of any weight; the models are as they were after the block.

        Loading outside inference mode (as ComfyUI's own TrainLoraNode does) makes every weight that ComfyUI moves
        or patches an ordinary tensor; those it leaves in place get trainable aliases. CLIP's weights get aliases
        even when only the denoiser loads, so a LoRA with text-encoder layers trains whatever the flag says."""
        patchers = [self.model] + ([self.clip.patcher] if train_text_encoder else [])
        with torch.inference_mode(False), torch.no_grad():  # patching (fp8 stochastic rounding too) needs no graph
            comfy.model_management.load_models_gpu(patchers)
        modules = self.frozen_modules()
        with (trainable_weights(modules) as self._aliases, copied_norm_inputs(modules), copied_block_inputs(modules),
              differentiable_fp8_layers(modules)):
            yield

    def objective(self, config: TrainingConfig) -> Objective:
        """ε/v on the discrete schedule; for SD3 and Flux flow matching whose σ follow the MODEL's own (patched)
        `model_sampling`, or a fixed `flow_shift` where one is set."""
        if not self.spec.flow:
            return super().objective(config)
        config.check_flow_matching(self.family)
        fixed = {} if config.flow_shift is None else {"shift": config.flow_shift}
        return FlowMatchingObjective(
            timestep_multiplier=1, sampling=config.timestep_sampling or self.spec.sigma_sampling,
            logit_mean=config.logit_mean, logit_std=config.logit_std, mode_scale=config.mode_scale,
            weighting=config.loss_weighting, schedule=None if fixed else self.model_sigma, **fixed,
            precondition_outputs=(self.spec.precondition_outputs if config.precondition_outputs is None
                                  else config.precondition_outputs), sigma_range=(config.min_sigma, config.max_sigma))

    def model_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The MODEL's own σ at the fraction `sigma` of its schedule: SD3's shift (ModelSamplingSD3), Flux's μ
        (ModelSamplingFlux), schnell's identity."""
        return self.sampling.sigma(sigma * getattr(self.sampling, "multiplier", 1.0)).to(sigma)

    def alphas_cumprod(self) -> torch.Tensor:
        if self.spec.flow:
            return super().alphas_cumprod()
        return 1.0 / (1.0 + self.sampling.sigmas.float() ** 2)

    def compute_dtype(self) -> torch.dtype:
        """The dtype ComfyUI casts fp8/other stored weights to per layer, else the weights' own (Flux built without
        a dtype reports None: its parameters tell)."""
        return (getattr(self.base_model, "manual_cast_dtype", None) or self.base_model.get_dtype()
                or next(self.unet.parameters()).dtype)

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents [B, C, H, W] as the diffusion model sees them (`process_latent_in`). A model of video latents
        gets each image (or clip [3, F, H, W]) encoded alone, as a video (a batch would be one video): a video family
        keeps the latents [B, C, F', H, W]; Qwen-Image's one-frame latents lose the frame axis after
        `process_latent_in`, and `predict` puts it back."""
        if self.vae is None:
            raise ComfyBackendError("a VAE is needed to encode the dataset; connect one to Train LoRA")
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel between images
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        images = (pixels.movedim(1, -1) + 1) / 2
        # the posterior is sampled from the global generators; manual_seed reseeds the CPU's and every CUDA device's,
        # so all of them are restored afterwards
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda_devices), sampled_posterior(self.vae):
            torch.manual_seed(seed)
            if not self.frames:
                return self.base_model.process_latent_in(self.vae.encode(images).to(self.device))
            latents = [self.vae.encode(image if image.dim() == 4 else image[None]).to(self.device) for image in images]
        frames = [self.base_model.process_latent_in(latent if latent.dim() == 5 else latent[:, :, None])
                  for latent in latents]
        return torch.cat(frames if self.video else [frame[:, :, 0] for frame in frames])

    def encode_reference_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of edit pairs' reference images as VAEEncode gives ReferenceLatent (the VAE's own encoding: the
        posterior's mean in ComfyUI 0.3.64) and the model's extra_conds process them; one-frame video latents
        (Qwen-Image-Edit's) encoded one by one, the frame axis dropped as `encode_images` drops it."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        images = (pixels.movedim(1, -1) + 1) / 2
        if not self.frames:
            return self.base_model.process_latent_in(self.vae.encode(images).to(self.device))
        latents = [self.vae.encode(image[None]).to(self.device) for image in images]
        return torch.cat([self.base_model.process_latent_in(latent if latent.dim() == 5 else latent[:, :, None])[:, :, 0]
                          for latent in latents])

    def encode_text(self, captions: list[str]) -> Conditioning:
        """The CLIP output and its pooled output (SDXL's CLIP-G, SD3's CLIP-L+G, Flux's CLIP-L; Qwen-Image has none)
        per caption, with a mask of each caption's tokens: Qwen2.5-VL's outputs differ in length, and `predict`
        gives the model each one unpadded, as ComfyUI's samplers do. Each caption is encoded inside the family's
        template (Lumina 2's system prompt, as CLIPTextEncodeLumina2 builds it)."""
        parts = []
        for caption in captions:
            tokens = self.clip.tokenize(self.spec.caption_template.format(caption))
            extras = {}
            if self.spec.text_extras:  # HiDream's Llama states: what the encoder returns besides context and pooled
                output = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
                context, pooled = output["cond"], output["pooled_output"]
                extras = {name: output[name] for name in self.spec.text_extras}
            else:
                context, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            parts.append({"context": context, "context_mask": torch.ones(context.shape[:2], dtype=torch.long),
                          **({"pooled": pooled} if pooled is not None else {}), **extras})
        return {name: value.to(self.device) for name, value in concatenated(parts).items()}

    def check_clip_frames(self, frames: int) -> None:
        if not self.video:
            super().check_clip_frames(frames)
        check_frame_step(self.spec, frames)

    def encode_text_with_references(self, captions: list[str], references: list[list[torch.Tensor]]) -> Conditioning:
        """Each caption with its pair's reference images through ComfyUI's own prompt node of the edit prompt
        (TextEncodeQwenImageEditPlus: "Picture N:" and each image at 384² px for the vision tower;
        TextEncodeQwenImageEdit: 1 MP), the images as that node gets them from LoadImage; no VAE, so the node adds no
        reference latents (the trainer passes them)."""
        node = getattr(importlib.import_module(self.edit_prompt.comfy_module), self.edit_prompt.comfy_node)
        parts = []
        for caption, images in zip(captions, references):
            comfy.model_management.throw_exception_if_processing_interrupted()
            inputs = {name: ((pixels.movedim(0, -1)[None].float().cpu() + 1) * 127.5).round() / 255  # LoadImage's
                      for name, pixels in zip(self.edit_prompt.comfy_images, images)}
            ((context, _),) = node.execute(clip=self.clip, prompt=caption, vae=None, **inputs).args[0]
            parts.append({"context": context, "context_mask": torch.ones(context.shape[:2], dtype=torch.long)})
        return {name: value.to(self.device) for name, value in concatenated(parts).items()}

    def model_conditions(self, noisy_latents: torch.Tensor, conditioning: Conditioning) -> dict[str, torch.Tensor]:
        """The diffusion model's inputs besides x and t, built by `BaseModel.extra_conds` per sample as the samplers
        build them from a CONDITIONING: SDXL's ADM `y` from the pooled output and each image's size and crop, SD3's
        and Flux's pooled `y`, Flux's guidance, Lumina 2's token count (from the caption's mask)."""
        device, sizes = noisy_latents.device, conditioning.get(SIZE_CONDITIONING)
        samples = []
        for index in range(len(noisy_latents)):
            one = slice(index, index + 1)
            extra = {"pooled_output": conditioning["pooled"][one] if "pooled" in conditioning else None}
            if sizes is not None:  # [orig h, orig w, crop top, crop left, target h, target w]
                height, width, crop_h, crop_w, target_height, target_width = sizes[index].tolist()
                extra.update(height=height, width=width, crop_h=crop_h, crop_w=crop_w, target_height=target_height,
                             target_width=target_width)
            if self.spec.guidance:
                extra["guidance"] = self.guidance
            extra.update({name: conditioning[name][one] for name in self.spec.text_extras if name in conditioning})
            if self.spec.text_mask_condition:  # without a mask every token of the context counts
                mask = conditioning.get("context_mask")
                extra["attention_mask"] = (mask[one] if mask is not None else
                                           torch.ones(1, conditioning["context"].shape[1], dtype=torch.long))
            conds = self.base_model.extra_conds(cross_attn=conditioning["context"][one], noise=noisy_latents[one],
                                                device=device, **extra)
            samples.append({name: cond.process_cond(batch_size=1, device=device).cond for name, cond in conds.items()})
        return {name: batched([sample[name] for sample in samples], device) for name in samples[0]}

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The diffusion model's raw output (ε, v or the flow velocity) as `BaseModel.apply_model` computes it before
        converting it to x0. Discrete: `times` are timestep indices; for x = x0 + σ_t·ε, ComfyUI's
        `calculate_input(σ_t, x)` is exactly `noisy_latents`. Flow: `times` are σ and `noisy_latents` is
        `noise_scaling(σ, ε, x0)`, which CONST's `calculate_input` passes as it is. The time input is
        `model_sampling.timestep(σ)`; patches come from the MODEL's transformer_options."""
        mask = conditioning.get("context_mask")
        if mask is not None and not bool(mask.all()):  # captions of different lengths: each alone, unpadded
            return torch.cat([self.predict(noisy_latents[index:index + 1], times[index:index + 1], {
                name: value[index:index + 1, :int(mask[index].sum())] if name in ("context", "context_mask")
                else value[index:index + 1] for name, value in conditioning.items()})
                for index in range(len(noisy_latents))])
        if self.frames and not self.video:  # one-frame video latents: the frame axis back
            return self.predict_frames(noisy_latents[:, :, None], times, conditioning)[:, :, 0]
        return self.predict_frames(noisy_latents, times, conditioning)

    def predict_frames(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning
                       ) -> torch.Tensor:
        """`predict` on latents of the model's own rank."""
        dtype, device = self.compute_dtype(), noisy_latents.device
        if self.spec.flow:
            sigmas = times.to(device, torch.float32)
        else:
            sigmas = self.sampling.sigmas[times.to(self.sampling.sigmas.device)].to(device)
        conds = self.model_conditions(noisy_latents, conditioning)
        context = conds.pop("c_crossattn").to(dtype)
        extra = {name: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                 for name, value in conds.items()}
        if REFERENCE_LATENTS in conditioning:  # already through process_latent_in, as extra_conds puts them
            references = conditioning[REFERENCE_LATENTS]
            extra["ref_latents"] = [references[:, index, :, None] if self.frames else references[:, index]
                                    for index in range(references.shape[1])]
            extra["ref_latents"] = [reference.to(dtype) for reference in extra["ref_latents"]]
        options = {**self.model.model_options.get("transformer_options", {}), "sigmas": sigmas,
                   "cond_or_uncond": [0]}
        time = self.sampling.timestep(sigmas).float().to(device)
        return self.unet(noisy_latents.to(dtype), time, context=context, transformer_options=options, **extra).float()

    def weight_key(self, name: str) -> tuple[str, str]:
        """ComfyUI's patch key for the weight of kohya layer `name`, and whose patcher holds it: "model" or "clip"."""
        for path, layer_name in self._unet_names.items():
            if layer_name == name:
                return f"diffusion_model.{path}.weight", "model"
        for path, layer_name in self._text_names.items():
            if layer_name == name:
                return f"{path}.weight", "clip"
        raise ComfyBackendError(f"no layer of this model is called {name}")

    def file_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SD3: diffusers' names (`transformer.….lora_A/lora_B`, `text_encoder.…`) that diffusers and ComfyUI read,
        alpha folded into lora_B; ComfyUI's fused qkv split into to_q/to_k/to_v exactly. HiDream, Wan and
        HunyuanVideo: `diffusion_model.<the layer's name in files>.lora_A/lora_B`, alpha folded. Other families:
        kohya's."""
        if not self._file_parts:
            return tensors
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, _, suffix = key.partition(".")
            modules.setdefault(name, {})[suffix] = value
        out = {}
        for name, parts in modules.items():
            pieces = self._file_parts.get(name, [(name, None)])
            if "lora_down.weight" in parts:
                for module, split in split_lora(parts, pieces).items():
                    out |= {f"{module}.{suffix}": value for suffix, value in split.items()}
            elif len(pieces) == 1:  # LyCORIS tensors keep their suffixes (and alpha) under the diffusers name
                out |= {f"{pieces[0][0]}.{suffix}": value for suffix, value in parts.items()}
            else:
                raise ComfyBackendError(f"{name} is q, k and v fused in ComfyUI's {self.family}, which SD3 files name "
                                        "apart; only a LoRA splits into them exactly: train this layer with "
                                        "algorithm lora")
        return out

    def network_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`file_tensors` undone: diffusers' to_q/to_k/to_v fused back into ComfyUI's qkv (one lora_A if the pieces
        share it, else their ranks side by side), lora_A/lora_B as lora_down/lora_up at scale 1. Names that are not
        the family's file names (kohya-style checkpoints) pass as they are. Families whose files also come in other
        trainers' layouts (Qwen-Image's `diffusion_model.…lora_A`, musubi-tuner's HunyuanVideo names) get those
        renamed."""
        if not self._file_parts:
            return from_diffusers_naming(tensors, self.spec.file_prefixes) if self.spec.file_prefixes else tensors
        others = {prefix: name for prefix, name in self.spec.file_prefixes.items()
                  if prefix != self.spec.file_module_prefix}  # HiDream's files in diffusers' naming
        tensors = from_diffusers_naming(tensors, others) if others else tensors
        owners = {module: (name, rows) for name, pieces in self._file_parts.items() for module, rows in pieces}
        owners |= {alias: (name, None) for alias, name in self._file_aliases.items()}
        layers = self.loadable_modules()
        out, fused = {}, {}
        for key, value in tensors.items():
            module, _, suffix = key.rpartition(".")
            if suffix == "weight":  # lora_A.weight, lora_B.weight, hada_w1_a.weight…
                module, _, leaf = module.rpartition(".")
                suffix = f"{leaf}.weight"
            if module not in owners:
                out[key] = value
                continue
            name, rows = owners[module]
            if rows is None:
                suffixes = {file: network for network, file in DIFFUSERS_SUFFIXES.items()}
                out[f"{name}.{suffixes.get(suffix, suffix)}"] = value
            else:
                fused.setdefault(name, {}).setdefault(rows, {})[suffix] = value
        for name, pieces in fused.items():
            out_features = layers[name].weight.shape[0] if name in layers else sum(size for _, size in pieces)
            out |= {f"{name}.{suffix}": value
                    for suffix, value in fused_lora(sorted(pieces.items()), out_features).items()}
        return out

    def check_algorithm(self, algorithm: str, names: list[str]) -> None:
        """Refuse, before training, an algorithm whose adapters this family's files cannot hold."""
        fused = [name for name in names if len(self._file_parts.get(name, ())) > 1]
        if fused and algorithm != "lora":
            raise ComfyBackendError(
                f"{algorithm} cannot train {fused[0]} (and {len(fused) - 1} more): ComfyUI's {self.family} fuses q, k "
                "and v into one layer, which SD3 files name apart as diffusers does, and only a LoRA splits into them "
                "exactly; use algorithm lora")

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        if preset not in self.spec.comfy_presets:
            raise ComfyBackendError(f"unknown target {preset!r} for {self.family}; choose one of "
                                    f"{sorted(self.spec.comfy_presets)}")
        if text_encoder and not self.spec.text_encoders:
            raise ComfyBackendError(f"{self.family}'s text encoders are never trained (their outputs are encoded once "
                                    "and cached); turn train_text_encoder off")
        layers = find_targets(self.unet, self.spec.comfy_presets[preset])
        targets = {self._unet_names[path]: module for path, module in layers.items() if path in self._unet_names}
        if text_encoder:
            clip_layers = find_targets(self.clip.cond_stage_model, TEXT_ENCODER_PRESET)
            targets.update({self._text_names[path]: module for path, module in clip_layers.items()
                            if path in self._text_names})
        return targets

    def loadable_modules(self) -> dict[str, nn.Module]:
        unet_layers = all_adaptable(self.unet)
        clip_layers = all_adaptable(self.clip.cond_stage_model) if self.clip is not None else {}
        return {**{name: unet_layers[path] for path, name in self._unet_names.items()},
                **{name: clip_layers[path] for path, name in self._text_names.items()}}

    def frozen_modules(self) -> list[nn.Module]:
        return [self.unet] + ([self.clip.cond_stage_model] if self.clip is not None else [])

    def parkable_modules(self) -> list[nn.Module]:
        return []  # ComfyUI's model management places its models

    def saved_activations(self) -> float | None:
        return self.spec.saved_activations if self.spec.flow else None  # the flow families' denoisers are transformers

    def unet_activations(self) -> tuple[float, float] | None:
        return None if self.spec.flow else self.spec.unet_activations

    def checkpoint_blocks(self) -> list[nn.Module]:
        blocks = [getattr(self.unet, name) for name in self.spec.comfy_blocks]
        return [block for group in blocks for block in (group if isinstance(group, nn.ModuleList) else [group])]

    def check_block_swap(self, count: int, checkpointing: bool, algorithm: str) -> None:
        """The count in range, a ComfyUI that unloads partially, gradient checkpointing on (see below), and no DoRA."""
        check_swap_count(self.checkpoint_blocks(), count)
        if algorithm == "dora":
            raise ComfyBackendError("blocks_to_swap in ComfyUI does not train DoRA: DoRA normalizes by the base "
                                    "weight, and ComfyUI keeps a swapped layer's weight on the host, unpatched, "
                                    "casting it only inside the layer; train DoRA without swap, or LoRA/LoHa/LoKr "
                                    "with it")
        if not hasattr(self.model, "partially_unload"):
            raise ComfyBackendError("blocks_to_swap needs ComfyUI's partial loading (ModelPatcher.partially_unload, in "
                                    "ComfyUI since mid-2024); this ComfyUI has none: update it, or set blocks_to_swap "
                                    "0 and save memory with fp8 weights or gradient_checkpointing")
        if not checkpointing:
            raise ComfyBackendError("blocks_to_swap in ComfyUI needs gradient_checkpointing on: ComfyUI casts each "
                                    "swapped layer's weight to a device copy per use, and without recomputation "
                                    "autograd keeps every copy until the backward, so no memory would be saved")

    @contextmanager
    def block_swap(self, count: int, checkpointing: bool) -> Iterator[None]:
        """ComfyUI's own partial loading frees as many bytes of the denoiser's weights as its last `count` blocks hold
        (its smallest layers first, ComfyUI's order) and casts those layers to the device per use, patches
        included; ComfyUI's model management loads them again when it next needs the model whole. The loop has
        `check_block_swap`ed the count first."""
        if not count:
            yield
            return
        self._swap_bytes = frozen_bytes(self.checkpoint_blocks()[-count:])
        freed = self.unload_for_swap()
        cast = sum(1 for module in self.unet.modules() if getattr(module, "comfy_patched_weights", None) is False)
        logging.info("LoRA Lab: blocks_to_swap %d: ComfyUI left %.2f GiB of the denoiser's weights (%d blocks hold "
                     "%.2f GiB) in host memory and casts %d layers per use", count, freed / 2**30, count,
                     self._swap_bytes / 2**30, cast)
        try:
            yield
        finally:
            self._swap_bytes = 0

    def unload_for_swap(self) -> int:
        """ComfyUI's partial unloading of the swap's bytes (again after a sample, whose load brought them back);
        the device copies the trainable aliases still held are let go. Returns the bytes ComfyUI freed."""
        with torch.inference_mode():  # as ComfyUI's model management runs
            freed = self.model.partially_unload(self.model.offload_device, self._swap_bytes)
        release_moved(self._aliases)
        return freed

    def vae_fingerprint(self) -> str:
        return data_hash(self.vae.first_stage_model.state_dict())

    def conditioning(self, text: str) -> list:
        """ComfyUI's CONDITIONING for `text`, as the family's prompt node makes it (CLIPTextEncode; Lumina 2's
        CLIPTextEncodeLumina2 with its system prompt), with what the encoder returns beside the context (pooled
        output; Lumina 2's attention mask) where this ComfyUI returns it."""
        tokens = self.clip.tokenize(self.spec.caption_template.format(text))
        if hasattr(self.clip, "encode_from_tokens_scheduled"):  # ComfyUI 0.3.x: CLIPTextEncode's own call
            return self.clip.encode_from_tokens_scheduled(tokens)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    def sample_images(self, prompts: list[str], seed: int, steps: int) -> list:
        """KSampler (euler, the family's usual cfg and scheduler) and VAE Decode, as the core nodes do it, with the
        LoRA attached; a video family's clips of `sample_frames` frames (4k+1: one latent frame per 4). KSampler's
        load brings swapped layers back: the swap is made again afterwards."""
        try:
            return self.sampled_images(prompts, seed, steps)
        finally:
            if self._swap_bytes:
                self.unload_for_swap()

    def sampled_images(self, prompts: list[str], seed: int, steps: int) -> list:
        """`sample_images` without the swap's care."""
        from PIL import Image

        import nodes as comfy_nodes  # ComfyUI's own nodes module

        compression = getattr(self.vae, "spacial_compression_encode", lambda: 8)()  # 16 for Wan 2.2's VAE
        size = self.sample_size // compression
        channels = getattr(self.base_model.latent_format, "latent_channels", 4)
        images = []
        for prompt in prompts:
            comfy.model_management.throw_exception_if_processing_interrupted()  # KSampler checks between its steps
            frames = [(self.sample_frames - 1) // self.spec.frame_step + 1] if self.video else []
            latent = {"samples": torch.zeros(1, channels, *frames, size, size)}
            (sampled,) = comfy_nodes.common_ksampler(self.model, seed, steps, self.spec.sample_cfg, "euler",
                                                     self.spec.sample_scheduler, self.conditioning(prompt),
                                                     self.conditioning(""), latent)
            decoded = self.vae.decode(sampled["samples"])  # [B, H, W, 3], or [B, frames, H, W, 3] for a video VAE
            pixels = (decoded.reshape(-1, *decoded.shape[-3:]).clamp(0, 1) * 255).round().byte().cpu().numpy()
            clip = [Image.fromarray(frame) for frame in pixels]
            images.append(clip if self.video and self.sample_frames > 1 else clip[0])
        return images

    def model_info(self) -> dict[str, str]:
        return {"version": self.spec.version}
