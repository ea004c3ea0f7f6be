"""HiDream-I1 (Full, Dev, Fast: one architecture) with diffusers' HiDreamImagePipeline: double-stream and single-stream
blocks whose image feed-forward is a mixture of experts (a shared expert plus routed experts, two of four chosen per
token by a gate), conditioned on four text encoders — CLIP-L and CLIP-G (their pooled outputs), T5-XXL and every
layer of Llama-3.1-8B-Instruct (each block reads its own) — none trained, all encoded once and cached. The
transformer outputs x0 − ε at time σ·1000: the velocity negated (HiDreamImagePipeline, ComfyUI's HiDream).

Files use diffusion-pipe's and ai-toolkit's layout, `diffusion_model.<path>.lora_A/lora_B` (alpha/rank folded into
lora_B, no alpha key) over the transformer's paths, which ComfyUI's are too: ComfyUI's key map and diffusers'
`load_lora_weights` both read it (diffusers refuses alpha keys, and no kohya trainer has a HiDream format). Files in
kohya's naming (`lora_unet_<path>`) and diffusers' (`transformer.<path>`, SimpleTuner's) load too."""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..backend import Conditioning
from ..targets import TargetError, TargetPreset, kohya_name
from ..training.objectives import FlowMatchingObjective
from .family import BlockLayout, Family
from .flow import (
    FlowBackend,
    flow_objective,
    from_diffusers_naming,
    in_diffusers_naming,
)

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

HIDREAM_BLOCKS = frozenset({"HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock"})  # both libraries'
HIDREAM_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn1.to_q_t", "attn1.to_k_t",
                     "attn1.to_v_t", "attn1.to_out_t")
HIDREAM_MLP = ("w1", "w2", "w3")  # the SwiGLU Linears of the text stream's ff_t and of every expert of ff_i
HIDREAM_PRESETS = {
    "attention": TargetPreset(HIDREAM_BLOCKS, False, HIDREAM_ATTENTION, "q/k/v/out of every block's attention (the "
                              "double blocks' image and text streams, the single blocks')"),
    "transformer": TargetPreset(HIDREAM_BLOCKS, False, HIDREAM_ATTENTION + HIDREAM_MLP, "attention and the MLPs: the "
                                "text stream's ff_t and, in the image stream's mixture, the shared expert and every "
                                "routed expert (as diffusion-pipe adapts them); not the gate"),
    "full": TargetPreset(HIDREAM_BLOCKS, False, (), "every Linear of every block: attention, the MLPs, every expert "
                         "and the adaLN modulation; the experts' gate is a plain weight, which no preset adapts"),
}
HIDREAM = Family(
    "HiDream-I1", "hidream", "hidream-i1", __name__, "HiDreamBackend", ("HiDreamImagePipeline",),
    {"HiDream": "HiDream-I1"}, "HiDreamImageTransformer2DModel", ("double_stream_blocks", "single_stream_blocks"),
    HIDREAM_PRESETS, HIDREAM_PRESETS, {},
    BlockLayout("HiDream-I1", groups=("D", "S"), patterns=(
        (re.compile(r"lora_unet_double_stream_blocks_(\d+)(_|$)"), "D"),
        (re.compile(r"lora_unet_single_stream_blocks_(\d+)(_|$)"), "S"),
        (re.compile(r"(?:transformer|diffusion_model)\.double_stream_blocks\.(\d+)\."), "D"),
        (re.compile(r"(?:transformer|diffusion_model)\.single_stream_blocks\.(\d+)\."), "S"))),
    flow=True, text_extras=("conditioning_llama3",), file_module_prefix="diffusion_model.", sample_cfg=5.0,
    sample_scheduler="simple", file_prefixes={"diffusion_model.": "lora_unet_", "transformer.": "lora_unet_"},
    file_markers=(r"double_stream_blocks_\d+_", r"single_stream_blocks_\d+_"))

Tensors = dict[str, torch.Tensor]


@contextmanager
def differentiable_experts(transformer: nn.Module) -> Iterator[None]:
    """The mixtures of experts in their training branch inside the block: in eval mode diffusers routes tokens through
    `moe_infer`, which runs under no_grad, so no gradient would reach a routed expert's adapter. The branch computes
    the same output (its unused load-balancing loss too), and the transformer itself stays as it was, so its output
    keeps the pipeline's layout. ComfyUI's HiDream always takes that branch."""
    mixtures = [module for module in transformer.modules() if type(module).__name__ == "MOEFeedForwardSwiGLU"]
    modes = [(module, module.training) for mixture in mixtures for module in mixture.modules()]
    for mixture in mixtures:
        mixture.train()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


class HiDreamBackend(FlowBackend):
    """HiDreamImagePipeline for training: latents [B, 16, H, W] as the transformer takes them (it patches them
    itself). Conditioning is what the pipeline encodes: T5's states and Llama's hidden states of every layer (batch
    first here, [B, layers, tokens, width]), both padded to 128 tokens as the model reads them (it takes no text
    mask), and the two CLIPs' pooled outputs."""

    family = HIDREAM.name
    spec = HIDREAM
    presets = HIDREAM_PRESETS
    sample_guidance = 5.0  # HiDream-I1-Full's
    max_sequence_length = 128  # tokens of T5 and Llama (and the CLIPs' padding), the pipeline's default

    def __init__(self, pipeline: Any, name: str = "", model_hash: str = "") -> None:
        super().__init__(pipeline, name, model_hash)
        self.file_names = {kohya_name("lora_unet", path): f"{HIDREAM.file_module_prefix}{path}"
                           for path, _ in self.transformer.named_modules() if path}

    def objective(self, config: TrainingConfig) -> FlowMatchingObjective:
        """Logit-normal σ with the scheduler's fixed shift (3.0, as diffusers' HiDream script trains; Dev samples at
        6), σ·1000 as the transformer's time input (the pipeline passes the scheduler's timesteps)."""
        return flow_objective(config, HIDREAM, 1000, self.pipeline.scheduler.config.shift)

    def encode_text(self, captions: list[str]) -> Conditioning:
        t5, _, llama, _, pooled, _ = self.pipeline.encode_prompt(
            captions, device=self.text_encoder.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"context": t5, "llama": llama.movedim(0, 1), "pooled": pooled}

    @contextmanager
    def training(self, train_text_encoder: bool) -> Iterator[None]:
        with differentiable_experts(self.transformer):
            yield

    def predict(self, noisy_latents: torch.Tensor, times: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The velocity ε − x0: the transformer's output negated, at time σ·1000 (fp32), as the pipeline calls it;
        a transformer in train mode returns its patches, which are put back in place."""
        self.check_packable(*noisy_latents.shape[-2:])
        dtype = self.transformer.dtype
        output = self.transformer(
            hidden_states=noisy_latents.to(dtype), timesteps=times.float(),
            encoder_hidden_states_t5=conditioning["context"].to(dtype),
            encoder_hidden_states_llama3=conditioning["llama"].movedim(1, 0).to(dtype),
            pooled_embeds=conditioning["pooled"].to(dtype), return_dict=False,
        )[0]
        if output.shape != noisy_latents.shape:  # [B, C, patches, p·p]: train mode's layout
            output = self.unpatched(output, *noisy_latents.shape[-2:])
        return -output

    def unpatched(self, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, C, patches, p·p] (patches row by row, each p×p row-major) as [B, C, H, W]."""
        size = self.transformer.config.patch_size
        batch, channels = patches.shape[:2]
        grid = patches.reshape(batch, channels, height // size, width // size, size, size)
        return grid.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, height, width)

    def adapter_targets(self, preset: str, text_encoder: bool) -> dict[str, nn.Module]:
        if text_encoder:
            raise TargetError(f"{self.family}'s text encoders (CLIP-L, CLIP-G, T5, Llama-3.1) are not trained: their "
                              "outputs are encoded once and cached; train the transformer only (turn "
                              "train_text_encoder off)")
        return self.denoiser_targets(preset)

    def loadable_modules(self) -> dict[str, nn.Module]:
        return self.denoiser_targets("full")

    def checkpoint_blocks(self) -> list[nn.Module]:
        return [*self.transformer.double_stream_blocks, *self.transformer.single_stream_blocks]

    def model_info(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.model_hash, "version": HIDREAM.version}

    def file_tensors(self, tensors: Tensors) -> Tensors:
        """`diffusion_model.<path>`; LoRA as lora_A/lora_B with alpha/rank folded into lora_B and no alpha."""
        return in_diffusers_naming(tensors, self.file_names)

    def network_tensors(self, tensors: Tensors) -> Tensors:
        """The network's names back from this layout, diffusers' and kohya's (scale 1 without alpha)."""
        return from_diffusers_naming(tensors, HIDREAM.file_prefixes)
