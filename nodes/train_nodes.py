"""Load Dataset, Inject LoRA and Train LoRA: thin ComfyUI nodes over `lora_core`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.utils
import numpy as np
import torch
from PIL import Image, ImageDraw

from ..lora_core.data.config import (
    DATASET_SETTINGS,
    REGULARIZATION_FOLDER,
    DatasetConfig,
)
from ..lora_core.data.dataset import ImageFolderDataset
from ..lora_core.families import FLUX
from ..lora_core.families.qwen_image import EDIT_PROMPT
from ..lora_core.formats.files import LoRAWeights
from ..lora_core.formats.metadata import lora_metadata
from ..lora_core.network import LoRANetwork
from ..lora_core.network_config import NETWORK_SETTINGS, NetworkConfig
from ..lora_core.targets import TEXT_ENCODER_PREFIX
from ..lora_core.training.checkpoints import (
    CHECKPOINT_SETTINGS,
    Checkpointer,
    load_state,
)
from ..lora_core.training.config import FLOW_MATCHING_SETTINGS, TRAINING_SETTINGS, TrainingError
from ..lora_core.training.loop import StepReport, TrainingConfig, train
from ..lora_core.training.plots import loss_curve, smooth, sweep_chart
from ..lora_core.training.sweep import (
    SWEEP_SETTINGS,
    Variant,
    VariantResult,
    check_sweep,
    parse_sweep,
    validation_warning,
)
from ..lora_core.training.sweep import sweep as train_variants
from .comfy_backend import ComfyBackend, ComfyBackendError
from .patches import apply_lora
from .paths import (
    LATENT_CACHE_FOLDER,
    PathError,
    check_name,
    dataset_fingerprint,
    latent_cache_folder,
    list_dataset_folders,
    next_lora_path,
    resolve_dataset,
    resolve_lora,
    training_states,
)
from .progress import loss_history, send_event
from .widgets import setting_input as widget_input

CATEGORY = "LoRA Lab"
PREVIEW_IMAGES = 16
WIDGET_SETTINGS = {each.name: each for each in TRAINING_SETTINGS + CHECKPOINT_SETTINGS + DATASET_SETTINGS
                   + NETWORK_SETTINGS if each.widget is not None}


def setting_input(name: str) -> tuple:
    """ComfyUI's input of the declared setting `name`."""
    return widget_input(WIDGET_SETTINGS[name])


def to_image_batch(pictures: list) -> torch.Tensor:
    """PIL images → ComfyUI IMAGE [B, H, W, 3] floats in 0..1."""
    return torch.stack([torch.from_numpy(np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0) for p in pictures])


# Load Dataset's widgets in the order saved workflows hold them
DATASET_REQUIRED = ("resolution", "caption_extension", "default_caption", "token", "repeats", "flip")
DATASET_OPTIONAL = ("bucketing", "min_bucket_size", "max_bucket_size", "shuffle_tags", "keep_tokens", "caption_dropout",
                    "tag_dropout", "no_upscale")
DATASET_VIDEO = ("frames", "frame_stride", "target_fps", "frame_extraction", "frame_windows")  # after control_images


class LoadDataset:
    DESCRIPTION = "A folder of images with same-stem .txt captions, ready for Train LoRA."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_DATASET", "IMAGE")
    RETURN_NAMES = ("dataset", "preview")
    OUTPUT_TOOLTIPS = ("The dataset for Train LoRA.", f"Up to {PREVIEW_IMAGES} images as they will be trained on.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": (list_dataset_folders(), {"tooltip": "A subfolder of ComfyUI's input folder holding images and same-stem caption files; kohya-style N_name subfolders repeat their images N times."}),
            **{name: setting_input(name) for name in DATASET_REQUIRED},
        }, "optional": {
            **{name: setting_input(name) for name in DATASET_OPTIONAL},
            "regularization_folder": widget_input(REGULARIZATION_FOLDER, ["none", *list_dataset_folders()]),
            "regularization_caption": setting_input("regularization_caption"),
            "control_images": setting_input("control_images"),
            **{name: setting_input(name) for name in DATASET_VIDEO},
            "loss_mask": setting_input("loss_mask"),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, regularization_folder="none", **_):
        """The folders' listings with sizes and times, so that ComfyUI reloads them after images or captions change."""
        try:
            fingerprint = dataset_fingerprint(resolve_dataset(folder))
            if REGULARIZATION_FOLDER.config_value(regularization_folder) is not None:
                fingerprint += dataset_fingerprint(resolve_dataset(regularization_folder))
            return fingerprint
        except (PathError, OSError):
            return float("nan")  # never equal to itself: the node runs and `load` reports the problem

    def load(self, folder, regularization_folder="none", **settings):
        regularization = REGULARIZATION_FOLDER.config_value(regularization_folder)
        regularization = None if regularization is None else resolve_dataset(regularization)
        dataset = ImageFolderDataset(resolve_dataset(folder), DatasetConfig(**settings),
                                     regularization_root=regularization)
        size = dataset.examples[0].bucket  # a batch holds one size: the preview shows the images of the first one
        preview = torch.stack([  # a clip by its first frame
            (pixels if pixels.dim() == 3 else pixels[:, 0]).movedim(0, -1) / 2 + 0.5
            for index in range(dataset.num_training_images) if dataset.examples[index].bucket == size
            for pixels in [dataset.image_pixels(index)]
        ][:PREVIEW_IMAGES])
        clips = sum(example.frames > 1 for example in dataset.examples)
        summary = {"images": dataset.num_training_images, "captioned": dataset.captioned_count,
                   "defaulted": dataset.defaulted_count, "regularization": dataset.num_regularization_images,
                   "examples": len(dataset), "skipped": len(dataset.skipped),
                   "references": sum(len(example.references) for example in dataset.examples), "clips": clips}
        text = (f"{dataset.num_training_images} images ({dataset.captioned_count} captioned, {dataset.defaulted_count} "
                f"default caption)" + (f", {clips} of them clips of {dataset.config.frames} frames" if clips else "")
                + (f", {summary['references']} reference images" if summary["references"] else "")
                + (f", {dataset.num_regularization_images} class images" if dataset.num_regularization_images else "")
                + f", {len(dataset)} per epoch" + (f", {len(dataset.skipped)} skipped" if dataset.skipped else ""))
        return {"ui": {"text": [text], "lora_lab_dataset": [summary]}, "result": (dataset, preview)}


@dataclass(frozen=True)
class NetworkSpec:
    """What Inject LoRA decided; Train LoRA builds the adapters from it on every run, so a re-run starts fresh."""

    model: Any
    clip: Any
    adapters: NetworkConfig
    start: LoRAWeights | None

    def build(self, backend: ComfyBackend, seed: int, variant: Variant | None = None) -> LoRANetwork:
        """Fresh adapters (a sweep's `variant` may set their rank and alpha), or the continued LoRA's."""
        if self.start is not None:
            tensors = backend.network_tensors(self.start.tensors)
            network, _ = LoRANetwork.from_tensors(tensors, backend.loadable_modules(), strict=True)
            if not self.adapters.train_text_encoder:  # the continued LoRA's text-encoder layers stay applied, as they are
                for name, adapter in network.items():
                    if name.startswith(TEXT_ENCODER_PREFIX):
                        adapter.requires_grad_(False)
            return network
        adapters = variant.adapters(self.adapters) if variant else self.adapters
        return LoRANetwork.create(backend.adapter_targets(adapters.target, adapters.train_text_encoder),
                                  adapters.algorithm, adapters.rank, adapters.alpha, seed)


class InjectLoRA:
    DESCRIPTION = "Chooses which layers of MODEL (and CLIP) get a LoRA and of what kind. MODEL and CLIP stay unchanged."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_NETWORK",)
    RETURN_NAMES = ("network",)
    OUTPUT_TOOLTIPS = ("The adapter layout to train with Train LoRA.",)
    FUNCTION = "inject"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base diffusion model (SD1.x/2.x, SDXL, SD3/3.5, Flux.1, Chroma, Qwen-Image) from Load Checkpoint or Load Diffusion Model."}),
                **{name: setting_input(name) for name in ("algorithm", "rank", "alpha", "target", "train_text_encoder")},
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoder; needed to train it and to continue a LoRA that adapts it."}),
                "lora": ("LORA", {"tooltip": "Continue training this LoRA instead of starting from zero."}),
            },
        }

    def inject(self, model, clip=None, lora=None, **settings):
        adapters = NetworkConfig(**settings)
        if adapters.train_text_encoder and clip is None:
            raise ComfyBackendError("train_text_encoder is on but no CLIP is connected; connect Load Checkpoint's CLIP")
        backend = ComfyBackend(model, clip)
        targets = backend.adapter_targets(adapters.target, adapters.train_text_encoder)
        if lora is not None:
            LoRANetwork.from_tensors(backend.network_tensors(lora.tensors), backend.loadable_modules(), strict=True)
        elif not targets:
            raise ComfyBackendError(f"the target {adapters.target!r} matches no layer of this model")
        else:
            backend.check_algorithm(adapters.algorithm, list(targets))
        return (NetworkSpec(model, clip, adapters, lora),)


TEXT_ENCODER_LR_CHOICES = ("same as learning_rate", "frozen", "custom")


FLUX_GUIDANCE_INPUT = ("FLOAT", {"default": FLUX.training_guidance, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Flux.1-dev and HunyuanVideo: the value of the embedded guidance input while training. 1.0 as kohya's Flux docs recommend for LoRAs and musubi-tuner trains HunyuanVideo; kohya's --guidance_scale and diffusers' Flux LoRA script default to 3.5. Refused for models without a guidance input."})
# on Flow Matching Options after flux_guidance, as optional inputs (saved workflows hold widget values by position)
FLOW_MATCHING_LATER = ("min_sigma", "max_sigma")
FLOW_MATCHING_WIDGETS = tuple(name for name in FLOW_MATCHING_SETTINGS
                              if name in WIDGET_SETTINGS and name not in FLOW_MATCHING_LATER)
# Training Options' SD3/Flux inputs in the order workflows saved before Flow Matching Options hold them
OLD_LAYOUT_OPTIONAL = ("timestep_sampling", "flow_shift", "logit_mean", "logit_std", "loss_weighting", "flux_guidance",
                       "prior_loss_weight", "precondition_outputs")


class TrainingOptions:
    DESCRIPTION = ("Train LoRA's settings beyond the first ones, for every family. Without this node Train LoRA uses "
                   "these defaults; SD3 and Flux settings come from Flow Matching Options.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_TRAINING_OPTIONS",)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("For Train LoRA's options input.",)
    FUNCTION = "options"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gradient_accumulation": setting_input("gradient_accumulation"),
            "lr_scheduler": setting_input("lr_scheduler"),
            "lr_warmup_steps": setting_input("lr_warmup_steps"),
            "min_snr_gamma": setting_input("min_snr_gamma"),
            "noise_offset": setting_input("noise_offset"),
            "validation_every": setting_input("validation_every"),
            "early_stopping_patience": setting_input("early_stopping_patience"),
            "keep_best": setting_input("keep_best"),
            "text_encoder_lr": (list(TEXT_ENCODER_LR_CHOICES), {"default": "same as learning_rate", "tooltip": "Learning rate of a text-encoder LoRA (Inject LoRA's train_text_encoder): the same as the UNet's, frozen (kept as it is), or text_encoder_custom_lr."}),
            "text_encoder_custom_lr": ("FLOAT", {"default": 5e-5, "min": 0.000001, "max": 10.0, "step": 0.000001, "tooltip": "The text encoder's learning rate when text_encoder_lr is custom."}),
            "mixed_precision": setting_input("mixed_precision"),
            "gradient_checkpointing": setting_input("gradient_checkpointing"),
            "sample_steps": setting_input("sample_steps"),
            "checkpoint_every": setting_input("checkpoint_every"),
            "checkpoint_prefix": ("STRING", {"default": "lora_lab_checkpoint", "tooltip": "Checkpoints are saved as models/loras/<prefix>-step00000100.safetensors."}),
            "keep_checkpoints": setting_input("keep_checkpoints"),
            "cache_latents_on_disk": ("BOOLEAN", {"default": False, "tooltip": f"Keep the encoded latents in output/{LATENT_CACHE_FOLDER}, so later runs on the same images, VAE and seed skip the VAE."}),
        }, "optional": {
            "prior_loss_weight": setting_input("prior_loss_weight"),
            "flow_matching": ("LORA_FLOW_MATCHING_OPTIONS", {"tooltip": "From Flow Matching Options (SD3, Flux). Unconnected: that node's defaults."}),
            "blocks_to_swap": setting_input("blocks_to_swap"),
            "cpu_offload_checkpointing": setting_input("cpu_offload_checkpointing"),
            "ema_decay": setting_input("ema_decay"),
            "ema_start_step": setting_input("ema_start_step"),
        }}

    def options(self, flow_matching=None, **options):
        return ({**options, **(flow_matching or {})},)


class FlowMatchingOptions:
    DESCRIPTION = ("Settings of flow-matching training (SD3/SD3.5, Flux.1, Qwen-Image, Chroma, Lumina 2, HiDream): how "
                   "noise levels are drawn, the loss weighting, Flux's guidance input, how Qwen-Image-Edit's text "
                   "encoder sees edit pairs' references. Refused for SD1.x/2.x and SDXL when set away from the "
                   "defaults.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_FLOW_MATCHING_OPTIONS",)
    RETURN_NAMES = ("flow_matching",)
    OUTPUT_TOOLTIPS = ("For Training Options' flow_matching input.",)
    FUNCTION = "options"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**{name: setting_input(name) for name in FLOW_MATCHING_WIDGETS},
                             "flux_guidance": FLUX_GUIDANCE_INPUT},
                "optional": {"edit_prompt": widget_input(EDIT_PROMPT),
                             **{name: setting_input(name) for name in FLOW_MATCHING_LATER}}}

    def options(self, **options):
        return (options,)


class TrainingOptionsWithFlowMatching(TrainingOptions):
    """The Training Options of workflows saved before Flow Matching Options existed, the SD3/Flux settings on the node.
    UI workflows store widget values by position, so its inputs keep their order."""

    DEPRECATED = True
    DESCRIPTION = "Training Options with the SD3/Flux settings on the node, as workflows saved before Flow Matching Options have it."

    @classmethod
    def INPUT_TYPES(cls):
        current = {**TrainingOptions.INPUT_TYPES()["optional"], **FlowMatchingOptions.INPUT_TYPES()["required"]}
        return {"required": TrainingOptions.INPUT_TYPES()["required"],
                "optional": {name: current[name] for name in OLD_LAYOUT_OPTIONAL}}


OPTION_DEFAULTS = {name: spec[1]["default"]
                   for node in (TrainingOptions, TrainingOptionsWithFlowMatching, FlowMatchingOptions)
                   for section in node.INPUT_TYPES().values()
                   for name, spec in section.items() if "default" in spec[1]}


def text_encoder_learning_rate(options: dict) -> float | None:
    """TrainingConfig's text_encoder_lr: None follows learning_rate, 0 freezes."""
    choice = options["text_encoder_lr"]
    if choice not in TEXT_ENCODER_LR_CHOICES:
        raise ValueError(f"text_encoder_lr is {choice!r}; choose one of {', '.join(TEXT_ENCODER_LR_CHOICES)}")
    return {"same as learning_rate": None, "frozen": 0.0, "custom": options["text_encoder_custom_lr"]}[choice]


def no_samples_image(size: int) -> torch.Tensor:
    """An IMAGE that says sampling was off, instead of a black square in a connected preview."""
    picture = Image.new("RGB", (size, max(size // 4, 32)), (40, 40, 40))
    ImageDraw.Draw(picture).text((8, 8), "no samples: sample_every is 0", fill=(220, 220, 220))
    return to_image_batch([picture])


class Sweep:
    DESCRIPTION = ("Makes Train LoRA train one variant per value listed (learning rate, rank with its alpha, steps; "
                   "every combination of the lists given), one after another on the dataset encoded once, each with "
                   "its own validation loss and early stopping. Train LoRA then outputs the best by validation loss, "
                   "every variant's LoRA, and one chart of their validation losses.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_SWEEP",)
    RETURN_NAMES = ("sweep",)
    OUTPUT_TOOLTIPS = ("For Train LoRA's sweep input.",)
    FUNCTION = "sweep"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {each.name: widget_input(each) for each in SWEEP_SETTINGS}}

    def sweep(self, **lists):
        variants = parse_sweep(**lists)
        if not variants:
            raise TrainingError("Sweep lists no value: give learning rates, ranks or steps, comma-separated, or "
                                "disconnect it")
        return (variants,)


class TrainLoRA:
    DESCRIPTION = ("Trains the LoRA on the dataset with the model's own noise schedule. The base model is left as it was. "
                   "Connect Training Options for the other settings, Sweep to train several variants.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA", "MODEL", "CLIP", "IMAGE", "IMAGE", "LORA")
    RETURN_NAMES = ("lora", "model", "clip", "loss_curve", "samples", "loras")
    OUTPUT_IS_LIST = (False, False, False, False, False, True)
    OUTPUT_TOOLTIPS = ("The trained LoRA (a sweep's best by validation loss), for Save LoRA or Apply LoRA.",
                       "MODEL with that LoRA applied at strength 1, for a preview.",
                       "CLIP with that LoRA applied at strength 1.",
                       "The training loss per step and the validation loss; a sweep's: every variant's validation loss.",
                       "The sample images of every sample step, in order, a sweep's variant after variant (a video model's: each clip's frames; an image saying so when sampling is off).",
                       "Every variant's LoRA of a sweep, as a list: a node it feeds runs once per variant (Save LoRA saves each). Without a sweep, the one LoRA.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "network": ("LORA_NETWORK", {"tooltip": "From Inject LoRA."}),
                "dataset": ("LORA_DATASET", {"tooltip": "From Load Dataset."}),
                "vae": ("VAE", {"tooltip": "Encodes the images to latents (once, before the first step)."}),
                "steps": setting_input("steps"),
                "learning_rate": setting_input("learning_rate"),
                "batch_size": setting_input("batch_size"),
                "optimizer": setting_input("optimizer"),
                "seed": setting_input("seed"),
                "sample_every": setting_input("sample_every"),
                "sample_prompts": setting_input("sample_prompts"),
            },
            "optional": {
                "options": ("LORA_TRAINING_OPTIONS", {"tooltip": "From Training Options: scheduler, accumulation, validation, precision, checkpoints and more. Unconnected: that node's defaults."}),
                "resume_state": (["none", *training_states()], {"default": "none", "tooltip": "Continue an interrupted run from a checkpoint's .state file, with the same settings and dataset (steps may grow)."}),
                "sweep": ("LORA_SWEEP", {"tooltip": "From Sweep: one variant per value listed, trained in turn on the dataset encoded once (needs Training Options' validation_every); a variant that diverges is left out. Cancel or an error keeps the variants already finished, saved as models/loras/<checkpoint_prefix>-<variant>_00001_.safetensors."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, network, dataset, vae, steps, learning_rate, batch_size, optimizer, seed, sample_every,
              sample_prompts, options=None, resume_state="none", sweep=None, unique_id=None):
        options = {**OPTION_DEFAULTS, **(options or {})}
        widgets = {**options, "steps": steps, "learning_rate": learning_rate, "batch_size": batch_size,
                   "optimizer": optimizer, "seed": seed % 2**63, "sample_every": sample_every,
                   "sample_prompts": sample_prompts}
        config = TrainingConfig(
            **{each.name: each.config_value(widgets[each.name]) for each in TRAINING_SETTINGS
               if each.widget is not None},
            text_encoder_lr=text_encoder_learning_rate(options),
            latent_cache_dir=str(latent_cache_folder()) if options["cache_latents_on_disk"] else None,
        )
        if sweep:
            check_sweep(sweep, config, continues_a_lora=network.start is not None)
            check_name(options["checkpoint_prefix"], "checkpoint prefix")  # where Cancel keeps the finished variants
            if resume_state != "none":
                raise TrainingError("resume_state continues one run, and Sweep trains several: disconnect Sweep to "
                                    "resume, or set resume_state to none")
        variants = sweep or [Variant()]
        runs = [variant.config(config) for variant in variants]
        backend = ComfyBackend(network.model, network.clip, vae, sample_size=dataset.config.resolution,
                               guidance=options["flux_guidance"], edit_prompt=options["edit_prompt"])
        state = load_state(resolve_lora(resume_state)) if resume_state != "none" else None
        total = sum(run.steps for run in runs)
        before = [0, *accumulate(run.steps for run in runs)]  # the steps of the variants before each
        bar = comfy.utils.ProgressBar(total)

        def on_step(index: int, report: StepReport) -> bool:
            if sweep and comfy.model_management.processing_interrupted():
                return False  # the sweep stops, keeping the variants already finished; raised below
            comfy.model_management.throw_exception_if_processing_interrupted()
            first = report.samples[0] if report.samples else None  # a clip shows its first frame
            preview = ("PNG", first[0] if isinstance(first, list) else first, 512) if first else None  # loss: web/
            bar.update_absolute(before[index] + report.step, total, preview)
            send_event("lora_lab.train.step", {
                "node": unique_id, "step": report.step, "total": report.total_steps, "loss": report.loss,
                "smoothed": report.smoothed_loss, "lr": report.learning_rate, "elapsed": report.elapsed,
                "validation_loss": report.validation_loss,
                "variant": f"variant {index + 1}/{len(variants)}: {variants[index].label}" if sweep else None,
            })
            return True

        def saved_weights(each: VariantResult) -> LoRAWeights:
            metadata = lora_metadata(each.network, each.variant.config(config), backend, dataset, each.result.steps)
            return LoRAWeights.from_network(each.network, metadata, file_tensors=backend.file_tensors)

        def checkpointer_for(variant: Variant, lora_network: LoRANetwork) -> Checkpointer | None:
            if not options["checkpoint_every"]:
                return None
            prefix = check_name(options["checkpoint_prefix"], "checkpoint prefix")
            run = variant.config(config)
            return Checkpointer(next_lora_path(prefix).parent, options["checkpoint_every"], options["keep_checkpoints"],
                                Path(prefix).name + (f"-{variant.slug}" if sweep else ""),
                                lambda steps: lora_metadata(lora_network, run, backend, dataset, steps))

        def build(variant: Variant) -> LoRANetwork:
            with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; trainable tensors need it off
                return network.build(backend, config.seed, variant).to(backend.device)

        def show_plan(plan) -> None:  # before the first step; a run that will not fit a GPU is refused after it
            logging.info("LoRA Lab: %s", plan.describe())
            send_event("lora_lab.train.plan", {"node": unique_id, "text": plan.describe()})

        if sweep:  # encodes the dataset once, then trains each variant
            if warning := validation_warning(dataset, config):
                logging.warning("LoRA Lab: %s", warning)
            finished = []

            def variant_done(each: VariantResult) -> None:
                finished.append(each)
                logging.info("LoRA Lab: sweep variant %d/%d (%s) finished after %d steps: validation loss %.6g",
                             variants.index(each.variant) + 1, len(sweep), each.variant.label, each.result.steps,
                             each.validation_loss)

            try:
                swept = train_variants(backend, build, dataset, config, sweep, finished=variant_done,
                                       callback=lambda _, index, report: on_step(index, report),
                                       checkpointer_for=checkpointer_for, memory_plan=show_plan)
            except BaseException:  # Cancel raised while sampling, an error: the finished variants are kept first
                keep_finished(finished, options["checkpoint_prefix"], saved_weights)
                raise
            if swept.stop_reason == "cancelled":  # Cancel seen at a step
                keep_finished(finished, options["checkpoint_prefix"], saved_weights)
                comfy.model_management.throw_exception_if_processing_interrupted()
            best = swept.best
        else:
            lora_network = build(Variant())
            result = train(backend, lora_network, dataset, config, callback=lambda report: on_step(0, report),
                           checkpointer=checkpointer_for(Variant(), lora_network), resume_state=state,
                           memory_plan=show_plan)  # encodes the dataset, then loads the denoiser
            finished = [VariantResult(Variant(), lora_network, result, config.keep_best)]
            best = finished[0]
        loras = [saved_weights(each) for each in finished]
        weights = loras[finished.index(best)]
        model, clip = apply_lora(network.model, network.clip, weights, 1.0, 1.0)
        result = best.result
        history = loss_history(result.losses, smooth(result.losses, config.loss_smoothing))  # bounded for /history
        summary = {"steps": result.steps, "total": best.variant.config(config).steps, **history,
                   "best_step": result.best_step, "best_loss": result.best_loss, "stop_reason": result.stop_reason,
                   "seconds": result.seconds, "validation": result.validation,
                   "validation_held_out": result.validation_held_out, "memory_plan": result.memory_plan}
        if sweep:
            summary["sweep"] = [{"variant": each.variant.label, "validation_loss": each.validation_loss,
                                 "steps": each.result.steps, "stop_reason": each.result.stop_reason,
                                 "best": each is best} for each in finished] + [
                {"variant": variant.label, "validation_loss": None, "stop_reason": "diverged", "reason": reason,
                 "best": False} for variant, reason in swept.diverged]
            summary["warning"] = validation_warning(dataset, config)
        send_event("lora_lab.train.done", {"node": unique_id, **summary})
        curve = to_image_batch([sweep_chart([(each.variant.label, each.result.validation) for each in finished],
                                            finished.index(best)) if sweep else
                                loss_curve(result.losses, result.validation)])
        samples = [frame for each in finished for _, images in each.result.samples for image in images  # a clip:
                   for frame in (image if isinstance(image, list) else [image])]  # its frames in order
        samples = to_image_batch(samples) if samples else no_samples_image(dataset.config.resolution)
        return {"ui": {"lora_lab_training": [summary]}, "result": (weights, model, clip, curve, samples, loras)}


def keep_finished(finished: list[VariantResult], checkpoint_prefix: str, saved_weights) -> None:
    """A stopped sweep's finished variants, saved next to the checkpoints so that Cancel or an error loses none."""
    prefix = check_name(checkpoint_prefix, "checkpoint prefix")
    for each in finished:
        try:
            path = next_lora_path(f"{prefix}-{each.variant.slug}")
            saved_weights(each).save(path)
        except Exception:  # logged; the other variants are still saved
            logging.exception("LoRA Lab: the sweep stopped, and its finished variant %s could not be saved",
                              each.variant.label)
            continue
        logging.warning("LoRA Lab: the sweep stopped; its finished variant %s is saved as %s", each.variant.label, path)


LEGACY_REQUIRED = ("network", "dataset", "vae", "steps", "learning_rate", "batch_size", "gradient_accumulation",
                   "optimizer", "lr_scheduler", "lr_warmup_steps", "min_snr_gamma", "noise_offset", "seed",
                   "early_stopping_patience")
LEGACY_OPTIONAL = ("text_encoder_lr", "mixed_precision", "gradient_checkpointing", "sample_every", "sample_prompts",
                   "sample_steps", "checkpoint_every", "checkpoint_prefix", "keep_checkpoints", "resume_state",
                   "cache_latents_on_disk", "validation_every", "keep_best")


class TrainLoRAAllSettings(TrainLoRA):
    """The Train LoRA of workflows saved before Training Options existed, every setting on the node. UI workflows
    store widget values by position, so its inputs keep their order (`text_encoder_lr` keeps its meaning: -1 the
    same as learning_rate, 0 frozen, else that rate). It trains with Train LoRA's code."""

    DEPRECATED = True
    DESCRIPTION = "Train LoRA with every setting on the node, as workflows saved before Training Options have it."

    @classmethod
    def INPUT_TYPES(cls):
        current = TrainLoRA.INPUT_TYPES()
        specs = {**current["required"], **current["optional"], **TrainingOptions.INPUT_TYPES()["required"],
                 "text_encoder_lr": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 10.0, "step": 0.000001, "tooltip": "Learning rate of a text-encoder LoRA; -1 uses learning_rate, 0 keeps it fixed."})}
        return {"required": {name: specs[name] for name in LEGACY_REQUIRED},
                "optional": {name: specs[name] for name in LEGACY_OPTIONAL}, "hidden": current["hidden"]}

    def train(self, network, dataset, vae, steps, learning_rate, batch_size, optimizer, seed, text_encoder_lr=-1.0,
              sample_every=0, sample_prompts="a photo of sks", resume_state="none", unique_id=None, **options):
        if text_encoder_lr < 0:
            options["text_encoder_lr"] = "same as learning_rate"
        elif text_encoder_lr == 0:
            options["text_encoder_lr"] = "frozen"
        else:
            options.update(text_encoder_lr="custom", text_encoder_custom_lr=text_encoder_lr)
        return super().train(network, dataset, vae, steps, learning_rate, batch_size, optimizer, seed, sample_every,
                             sample_prompts, options, resume_state=resume_state, unique_id=unique_id)
