"""Flux.1 (dev and schnell) with diffusers' FluxPipeline: 2×2-packed latents with image ids, pooled CLIP-L and T5
context, σ as the time input (the transformer scales it by 1000), the guidance embedding of dev, and kohya's file
naming over Black Forest Labs' layer names, whose fused layers (qkv, linear1) hold diffusers' separate ones."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapters.base import dense_weight
from ..backend import REFERENCE_LATENTS, Conditioning
from ..errors import LoRALabError
from ..functional.dora import output_norm
from ..network import grouped_by_module
from ..targets import TargetPreset, kohya_name
from ..training.objectives import FlowMatchingObjective
from .family import (
    BFL_DOUBLE_BLOCKS,
    BFL_MODULATION,
    BFL_SINGLE_BLOCKS,
    DIFFUSERS_JOINT_ATTENTION,
    DIFFUSERS_SINGLE_BLOCKS,
    BlockLayout,
    Family,
)
from .flow import (
    CLIP_L_PREFIX,
    DIFFUSERS_PREFIXES,
    FlowBackend,
    flattened,
    flow_objective,
    from_diffusers_naming,
    transformer_presets,
)

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

FLUX_BLOCKS = frozenset({"FluxTransformerBlock", "FluxSingleTransformerBlock"})
# A single block's attention is fused with its MLP in BFL's layout (which ComfyUI and kohya's files use): linear1 =
# q, k, v and the MLP's input (proj_mlp), linear2 = the attention's output and the MLP's (proj_out). "attention"
# takes both whole, as the nodes do and kohya trains them, so that its files hold no zero blocks.
FLUX_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                  "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "proj_mlp", "proj_out")
FLUX_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
FLUX_PRESETS = transformer_presets(
    FLUX_BLOCKS, FLUX_ATTENTION, FLUX_MLP,
    "q/k/v/out of the double blocks' attention (both streams); the single blocks' linear1 and linear2 whole, where "
    "attention is fused with the MLP")
# The same layers in ComfyUI's Flux (Black Forest Labs' layout)
BFL_BLOCKS = frozenset({"DoubleStreamBlock", "SingleStreamBlock"})
BFL_ATTENTION = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2")
BFL_PRESETS = {
    "attention": TargetPreset(BFL_BLOCKS, False, BFL_ATTENTION, "qkv/proj of the double blocks' attention (both "
                              "streams); the single blocks' linear1 and linear2 whole, where attention is fused with "
                              "the MLP"),
    "transformer": TargetPreset(BFL_BLOCKS, False, (*BFL_ATTENTION, "_mlp.0", "_mlp.2"),
                                "attention plus the double blocks' MLPs"),
    "full": TargetPreset(BFL_BLOCKS, False, (), "every Linear of the double and single blocks, modulation included"),
}
FLUX = Family(
    "Flux.1", "flux1", "flux-1", __name__, "FluxBackend", ("FluxPipeline", "FluxKontextPipeline"),
    {"Flux": "Flux.1", "FluxSchnell": "Flux.1 schnell"}, "Flux", ("double_blocks", "single_blocks"), FLUX_PRESETS,
    BFL_PRESETS, {"clip_l": CLIP_L_PREFIX},
    BlockLayout("Flux", groups=("D", "S"), patterns=(
        (re.compile(r"lora_unet_double_blocks_(\d+)(_|$)"), "D"),
        (re.compile(r"lora_unet_single_blocks_(\d+)(_|$)"), "S"),
        (re.compile(r"transformer\.transformer_blocks\.(\d+)\."), "D"),
        (re.compile(r"transformer\.single_transformer_blocks\.(\d+)\."), "S"))),
    flow=True, guidance=True, reference_images=1, sample_cfg=1.0, sample_scheduler="simple",
    file_markers=(BFL_DOUBLE_BLOCKS, BFL_SINGLE_BLOCKS, BFL_MODULATION, DIFFUSERS_SINGLE_BLOCKS, DIFFUSERS_JOINT_ATTENTION,
                  r"guidance_in_"))

# Factors of the adapters that fuse exactly along a fused layer's output rows (LoRA, DoRA, LoHa):
OUT_FACTORS = ("lora_up.weight", "hada_w1_a", "hada_w2_a")  # [out, rank]: block-diagonal in the fused layer
IN_FACTORS = ("lora_down.weight", "hada_w1_b", "hada_w2_b")  # [rank, in]: stacked along the rank
ROW_VALUES = ("dora_scale",)  # [out, 1]: stacked along the rows

SINGLE_BLOCK_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # BFL's linear1, rows in this order

Tensors = dict[str, torch.Tensor]


class FluxFileError(LoRALabError, ValueError):
    """A network cannot be written in, or read from, kohya's fused layers (Flux's, Chroma's, Lumina 2's); the message
    says which and why."""


def bfl_paths(transformer: nn.Module) -> dict[str, tuple[str, ...]]:
    """Black Forest Labs' (ComfyUI's) path of each original layer → the diffusers paths it holds, in its row order."""
    layers: dict[str, tuple[str, ...]] = {}
    for index in range(len(transformer.transformer_blocks)):
        block = f"transformer_blocks.{index}."
        for stream, qkv, proj, ff, norm in (
            ("img", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context", "norm1_context"),
        ):
            name = f"double_blocks.{index}.{stream}"
            layers[f"{name}_attn.qkv"] = tuple(f"{block}attn.{part}" for part in qkv)
            layers[f"{name}_attn.proj"] = (f"{block}attn.{proj}",)
            layers[f"{name}_mlp.0"] = (f"{block}{ff}.net.0.proj",)
            layers[f"{name}_mlp.2"] = (f"{block}{ff}.net.2",)
            layers[f"{name}_mod.lin"] = (f"{block}{norm}.linear",)
    for index in range(len(transformer.single_transformer_blocks)):
        block = f"single_transformer_blocks.{index}."
        name = f"single_blocks.{index}"
        layers[f"{name}.linear1"] = tuple(f"{block}{part}" for part in SINGLE_BLOCK_LINEAR1)
        layers[f"{name}.linear2"] = (f"{block}proj_out",)
        layers[f"{name}.modulation.lin"] = (f"{block}norm.linear",)
    return layers


def bfl_layers(transformer: nn.Module) -> dict[str, tuple[str, ...]]:
    """kohya's file name (over Black Forest Labs' layer names) → the diffusers paths it holds, in its row order."""
    return {kohya_name("lora_unet", path): paths for path, paths in bfl_paths(transformer).items()}


def piece_rank(piece: Tensors) -> int:
    return next(piece[key].shape[0] for key in IN_FACTORS if key in piece)


def piece_scale(piece: Tensors) -> float:
    rank = piece_rank(piece)
    return float(piece.get("alpha", rank)) / rank


def fuse(file_name: str, pieces: list[Tensors | None], layers: list[nn.Module], family: str = FLUX.name
         ) -> Tensors:
    """One adapter on the fused layer whose ΔW rows are the pieces' ΔW exactly: ranks padded to the largest with
    zeros, in-factors stacked, out-factors block-diagonal, each piece's alpha/rank folded into its out-factor where it
    differs from the first's, alpha = that scale × the fused rank. A piece the network does not train (None) is a
    zero block (DoRA: the layer's own row norms, which leave it unchanged). A layer of one piece is kept as it is."""
    present = [piece for piece in pieces if piece is not None]
    if len(pieces) == 1:
        return present[0]
    keys = set(present[0])
    if any(key.startswith("lokr_") for key in keys):
        raise FluxFileError(
            f"LoKr cannot be saved for {family}: kohya's fused layer {file_name} holds {len(pieces)} diffusers "
            f"layers, and their Kronecker products are not one Kronecker product; train LoRA, DoRA or LoHa for {family}")
    rank, scale = max(piece_rank(piece) for piece in present), piece_scale(present[0])
    fold = next(key for key in OUT_FACTORS if key in keys)
    dtype = present[0][fold].dtype
    padded = []
    for piece, layer in zip(pieces, layers):
        out_rows, in_columns = layer.out_features, layer.in_features  # a 4-bit (QLoRA) weight is packed
        if piece is None:
            piece = {key: torch.zeros(rank, in_columns, dtype=dtype) for key in IN_FACTORS if key in keys}
            piece |= {key: torch.zeros(out_rows, rank, dtype=dtype) for key in OUT_FACTORS if key in keys}
            if "dora_scale" in keys:
                piece["dora_scale"] = output_norm(dense_weight(layer).detach().cpu()).to(dtype)
            padded.append(piece)
            continue
        extra = rank - piece_rank(piece)
        piece = {**piece, fold: piece[fold] * (piece_scale(piece) / scale)}
        piece |= {key: torch.cat([piece[key], piece[key].new_zeros(extra, in_columns)])
                  for key in IN_FACTORS if key in keys}
        piece |= {key: torch.cat([piece[key], piece[key].new_zeros(out_rows, extra)], 1)
                  for key in OUT_FACTORS if key in keys}
        padded.append(piece)
    fused = {key: torch.cat([piece[key] for piece in padded]) for key in (*IN_FACTORS, *ROW_VALUES) if key in keys}
    fused |= {key: torch.block_diag(*[piece[key] for piece in padded]) for key in OUT_FACTORS if key in keys}
    fused["alpha"] = torch.tensor(scale * rank * len(pieces), dtype=torch.float32)
    return fused


def split(file_name: str, fused: Tensors, paths: tuple[str, ...], layers: list[nn.Module], family: str = FLUX.name
          ) -> dict[str, Tensors]:
    """The pieces of a fused layer's adapter, each with exactly its rows of ΔW: block-diagonal out-factors (as
    `fuse` writes them) give each piece its rank's share, all-zero (padding) pieces dropped; a dense out-factor
    (kohya's own fused training) gives each piece the whole in-factor and its rows of the out-factor. A layer of one
    piece is kept as it is."""
    if len(paths) == 1:
        return {kohya_name("lora_unet", paths[0]): fused}
    if any(key.startswith("lokr_") for key in fused):
        raise FluxFileError(f"{file_name}: LoKr on kohya's fused {family} layers cannot be split into diffusers' "
                            "separate layers exactly; LoRA Lab reads LoRA, DoRA and LoHa there")
    out_keys = [key for key in OUT_FACTORS if key in fused]
    in_keys = [key for key in IN_FACTORS if key in fused]
    if not out_keys or not in_keys:
        raise FluxFileError(f"{file_name}: no LoRA/LoHa factors in {sorted(fused)}")
    rows = [layer.out_features for layer in layers]
    if fused[out_keys[0]].shape[0] != sum(rows):
        raise FluxFileError(f"{file_name} has {fused[out_keys[0]].shape[0]} output rows, but this model's "
                            f"{', '.join(paths)} have {sum(rows)}: the LoRA was trained for another {family} model")
    total = fused[in_keys[0]].shape[0]
    scale = float(fused.get("alpha", total)) / total
    starts = [sum(rows[:index]) for index in range(len(rows))]
    rank = total // len(paths)
    block = total % len(paths) == 0 and not any(  # nothing outside each piece's own rows × rank columns
        fused[key][start:start + count, :index * rank].any() or fused[key][start:start + count, (index + 1) * rank:].any()
        for key in out_keys for index, (start, count) in enumerate(zip(starts, rows)))
    if not block:
        rank = total
    pieces = {}
    for index, (path, start, count) in enumerate(zip(paths, starts, rows)):
        columns = slice(index * rank, (index + 1) * rank) if block else slice(None)
        piece = {key: fused[key][columns] for key in in_keys}
        piece |= {key: fused[key][start:start + count, columns] for key in out_keys}
        if block and not any(value.any() for value in piece.values()):
            continue  # a layer the network did not train, zero-padded by `fuse`
        piece |= {key: fused[key][start:start + count] for key in ROW_VALUES if key in fused}
        piece["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
        pieces[kohya_name("lora_unet", path)] = piece
    return pieces


class FusedFileBackend(FlowBackend):
    """A transformer whose files use kohya's names over the original model's layers (`file_layers`), where one
    original layer may hold several of diffusers' (a fused qkv): those fused exactly on saving, split back on loading;
    files in diffusers' naming and the family's other layouts (`Family.file_prefixes`) renamed."""

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "") -> None:
        super().__init__(pipeline, name, model_hash)
        self.modules_by_path = dict(self.transformer.named_modules())
        self.layers = {file_name: paths for file_name, paths in self.file_layers().items()
                       if all(path in self.modules_by_path for path in paths)}  # Chroma has no modulation Linears

    def file_layers(self) -> dict[str, tuple[str, ...]]:
        """kohya's file name of each original layer → the diffusers paths it holds, in its row order."""
        raise NotImplementedError

    def model_info(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.model_hash, "version": self.spec.version}

    def file_tensors(self, tensors: Tensors) -> Tensors:
        """kohya's names: diffusers' layers fused exactly into the original ones that hold them (Flux's qkv and
        linear1), text encoders (CLIP-L) as `lora_te1_`."""
        modules = grouped_by_module(tensors)
        out: dict[str, Tensors] = {}
        for file_name, paths in self.layers.items():
            names = [kohya_name("lora_unet", path) for path in paths]
            if any(name in modules for name in names):
                pieces = [modules.pop(name, None) for name in names]
                out[file_name] = fuse(file_name, pieces, [self.modules_by_path[path] for path in paths], self.family)
        return flattened({**out, **modules})

    def network_tensors(self, tensors: Tensors) -> Tensors:
        """kohya's fused layers split into the network's diffusers layers; files in diffusers' own naming (its
        scripts', ai-toolkit's) and the family's other layouts renamed; other modules as they are."""
        modules = grouped_by_module(from_diffusers_naming(tensors, {**DIFFUSERS_PREFIXES, **self.spec.file_prefixes}))
        out: dict[str, Tensors] = {}
        for file_name, paths in self.layers.items():
            if file_name in modules:
                out |= split(file_name, modules.pop(file_name), paths, [self.modules_by_path[path] for path in paths],
                             self.family)
        return flattened({**out, **modules})


class BflBackend(FusedFileBackend):
    """A transformer of Flux's layout (Flux.1, Chroma) whose files use kohya's names over Black Forest Labs' layers:
    diffusers' to_q/to_k/to_v (and proj_mlp in single blocks) fused into qkv/linear1."""

    def file_layers(self) -> dict[str, tuple[str, ...]]:
        return bfl_layers(self.transformer)


class FluxBackend(BflBackend):
    """FluxPipeline (and FluxKontextPipeline) for training: the trainer sees unpacked latents [B, 16, H, W];
    `predict` packs them 2×2, with an edit pair's reference image after them as Kontext takes it.

    `guidance` is the value of dev's guidance input while training: 1.0 by default, as kohya's README trains dev
    LoRAs (its and diffusers' scripts default to 3.5). Schnell has no guidance input, so any other value is refused
    there rather than silently ignored."""

    family = FLUX.name
    spec = FLUX
    presets = FLUX_PRESETS
    reference_images = FLUX.reference_images  # Flux.1 Kontext's, as FluxKontextPipeline passes its image

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "",
                 guidance: float = FLUX.training_guidance) -> None:
        super().__init__(pipeline, name, model_hash)
        self.has_guidance = bool(self.transformer.config.guidance_embeds)
        if not self.has_guidance and guidance != FLUX.training_guidance:
            raise ValueError(f"guidance {guidance} needs Flux.1-dev's guidance embedding; this transformer has none "
                             f"(Flux.1-schnell), so it would be ignored: leave guidance at {FLUX.training_guidance}")
        self.guidance = float(guidance)
        self.sample_guidance = 3.5 if self.has_guidance else 0.0
        self.max_sequence_length = 512 if self.has_guidance else 256  # T5 tokens: dev's and schnell's own limits

    def objective(self, config: TrainingConfig) -> FlowMatchingObjective:
        """Logit-normal σ shifted as the pipeline's scheduler shifts it: by resolution (dev's dynamic shifting, μ
        from its base/max shift) or by its fixed shift (schnell's 1); σ itself is the transformer's time input
        (FluxPipeline passes timestep / 1000 and the model multiplies by 1000)."""
        scheduler = self.pipeline.scheduler.config
        shift = None if scheduler.use_dynamic_shifting else scheduler.shift
        return flow_objective(config, FLUX, 1, shift, scheduler.base_shift, scheduler.max_shift)

    def encode_text(self, captions: list[str]) -> Conditioning:
        context, pooled, _ = self.pipeline.encode_prompt(captions, device=self.text_encoder.device,
                                                         max_sequence_length=self.max_sequence_length)
        return {"context": context, "pooled": pooled}

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's velocity; σ goes in as fp32, as diffusers' training script and ComfyUI pass it
        (FluxPipeline rounds it to the latents' dtype)."""
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy_latents.shape
        self.check_packable(height, width)
        dtype = self.transformer.dtype
        packed = FluxPipeline._pack_latents(noisy_latents.to(dtype), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, dtype)
        context = conditioning["context"].to(dtype)
        text_ids = torch.zeros(context.shape[1], 3, device=self.device, dtype=dtype)
        guidance = (torch.full((batch,), self.guidance, device=self.device, dtype=torch.float32)
                    if self.has_guidance else None)
        tokens = packed.shape[1]
        if REFERENCE_LATENTS in conditioning:  # Kontext: the reference's tokens after the image's, ids at index 1
            reference = conditioning[REFERENCE_LATENTS][:, 0].to(dtype)
            ref_height, ref_width = reference.shape[-2:]
            reference_tokens = FluxPipeline._pack_latents(reference, batch, channels, ref_height, ref_width)
            packed = torch.cat([packed, reference_tokens], 1)
            reference_ids = FluxPipeline._prepare_latent_image_ids(batch, ref_height // 2, ref_width // 2, self.device,
                                                                   dtype)
            reference_ids[..., 0] = 1
            image_ids = torch.cat([image_ids, reference_ids])
        velocity = self.transformer(
            hidden_states=packed, timestep=times.float(), guidance=guidance,
            pooled_projections=conditioning["pooled"].to(dtype), encoder_hidden_states=context,
            txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0][:, :tokens]
        scale = self.pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(velocity, height * scale, width * scale, scale)
