"""Qwen-Image with diffusers' QwenImagePipeline: an MMDiT over 2×2-packed latents of a Wan-style VAE (one frame,
normalized by the VAE's latents_mean/std), conditioned on Qwen2.5-VL's last hidden states after the prompt template
(never trained: encoded once and cached), σ as the time input, the scheduler's resolution-dependent shift.

Qwen-Image-Edit (QwenImageEditPipeline) and Qwen-Image-Edit-2509 and later (QwenImageEditPlusPipeline) train on edit
pairs: each reference image's latents (the posterior's mean, normalized) follow the noisy image's tokens at frame
index 1, 2… and the text encoder sees the reference images with the caption, as each pipeline's prompt template
puts them (`EDIT_PROMPTS`); that encoding is cached per image, not per caption.

Files use kohya's names over the transformer's own layer paths (`lora_unet_transformer_blocks_0_attn_to_q`), as
musubi-tuner writes them: ComfyUI's layer names are diffusers', so its key map reads them, and diffusers'
`load_lora_weights` converts them. Files in the layout other trainers share (`diffusion_model.<path>.lora_A/lora_B`,
ai-toolkit, diffusion-pipe; `transformer.<path>`, diffusers) load too."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..backend import REFERENCE_LATENTS, Conditioning, concatenated
from ..settings import Setting, Widget
from ..targets import TargetError
from ..training.objectives import FlowMatchingObjective
from .family import DIFFUSERS_JOINT_ATTENTION, BlockLayout, Family
from .flow import FlowBackend, flow_objective, from_diffusers_naming, transformer_presets

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

QWEN_BLOCKS = frozenset({"QwenImageTransformerBlock"})  # diffusers' and ComfyUI's class, with the same layer names
QWEN_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out")
QWEN_MLP = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
QWEN_PRESETS = transformer_presets(
    QWEN_BLOCKS, QWEN_ATTENTION, QWEN_MLP, "q/k/v/out of every block's joint attention (image and text streams)",
    "every Linear of every block, the img_mod/txt_mod modulation included (musubi-tuner leaves it out by default)")


@dataclass(frozen=True)
class EditPrompt:
    """How Qwen-Image-Edit's text encoder sees an edit pair's reference images: as one diffusers pipeline and one
    ComfyUI prompt node put them in the prompt, each reference resized to `vision_area` pixels (its aspect kept)
    for the vision tower."""

    pipeline: str  # the diffusers pipeline whose encode_prompt builds it
    comfy_node: str  # the ComfyUI node (in `comfy_module`) that encodes prompts so
    comfy_images: tuple[str, ...]  # that node's image inputs, in order: the most reference images it takes
    vision_area: int
    models: str  # the models made for it, in words
    comfy_module: str = "comfy_extras.nodes_qwen"

    @property
    def references(self) -> int:
        return len(self.comfy_images)


EDIT_PROMPTS = {
    "edit_plus": EditPrompt("QwenImageEditPlusPipeline", "TextEncodeQwenImageEditPlus", ("image1", "image2", "image3"),
                            384 * 384, "Qwen-Image-Edit-2509 and later"),
    "edit": EditPrompt("QwenImageEditPipeline", "TextEncodeQwenImageEdit", ("image",), 1024 * 1024, "Qwen-Image-Edit"),
}
QWEN_IMAGE = Family(
    "Qwen-Image", "qwen_image", "Qwen-Image", __name__, "QwenImageBackend",
    ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"),
    {"QwenImage": "Qwen-Image"}, "QwenImageTransformer2DModel", ("transformer_blocks",), QWEN_PRESETS, QWEN_PRESETS,
    {},
    BlockLayout("Qwen-Image", groups=("T",), patterns=(
        (re.compile(r"lora_unet_transformer_blocks_(\d+)(_|$)"), "T"),
        (re.compile(r"(?:transformer|diffusion_model)\.transformer_blocks\.(\d+)\."), "T"))),
    flow=True, patched_input=4, reference_images=3, edit_prompts=EDIT_PROMPTS, sample_cfg=2.5,
    sample_scheduler="simple",
    # diffusers'; ai-toolkit's, diffusion-pipe's and ComfyUI-converted musubi-tuner files
    file_prefixes={"transformer.": "lora_unet_", "diffusion_model.": "lora_unet_"},
    file_markers=(r"transformer_blocks_\d+_(img|txt)_(mlp|mod)", DIFFUSERS_JOINT_ATTENTION))


EDIT_PROMPT = Setting(
    "edit_prompt", str, None, "Qwen-Image-Edit edit pairs: how the text encoder sees each pair's reference images, as "
    "the prompt node you will generate with: " + "; ".join(
        f"{key} as {prompt.comfy_node} / {prompt.pipeline} ({prompt.models}: up to {prompt.references}, seen at "
        f"{round(prompt.vision_area ** 0.5)}² px)" for key, prompt in EDIT_PROMPTS.items()) + ".",
    choices=(None, *EDIT_PROMPTS), families=QWEN_IMAGE.name,
    widget=Widget(choices=tuple(EDIT_PROMPTS), default="edit_plus",
                  note="ComfyUI cannot tell the edit models apart: choose the node your workflow encodes prompts with."))


def find_edit_prompt(name: str | None, pipeline: str | None = None) -> EditPrompt:
    """The edit prompt `name`, or (None) the one of `pipeline`; an unknown name is refused with the choices."""
    if name is None:
        name = next(key for key, prompt in EDIT_PROMPTS.items() if prompt.pipeline == pipeline)
    if name not in EDIT_PROMPTS:
        raise ValueError(f"edit_prompt {name!r} is not one of {', '.join(EDIT_PROMPTS)}: "
                         + "; ".join(f"{key} encodes as {prompt.comfy_node} ({prompt.models})"
                                     for key, prompt in EDIT_PROMPTS.items()))
    return EDIT_PROMPTS[name]


def as_pil(pixels: torch.Tensor) -> Any:
    """[3, H, W] pixels in [-1, 1] (a dataset's uint8 image, exactly) as the PIL image the pipelines take."""
    from PIL import Image

    image = ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(image.movedim(0, -1).cpu().numpy())


class QwenImageBackend(FlowBackend):
    """QwenImagePipeline for training: the trainer sees one-frame latents as [B, 16, H, W]; `predict` packs them 2×2
    as the pipeline does. Text conditioning is the prompt's hidden states with their mask (captions differ in
    length; batches are zero-padded, and the mask keeps padding out of attention, as the pipeline batches prompts)."""

    family = QWEN_IMAGE.name
    spec = QWEN_IMAGE
    presets = QWEN_PRESETS
    sample_guidance = None  # the pipeline's true CFG needs a negative prompt; samples are drawn without it
    max_sequence_length = 512  # text tokens after the template, the pipeline's default

    def objective(self, config: TrainingConfig) -> FlowMatchingObjective:
        """Logit-normal σ shifted as the pipeline's scheduler shifts it: by resolution (μ from base_shift at
        base_image_seq_len to max_shift at max_image_seq_len image tokens: 0.5–0.9 over 256–8192 for Qwen-Image)
        or by its fixed shift; σ itself is the transformer's time input (the pipeline passes timestep / 1000)."""
        scheduler = self.pipeline.scheduler.config
        if not scheduler.use_dynamic_shifting:
            return flow_objective(config, QWEN_IMAGE, 1, scheduler.shift)
        return flow_objective(config, QWEN_IMAGE, 1, None, scheduler.base_shift, scheduler.max_shift,
                              (scheduler.base_image_seq_len, scheduler.max_image_seq_len))

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "", edit_prompt: str | None = None) -> None:
        """`edit_prompt` (edit pipelines only): how the text encoder sees the references; None: the pipeline's own."""
        super().__init__(pipeline, name, model_hash)
        self.text_pipeline = pipeline  # prompts without images, and samples
        self.edit_prompt = self.edit_pipeline = None
        if type(pipeline).__name__ in (prompt.pipeline for prompt in EDIT_PROMPTS.values()):
            import diffusers

            components = {key: value for key, value in pipeline.components.items() if key != "processor"}
            self.text_pipeline = diffusers.QwenImagePipeline(**components)
            self.text_pipeline.set_progress_bar_config(disable=True)
            self.edit_prompt = find_edit_prompt(edit_prompt, type(pipeline).__name__)
            self.edit_pipeline = getattr(diffusers, self.edit_prompt.pipeline)(**pipeline.components)
            self.reference_images = self.edit_prompt.references
            self.text_sees_references = True
        elif edit_prompt is not None:
            raise ValueError(f"edit_prompt sets how Qwen-Image-Edit's text encoder sees reference images; a "
                             f"{type(pipeline).__name__} has no image input: load Qwen-Image-Edit (QwenImageEditPipeline "
                             "or QwenImageEditPlusPipeline), or leave edit_prompt unset")

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(z − latents_mean) / latents_std of each image as a one-frame video, the frame axis dropped."""
        frames = pixels.to(self.vae.device, self.vae.dtype)[:, :, None]
        return self.normalized(self.vae.encode(frames).latent_dist.sample(generator=generator))

    def encode_reference_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior's mean, normalized, as the edit pipelines encode their input images."""
        frames = pixels.to(self.vae.device, self.vae.dtype)[:, :, None]
        return self.normalized(self.vae.encode(frames).latent_dist.mode())

    def normalized(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return ((latents - mean) / std)[:, :, 0]

    def encode_text(self, captions: list[str]) -> Conditioning:
        context, mask = self.text_pipeline.encode_prompt(captions, device=self.text_encoder.device,
                                                         max_sequence_length=self.max_sequence_length)
        return self.text_conditioning(context, mask)

    def encode_text_with_references(self, captions: list[str], references: list[list[torch.Tensor]]) -> Conditioning:
        """Each caption with its pair's reference images as the edit pipeline encodes its prompt and images: each
        reference resized (Lanczos, sides multiples of 32) to the edit prompt's vision area, its aspect kept."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        pipeline, parts = self.edit_pipeline, []
        for caption, images in zip(captions, references):
            seen = []
            for pixels in images:
                width, height, *_ = calculate_dimensions(self.edit_prompt.vision_area, pixels.shape[-1] / pixels.shape[-2])
                seen.append(pipeline.image_processor.resize(as_pil(pixels), height, width))
            context, mask = pipeline.encode_prompt(caption, image=seen if len(seen) > 1 else seen[0],
                                                   device=self.text_encoder.device)
            parts.append(self.text_conditioning(context, mask))
        return concatenated(parts)

    @staticmethod
    def text_conditioning(context: torch.Tensor, mask: torch.Tensor | None) -> Conditioning:
        if mask is None:  # every caption as long as the longest
            mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
        return {"context": context, "context_mask": mask}

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's velocity for 2×2-packed latents with the pipeline's img_shapes; σ goes in as fp32. Edit
        pairs' reference latents follow the image's tokens, one img_shape (frame 1, 2…) each, and the output is sliced
        to the image's tokens, as the edit pipelines do."""
        from diffusers import QwenImagePipeline

        batch, channels, height, width = noisy_latents.shape
        self.check_packable(height, width)
        dtype = self.transformer.dtype
        packed = QwenImagePipeline._pack_latents(noisy_latents.to(dtype), batch, channels, height, width)
        tokens, shapes = packed.shape[1], [(1, height // 2, width // 2)]
        references = conditioning.get(REFERENCE_LATENTS)  # [B, R, C, h, w]
        for index in range(0 if references is None else references.shape[1]):
            reference = references[:, index].to(dtype)
            ref_height, ref_width = reference.shape[-2:]
            self.check_packable(ref_height, ref_width)
            packed = torch.cat([packed, QwenImagePipeline._pack_latents(reference, batch, channels, ref_height,
                                                                        ref_width)], 1)
            shapes.append((1, ref_height // 2, ref_width // 2))
        mask = conditioning["context_mask"]
        velocity = self.transformer(
            hidden_states=packed, timestep=times.float(), encoder_hidden_states=conditioning["context"].to(dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask, img_shapes=[shapes] * batch,
            return_dict=False,
        )[0][:, :tokens]
        scale = self.pipeline.vae_scale_factor
        return QwenImagePipeline._unpack_latents(velocity, height * scale, width * scale, scale)[:, :, 0]

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        if text_encoder:
            raise TargetError(f"{self.family}'s text encoder (Qwen2.5-VL) is not trained: its outputs are encoded once "
                              "and cached; train the transformer only (turn train_text_encoder off)")
        return self.denoiser_targets(preset)

    def loadable_modules(self) -> dict[str, nn.Module]:
        return self.denoiser_targets("full")

    @property
    def sample_pipeline(self) -> Any:
        """Text-to-image samples, an edit model's too (QwenImagePipeline over the same components), as Kontext's."""
        return self.text_pipeline

    def model_info(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.model_hash, "version": QWEN_IMAGE.version}

    def network_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Files in the shared `diffusion_model.`/`transformer.` layouts under the network's kohya names (lora_A/B as
        lora_down/up; without `.alpha` the scale is 1, as ComfyUI and diffusers apply them); kohya's as they are."""
        return from_diffusers_naming(tensors, QWEN_IMAGE.file_prefixes)
