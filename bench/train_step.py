"""Train-step benchmark: LoRA Lab against the diffusers + PEFT reference loop on the same SD1.5- or SDXL-architecture
UNet, Flux.1, Qwen-Image or Wan 2.1 video transformer.

The reference is the loop of diffusers' `train_text_to_image_lora.py` (UNets: PEFT LoRA on to_q/to_k/to_v/to_out.0)
or `train_dreambooth_lora_flux.py` / `_qwen_image.py` (flow matching, LoRA on the layers of LoRA Lab's `attention` preset:
both streams' attention projections, the single blocks' fused q/k/v/MLP-in and output layers; for Wan, which
diffusers' examples have no LoRA script for, the same flow-matching loop on video latents [B, 16, F', H/8, W/8]
with σ·1000 as the time input, LoRA on every block's self- and cross-attention q/k/v/out):
trainable parameters cast to fp32, autocast in the base dtype, AdamW, gradient clipping. LoRA Lab trains the same
targets through `lora_core.train` (fp32 adapters, no autocast). Both run in one process, in alternating blocks
after warm-up, with random weights, latents and text embeddings (no download). Prints JSON with median seconds per
optimizer step, peak memory above the resident weights and the absolute peak (on a CPU: RSS), the latent frames and
tokens, and the ratios LoRA Lab / reference (--skip-reference: LoRA Lab alone, no reference copy, no ratios).

    python bench/train_step.py --size small                       # the routine CPU check, well under a minute
    python bench/train_step.py --size full --device cuda --dtype bf16   # full-size SD1.5 UNet at 512 px
    python bench/train_step.py --size sdxl --device cuda --dtype bf16   # full-size SDXL UNet at 1024 px
    python bench/train_step.py --size sdxl-block --resolution 256       # SDXL's widths, 2 of its 10 deepest layers
    python bench/train_step.py --size flux --device cuda --dtype bf16   # Flux.1-dev's transformer at 1024 px
    python bench/train_step.py --size flux-block --resolution 256       # Flux's widths, 1 double + 2 single blocks
    python bench/train_step.py --size flux --device cuda --dtype bf16 --gradient-checkpointing   # both trainers
    python bench/train_step.py --size qwen-image --device cuda --dtype bf16 --gradient-checkpointing   # 20 B, 1024 px
    python bench/train_step.py --size wan-small --height 64 --width 64 --frames 5 --steps 2 --blocks 1   # CPU check
    python bench/train_step.py --size wan-1.3b --device cuda --dtype bf16 --gradient-checkpointing   # 480×832×33
    python bench/train_step.py --size wan-14b --device cuda --dtype bf16 --gradient-checkpointing --frames 81 \\
        --skip-reference                                           # Wan 2.1 14B (a 2.2 A14B expert), LoRA Lab alone
    python bench/train_step.py --size hunyuan-video --device cuda --dtype bf16 --gradient-checkpointing \
        --skip-reference                                           # HunyuanVideo (13 B) at 544×960×33, LoRA Lab alone

On CUDA the denoiser is built on the device (random weights), so a 12 B transformer needs no host copy. Video sizes
(wan-*, hunyuan-video*) take --height/--width (default 480×832 for Wan, 544×960 for HunyuanVideo) and --frames
(4k+1, default 33); the others take --resolution.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import json
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, train  # noqa: E402
from lora_core.backend import TrainingBackend  # noqa: E402
from lora_core.families.flux import FLUX_PRESETS, FluxBackend  # noqa: E402
from lora_core.families.hunyuan_video import HUNYUAN_VIDEO_PRESETS, HunyuanVideoBackend  # noqa: E402
from lora_core.families.qwen_image import QWEN_PRESETS, QwenImageBackend  # noqa: E402
from lora_core.families.sd1 import SD1  # noqa: E402
from lora_core.families.sdxl import SDXL as SDXL_FAMILY  # noqa: E402
from lora_core.families.wan import WAN_PRESETS, WanBackend  # noqa: E402
from lora_core.targets import UNET_PREFIX, find_targets, named_for_kohya  # noqa: E402

SDXL = dict(  # SDXL 1.0's UNet configuration (2.6 B parameters)
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
UNETS = {
    "full": dict(  # Stable Diffusion 1.5's UNet configuration (860 M parameters)
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "small": dict(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sdxl": SDXL,
    # SDXL's widths and blocks with 2 of the 10 transformer layers of its deepest level (0.9 B parameters): the
    # reference's copy and LoRA Lab's model fit a 24 GB CPU machine in fp32
    "sdxl-block": {**SDXL, "transformer_layers_per_block": (1, 2, 2)},
    "sdxl-small": {**SDXL, "block_out_channels": (32, 64, 64), "transformer_layers_per_block": (1, 1, 1),
                   "attention_head_dim": (2, 4, 4), "cross_attention_dim": 32, "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": 16 + 6 * 8, "sample_size": 8, "layers_per_block": 1},
}
FLUX = dict(num_layers=19, num_single_layers=38, guidance_embeds=True)  # Flux.1-dev's transformer (12 B parameters)
TRANSFORMERS = {
    "flux": FLUX,
    # Flux's widths with 1 of its 19 double and 2 of its 38 single blocks (0.7 B parameters): fits a CPU in fp32
    "flux-block": {**FLUX, "num_layers": 1, "num_single_layers": 2},
    "flux-small": {**FLUX, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                   "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)},
}
QWEN_IMAGE = {}  # diffusers' defaults are Qwen-Image's transformer (20 B parameters)
QWEN_TRANSFORMERS = {
    "qwen-image": QWEN_IMAGE,
    "qwen-image-small": {"num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                         "axes_dims_rope": (4, 6, 6)},
}
WAN = {  # Wan 2.1 T2V 14B's transformer, also each expert of Wan 2.2 T2V A14B (diffusers' defaults; 14 B parameters)
    "num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "patch_size": (1, 2, 2), "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
}
WAN_TRANSFORMERS = {
    "wan-14b": WAN,
    # Wan 2.1 T2V 1.3B (width 1536, 30 blocks; 1.4 B parameters), as diffusers' convert_wan_to_diffusers.py builds it
    "wan-1.3b": {**WAN, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "wan-small": {**WAN, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 1,
                  "text_dim": 32, "freq_dim": 32},
}
HUNYUAN_TRANSFORMERS = {
    "hunyuan-video": {},  # diffusers' defaults are HunyuanVideo's transformer (20 double, 40 single blocks; 13 B)
    "hunyuan-video-small": {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1, "num_single_layers": 1,
                            "text_embed_dim": 32, "pooled_projection_dim": 32, "rope_axes_dim": (4, 6, 6)},
}
VIDEO_TRANSFORMERS = {**WAN_TRANSFORMERS, **HUNYUAN_TRANSFORMERS}
VIDEO_SIZES = {**dict.fromkeys(WAN_TRANSFORMERS, (480, 832)),  # height, width: Wan 2.1's 480p
               **dict.fromkeys(HUNYUAN_TRANSFORMERS, (544, 960))}  # HunyuanVideo's 540p
VIDEO_FRAMES = 33
WAN_TEXT_TOKENS = 512  # umT5 states zero-padded to 512 tokens, as WanPipeline passes them
FLUX_TEXT_TOKENS = 512  # T5 tokens of Flux.1-dev
HUNYUAN_TEXT_TOKENS = 128  # a long caption's Llama tokens after the template (the pipeline keeps up to 256)
QWEN_TEXT_TOKENS = 128  # a long caption's Qwen2.5-VL tokens after the template (the pipeline keeps up to 512)
DEFAULT_RESOLUTION = {"full": 512, "sdxl": 1024, "sdxl-block": 1024, "flux": 1024, "flux-block": 1024,
                      "qwen-image": 1024}  # small: 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RANK = 8


class SyntheticBackend(TrainingBackend):
    """The UNet with fixed random latents and text embeddings standing in for the VAE and CLIP."""

    def __init__(self, unet, scheduler, latent_size: int, device: torch.device) -> None:
        self.unet, self.scheduler, self.device = unet, scheduler, device
        generator = torch.Generator().manual_seed(0)
        self.latent = torch.randn(4, latent_size, latent_size, generator=generator).to(device)
        self.embedding = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to(device, unet.dtype)
        self.added = None  # SDXL's pooled text embedding and size/crop numbers
        if unet.config.addition_embed_type == "text_time":
            pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            self.added = {"text_embeds": torch.randn(1, pooled_width, generator=generator).to(device, unet.dtype),
                          "time_ids": torch.tensor([[8.0 * latent_size] * 2 + [0.0] * 2 + [8.0 * latent_size] * 2],
                                                   device=device, dtype=unet.dtype)}

    def alphas_cumprod(self):
        return self.scheduler.alphas_cumprod

    def encode_images(self, pixels, generator):
        return self.latent.expand(pixels.shape[0], -1, -1, -1)

    def encode_text(self, captions):
        return {"context": self.embedding.expand(len(captions), -1, -1)}

    def predict(self, noisy_latents, timesteps, conditioning):
        context, batch = conditioning["context"], noisy_latents.shape[0]
        added = None if self.added is None else {key: value.expand(batch, -1) for key, value in self.added.items()}
        return self.unet(noisy_latents.to(self.unet.dtype), timesteps, encoder_hidden_states=context,
                         added_cond_kwargs=added).sample

    def adapter_targets(self, preset, text_encoder):
        return named_for_kohya(UNET_PREFIX, find_targets(self.unet, preset))

    def loadable_modules(self):
        return self.adapter_targets("full", False)

    def frozen_modules(self):
        return [self.unet]

    def checkpoint_blocks(self):
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]

    def unet_activations(self):
        return (SDXL_FAMILY if self.added is not None else SD1).unet_activations


class SyntheticFluxBackend(FluxBackend):
    """Flux's transformer with fixed random latents and T5/CLIP outputs standing in for the VAE and text encoders;
    the denoiser call (2×2 packing, ids, guidance 1) is FluxBackend's."""

    time_scale = 1.0  # the reference's time input is σ (train_dreambooth_lora_flux.py passes timesteps / 1000)

    def __init__(self, transformer, latent_size: int, device: torch.device) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        super().__init__(SimpleNamespace(transformer=transformer, vae=None, text_encoder=None, scheduler=scheduler,
                                         vae_scale_factor=8, components={}))
        generator = torch.Generator().manual_seed(0)
        config, dtype = transformer.config, transformer.dtype
        self.latent = torch.randn(16, latent_size, latent_size, generator=generator).to(device)
        self.context = torch.randn(1, FLUX_TEXT_TOKENS, config.joint_attention_dim, generator=generator).to(device, dtype)
        self.pooled = torch.randn(1, config.pooled_projection_dim, generator=generator).to(device, dtype)

    def encode_images(self, pixels, generator):
        return self.latent.expand(pixels.shape[0], -1, -1, -1)

    def encode_text(self, captions):
        return {"context": self.context.expand(len(captions), -1, -1), "pooled": self.pooled.expand(len(captions), -1)}

    def frozen_modules(self):
        return [self.transformer]


class SyntheticQwenImageBackend(QwenImageBackend):
    """Qwen-Image's transformer with fixed random latents and Qwen2.5-VL hidden states standing in for the VAE and
    text encoder; the denoiser call (2×2 packing, img_shapes, text mask) is QwenImageBackend's."""

    time_scale = 1.0  # σ, as train_dreambooth_lora_qwen_image.py passes it

    def __init__(self, transformer, latent_size: int, device: torch.device) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                                                    time_shift_type="exponential")
        super().__init__(SimpleNamespace(transformer=transformer, vae=None, text_encoder=None, scheduler=scheduler,
                                         vae_scale_factor=8, components={}))
        generator = torch.Generator().manual_seed(0)
        self.latent = torch.randn(16, latent_size, latent_size, generator=generator).to(device)
        width = transformer.config.joint_attention_dim
        self.context = torch.randn(1, QWEN_TEXT_TOKENS, width, generator=generator).to(device, transformer.dtype)

    def encode_images(self, pixels, generator):
        return self.latent.expand(pixels.shape[0], -1, -1, -1)

    def encode_text(self, captions):
        context = self.context.expand(len(captions), -1, -1)
        return {"context": context, "context_mask": torch.ones(context.shape[:2], dtype=torch.long,
                                                                device=context.device)}

    def frozen_modules(self):
        return [self.transformer]


class SyntheticWanBackend(WanBackend):
    """Wan's transformer with fixed random video latents [16, F', H/8, W/8] and umT5 states [1, 512, text_dim]
    standing in for the VAE and text encoder; the denoiser call (latents as they are, σ·1000) is WanBackend's."""

    time_scale = 1000.0  # σ·1000, as WanPipeline passes the scheduler's timesteps (and LoRA Lab's objective does)

    def __init__(self, transformer, latent_size: tuple[int, int, int], device: torch.device) -> None:
        """`latent_size`: latent frames, height, width."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(SimpleNamespace(transformer=transformer, vae=None, text_encoder=None,
                                         scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), config={},
                                         components={}))
        generator = torch.Generator().manual_seed(0)
        self.latent = torch.randn(16, *latent_size, generator=generator).to(device)
        width = transformer.config.text_dim
        self.context = torch.randn(1, WAN_TEXT_TOKENS, width, generator=generator).to(device, transformer.dtype)

    def encode_images(self, pixels, generator):
        return self.latent.expand(pixels.shape[0], -1, -1, -1, -1)

    def encode_text(self, captions):
        return {"context": self.context.expand(len(captions), -1, -1)}

    def frozen_modules(self):
        return [self.transformer]


class SyntheticHunyuanVideoBackend(HunyuanVideoBackend):
    """HunyuanVideo's transformer with fixed random video latents [16, F', H/8, W/8], Llama states [1, 128, 4096] and
    a CLIP-L pooled output standing in for the VAE and text encoders; the denoiser call (mask, guidance 1·1000,
    σ·1000) is HunyuanVideoBackend's."""

    time_scale = 1000.0  # σ·1000, as HunyuanVideoPipeline passes the scheduler's timesteps

    def __init__(self, transformer, latent_size: tuple[int, int, int], device: torch.device) -> None:
        """`latent_size`: latent frames, height, width."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(SimpleNamespace(transformer=transformer, vae=None, text_encoder=None,
                                         scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), components={}))
        generator = torch.Generator().manual_seed(0)
        config, dtype = transformer.config, transformer.dtype
        self.latent = torch.randn(16, *latent_size, generator=generator).to(device)
        self.context = torch.randn(1, HUNYUAN_TEXT_TOKENS, config.text_embed_dim, generator=generator).to(device, dtype)
        self.pooled = torch.randn(1, config.pooled_projection_dim, generator=generator).to(device, dtype)

    def encode_images(self, pixels, generator):
        return self.latent.expand(pixels.shape[0], -1, -1, -1, -1)

    def encode_text(self, captions):
        context = self.context.expand(len(captions), -1, -1)
        return {"context": context, "pooled": self.pooled.expand(len(captions), -1),
                "context_mask": torch.ones(context.shape[:2], dtype=torch.long, device=context.device)}

    def frozen_modules(self):
        return [self.transformer]


SYNTHETIC_FLOW_BACKENDS = {**dict.fromkeys(TRANSFORMERS, SyntheticFluxBackend),
                           **dict.fromkeys(QWEN_TRANSFORMERS, SyntheticQwenImageBackend),
                           **dict.fromkeys(WAN_TRANSFORMERS, SyntheticWanBackend),
                           **dict.fromkeys(HUNYUAN_TRANSFORMERS, SyntheticHunyuanVideoBackend)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak since start or the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


RUNTIME_RSS: list[int] = []  # the resident memory before the denoiser is built: Python, PyTorch, diffusers
RUNTIME_MALLOC: list[int] = []  # and the bytes glibc's malloc had handed out then
MALLOC_PEAKS: list[int] = []  # on a CPU, each LoRA Lab block's peak of malloc's bytes in use above RUNTIME_MALLOC


class MallocInfo(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> int:
    """The bytes glibc's malloc has handed out and not taken back (heap chunks in use and mmapped chunks): the tensors
    alive and little else, whatever freed memory malloc keeps, which the RSS also counts."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallocInfo
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@contextmanager
def malloc_peak(peaks: list[int]) -> Iterator[None]:
    """Append the peak of `malloc_in_use` inside the block, read every half millisecond by a thread (PyTorch's
    kernels let go of the GIL while they run)."""
    peak, done = [malloc_in_use()], threading.Event()

    def poll() -> None:
        while not done.wait(0.0005):
            peak[0] = max(peak[0], malloc_in_use())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        peaks.append(max(peak[0], malloc_in_use()))


def memory_baseline(device: torch.device) -> int:
    """The memory resident now, the peak reset to it: PyTorch's allocator on CUDA, the process's RSS on a CPU (Linux
    resets VmHWM to the current RSS when "5" is written to clear_refs)."""
    if device.type != "cuda":
        Path("/proc/self/clear_refs").write_text("5")
        return resident_bytes()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_above(device: torch.device, baseline: int) -> tuple[int, int]:
    """The peak since `memory_baseline` above its resident memory (weights, adapters, optimizer state), and the
    absolute peak (weights included; on a CPU, above the RSS before the denoiser was built)."""
    if device.type != "cuda":
        peak = max(resident_bytes("VmHWM"), baseline)
        return peak - baseline, peak - RUNTIME_RSS[0]
    peak = torch.cuda.max_memory_allocated()
    return peak - baseline, peak


PLANS: list = []  # lora_core's memory plan of each LoRA Lab block, before its first step


def lora_lab_block(backend, dataset, network, steps: int, precision: str, conv_kernels: str,
                   gradient_checkpointing: bool, blocks_to_swap: int = 0, offload: bool = False
                   ) -> tuple[list[float], tuple[int, int], list[float]]:
    """`steps` optimizer steps through lora_core.train; per-step seconds, peak memory (above, total), losses."""
    baseline = memory_baseline(backend.device)
    stamps: list[float] = []

    def record(report) -> None:
        synchronize(backend.device)
        stamps.append(time.perf_counter())

    # no validation loss: the loop computes one after the last step, which the last interval would time (the
    # reference has none)
    config = TrainingConfig(steps=steps, gradient_accumulation=1, mixed_precision=precision, validation_every=0,
                            cpu_conv_kernels=conv_kernels, gradient_checkpointing=gradient_checkpointing,
                            blocks_to_swap=blocks_to_swap, cpu_offload_checkpointing=offload)
    with malloc_peak(MALLOC_PEAKS) if backend.device.type == "cpu" else nullcontext():
        result = train(backend, network, dataset, config, callback=record, memory_plan=PLANS.append)
    return list(np.diff(stamps)), peak_above(backend.device, baseline), result.losses


def reference_block(model: torch.nn.Module, loss: Callable[[torch.Generator], torch.Tensor], device: torch.device,
                    steps: int) -> tuple[list[float], tuple[int, int], list[float]]:
    """The diffusers LoRA scripts' inner loop on a PEFT-adapted denoiser: `loss` draws noise and time and predicts."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    baseline = memory_baseline(device)
    stamps, losses = [], []
    for _ in range(steps):
        value = loss(generator)
        value.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value.item())
        synchronize(device)
        stamps.append(time.perf_counter())
    return list(np.diff(stamps)), peak_above(device, baseline), losses


def unet_loss(unet, scheduler, backend: SyntheticBackend, dtype: torch.dtype) -> Callable[[torch.Generator], torch.Tensor]:
    """train_text_to_image_lora.py: ε-prediction at a uniform timestep, the forward under autocast."""
    device, latents = backend.device, backend.latent[None]

    def loss(generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(noisy, timesteps, backend.embedding, added_cond_kwargs=backend.added).sample
        return F.mse_loss(prediction.float(), noise.float())

    return loss


def flow_loss(backend: FluxBackend | QwenImageBackend | WanBackend, dtype: torch.dtype
              ) -> Callable[[torch.Generator], torch.Tensor]:
    """train_dreambooth_lora_{flux,qwen_image}.py: σ logit-normal, x_σ = (1 − σ)·x + σ·noise, the velocity noise − x as the
    target; the transformer called on packed latents with image/text ids and guidance (Wan: on the video latents
    as they are, σ·1000 as its time), as `backend.predict` does."""
    device, latents = backend.device, backend.latent[None]
    conditioning = backend.encode_text([""])

    def loss(generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        sigmas = torch.sigmoid(torch.randn((1,), generator=generator)).to(device)
        per_sample = sigmas.view(-1, *[1] * (latents.dim() - 1))
        noisy = (1 - per_sample) * latents + per_sample * noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = backend.predict(noisy, sigmas * backend.time_scale, conditioning)
        return F.mse_loss(prediction.float(), (noise - latents).float())

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted({**UNETS, **TRANSFORMERS, **QWEN_TRANSFORMERS, **VIDEO_TRANSFORMERS}),
                        default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: 512 (full), 1024 (sdxl, sdxl-block, flux, flux-block, qwen-image), 64 (the "
                        "small ones); not for the video sizes (--height, --width)")
    parser.add_argument("--height", type=int, default=None,
                        help="video sizes (wan-*, hunyuan-video*): frame height in pixels, a multiple of 16 "
                        "(default 480 for Wan, 544 for HunyuanVideo)")
    parser.add_argument("--width", type=int, default=None,
                        help="video sizes: frame width in pixels, a multiple of 16 (default 832 for Wan, 960 for "
                        "HunyuanVideo)")
    parser.add_argument("--frames", type=int, default=None,
                        help=f"video sizes: frames of the clip, 4k+1 (default {VIDEO_FRAMES}); latents hold "
                        "(frames − 1) // 4 + 1 of them")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per block (after 2 warm-up steps)")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks of each trainer")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                        help="LoRA Lab's autocast setting (the reference always autocasts to --dtype)")
    parser.add_argument("--cpu-conv-kernels", choices=["by_size", "pytorch", "both"], default="by_size",
                        help="LoRA Lab's TrainingConfig.cpu_conv_kernels; both: also time LoRA Lab with PyTorch's own "
                        "kernel choice (the lever's before/after in one run)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="both trainers recompute the denoiser's blocks in backward (LoRA Lab's setting; the "
                        "reference calls diffusers' enable_gradient_checkpointing, as its scripts' flag does)")
    parser.add_argument("--blocks-to-swap", type=int, nargs="+", default=[0],
                        help="LoRA Lab's blocks_to_swap; several values: one LoRA Lab trainer each, timed in the same "
                        "run (lora_lab_swap_N beside lora_lab), so their step and memory ratios share one process")
    parser.add_argument("--cpu-offload-checkpointing", action="store_true",
                        help="LoRA Lab keeps the checkpointed blocks' inputs in host memory (with "
                        "--gradient-checkpointing; transformers on CUDA)")
    parser.add_argument("--fp8", action="store_true",
                        help="LoRA Lab's denoiser stored in fp8 e4m3fn and cast per layer (lora_core's --base-dtype fp8); "
                             "the reference keeps --dtype")
    parser.add_argument("--skip-reference", action="store_true",
                        help="time and measure LoRA Lab alone: no copy of the denoiser for the reference, no "
                        "reference trainer, no ratios (a 14 B video transformer's two copies need not fit)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of "
                        "one block of each trainer to stderr")
    args = parser.parse_args()

    from peft import LoraConfig

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    video = args.size in VIDEO_TRANSFORMERS
    if video:
        if args.resolution is not None:
            parser.error(f"--size {args.size} is a video transformer: give --height and --width, not --resolution")
        height, width = args.height or VIDEO_SIZES[args.size][0], args.width or VIDEO_SIZES[args.size][1]
        frames = VIDEO_FRAMES if args.frames is None else args.frames
        if height <= 0 or width <= 0 or height % 16 or width % 16:
            parser.error(f"--height and --width must be positive multiples of 16 (8× VAE, 2×2 patches); got "
                         f"{height}×{width}")
        if frames < 1 or (frames - 1) % 4:
            parser.error(f"--frames must be 4k+1 (1, 5, …, 33, …, 81): the VAE compresses 4 frames to one after "
                         f"the first; got {frames}")
        latent_frames = (frames - 1) // 4 + 1
        latent_size = (latent_frames, height // 8, width // 8)
        tokens = latent_frames * (height // 16) * (width // 16)
        resolution = min(height, width)  # the dataset's square crop; the synthetic backend ignores the pixels
    else:
        if args.height is not None or args.width is not None or args.frames is not None:
            parser.error(f"--height, --width and --frames are for the video sizes (wan-*, hunyuan-video*); --size "
                         f"{args.size} takes --resolution")
        resolution = args.resolution or DEFAULT_RESOLUTION.get(args.size, 64)
        height = width = resolution
        frames, latent_size = 1, resolution // 8
        # the transformers' 2×2-packed latent tokens (a UNet has none)
        tokens = (resolution // 16) ** 2 if args.size in SYNTHETIC_FLOW_BACKENDS else None
    torch.manual_seed(0)
    import diffusers  # noqa: F401  (before the runtime's RSS is read)

    RUNTIME_RSS.append(resident_bytes())
    RUNTIME_MALLOC.append(malloc_in_use())
    if args.size in TRANSFORMERS:
        from diffusers import FluxTransformer2DModel

        with device:
            model = FluxTransformer2DModel(**TRANSFORMERS[args.size]).to(dtype)
        targets = list(find_targets(model, FLUX_PRESETS["attention"]))  # the very layers LoRA Lab adapts
    elif args.size in QWEN_TRANSFORMERS:
        from diffusers import QwenImageTransformer2DModel

        with device:
            model = QwenImageTransformer2DModel(**QWEN_TRANSFORMERS[args.size]).to(dtype)
        targets = list(find_targets(model, QWEN_PRESETS["attention"]))
    elif args.size in HUNYUAN_TRANSFORMERS:
        from diffusers import HunyuanVideoTransformer3DModel

        with device:
            model = HunyuanVideoTransformer3DModel(**HUNYUAN_TRANSFORMERS[args.size]).to(dtype)
        targets = list(find_targets(model, HUNYUAN_VIDEO_PRESETS["attention"]))
    elif video:
        from diffusers import WanTransformer3DModel

        with device:
            model = WanTransformer3DModel(**WAN_TRANSFORMERS[args.size]).to(dtype)
        kept = model._keep_in_fp32_modules  # fp32 where from_pretrained(torch_dtype=…) keeps it: rope, norms…
        for name, module in model.named_modules():  # (rope's frequency buffers too)
            if any(part in kept for part in name.split(".")):
                module.float()
        for name, parameter in model.named_parameters():  # scale_shift_table
            if any(part in kept for part in name.split(".")):
                parameter.data = parameter.data.float()
        targets = list(find_targets(model, WAN_PRESETS["attention"]))
    else:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        with device:
            model = UNet2DConditionModel(**UNETS[args.size]).to(dtype)
        targets = ["to_k", "to_q", "to_v", "to_out.0"]
    reference_model = None if args.skip_reference else copy.deepcopy(model)
    model.requires_grad_(False)
    if args.fp8:
        from lora_core.fp8 import store_in_fp8

        store_in_fp8(model, torch.float8_e4m3fn)
    if reference_model is not None:
        reference_model.requires_grad_(False)
        if args.gradient_checkpointing:
            reference_model.enable_gradient_checkpointing()
        reference_model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                               target_modules=targets))
        for parameter in reference_model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()

    reference_loss = None
    if args.size in SYNTHETIC_FLOW_BACKENDS:
        synthetic = SYNTHETIC_FLOW_BACKENDS[args.size]
        backend = synthetic(model, latent_size, device)
        if reference_model is not None:
            reference_loss = flow_loss(synthetic(reference_model, latent_size, device), dtype)
    else:
        backend = SyntheticBackend(model, scheduler, latent_size, device)
        if reference_model is not None:
            reference_loss = unet_loss(reference_model, scheduler, backend, dtype)
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=RANK).to(device)
    with tempfile.TemporaryDirectory() as folder:  # images of the frame size: only their count matters
        rng = np.random.default_rng(0)
        for index in range(4):
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(f"{folder}/{index}.png")
        dataset = ImageFolderDataset(folder, DatasetConfig(resolution=resolution))

    before = {k: v.clone() for k, v in network.state_dict().items()}
    kernel_choices = ["by_size", "pytorch"] if args.cpu_conv_kernels == "both" else [args.cpu_conv_kernels]
    trainers = {}
    for choice in kernel_choices:
        name = "lora_lab" if choice == kernel_choices[0] else f"lora_lab_{choice}_kernels"
        trainers[name] = functools.partial(lora_lab_block, backend, dataset, network, args.steps + 2,
                                           args.mixed_precision, choice, args.gradient_checkpointing,
                                           args.blocks_to_swap[0], args.cpu_offload_checkpointing)
    for count in args.blocks_to_swap[1:]:
        trainers[f"lora_lab_swap_{count}"] = functools.partial(
            lora_lab_block, backend, dataset, network, args.steps + 2, args.mixed_precision, kernel_choices[0],
            args.gradient_checkpointing, count, args.cpu_offload_checkpointing)
    if reference_model is not None:
        trainers["reference"] = lambda: reference_block(reference_model, reference_loss, device, args.steps + 2)
    results = {name: {"seconds": [], "memory": [], "memory_total": [], "losses": []} for name in trainers}
    failures: dict[str, str] = {}  # a trainer that raised (e.g. a CUDA error) is reported and left out of later blocks
    for _ in range(args.blocks):
        for name, block in trainers.items():
            if name in failures:
                continue
            try:
                seconds, memory, losses = block()
            except (RuntimeError, ValueError) as error:  # a CUDA error; a run the memory plan refuses
                failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                print(f"{name} failed:", file=sys.stderr)
                traceback.print_exc()
                continue
            results[name]["seconds"] += seconds[1:]  # the first interval still warms up
            results[name]["memory"].append(memory[0])
            results[name]["memory_total"].append(memory[1])
            results[name]["losses"] += losses
    results = {name: result for name, result in results.items() if name not in failures}

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        for name, block in (("reference", lambda: reference_block(reference_model, reference_loss, device, 3)),
                            ("lora_lab", lambda: lora_lab_block(backend, dataset, network, 3, args.mixed_precision,
                                                                kernel_choices[0], args.gradient_checkpointing))):
            if name in failures or name not in trainers:
                continue
            with profile(activities=activities) as profiler:
                block()
            print(f"== {name}\n{profiler.key_averages().table(sort_by=sort, row_limit=18)}", file=sys.stderr)

    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "denoiser": args.size, "dtype": args.dtype, "lora_lab_fp8_weights": args.fp8,
        "lora_lab_mixed_precision": args.mixed_precision,
        "resolution": None if video else resolution, "height": height, "width": width, "frames": frames,
        "tokens": tokens, "rank": RANK, "lora_lab_cpu_conv_kernels": kernel_choices[0],
        "gradient_checkpointing": args.gradient_checkpointing, "skip_reference": args.skip_reference,
        "lora_lab_cpu_offload_checkpointing": args.cpu_offload_checkpointing,
        "weight_bytes_each": sum(p.numel() * p.element_size() for p in model.parameters()),
        "denoiser_parameters": sum(p.numel() for p in model.parameters()),
        "lora_parameters": {"lora_lab": sum(p.numel() for p in network.parameters())} | (
            {} if reference_model is None else
            {"reference": sum(p.numel() for p in reference_model.parameters() if p.requires_grad)}),
        "median_step_seconds": {name: statistics.median(result["seconds"]) for name, result in results.items()},
        "peak_memory_bytes": {name: max(result["memory"]) for name, result in results.items()},
        # the absolute peak, weights included (with the reference: both copies of the denoiser are resident)
        "peak_memory_total_bytes": {name: max(result["memory_total"]) for name, result in results.items()},
        # lora_core's plan of LoRA Lab's peak with one copy of the denoiser, against the measured one: the absolute
        # peak alone, beside the reference its weights (parameters and buffers) plus its peak above them
        "memory_plan": PLANS[0].describe() if PLANS else None,
        "planned_bytes": PLANS[0].total if PLANS else None,
        "memory_plans": [plan.describe() for plan in PLANS],  # every LoRA Lab block's, in the order they ran
        # on a CPU: the peak RSS above the process's before the denoiser was built (without the reference alone)
        "lora_lab_measured_bytes": None if "lora_lab" not in results or (
            device.type != "cuda" and reference_model is not None) else (
            max(results["lora_lab"]["memory_total"]) if reference_model is None else
            sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            + max(results["lora_lab"]["memory"])),
        # on a CPU: the peak of malloc's bytes in use above the runtime's (LoRA Lab's first block; the tensors alive)
        "lora_lab_malloc_peak_bytes": MALLOC_PEAKS[0] - RUNTIME_MALLOC[0] if MALLOC_PEAKS else None,
        "lora_lab_parameter_dtypes": sorted({str(p.dtype) for p in network.parameters()}),
        "losses_finite": all(bool(np.isfinite(result["losses"]).all()) for result in results.values()),
        "lora_lab_weights_changed": any(not torch.equal(v, before[k]) for k, v in network.state_dict().items()),
        "failures": failures,
    }
    seconds = report["median_step_seconds"]
    if {"lora_lab", "reference"} <= seconds.keys():
        report["step_ratio"] = seconds["lora_lab"] / seconds["reference"]
        for name in seconds.keys() - {"lora_lab", "reference"}:
            report[f"step_ratio_{name}"] = seconds[name] / seconds["reference"]
        if device.type == "cuda":
            report["memory_ratio"] = report["peak_memory_bytes"]["lora_lab"] / report["peak_memory_bytes"]["reference"]
    totals = report["peak_memory_total_bytes"]
    for name in sorted(seconds.keys() - {"lora_lab", "reference"}):
        if name.startswith("lora_lab_swap_") and "lora_lab" in seconds:  # block swap against none, same process
            report[f"{name}_step_ratio"] = seconds[name] / seconds["lora_lab"]
            if device.type == "cuda":
                report[f"{name}_peak_ratio"] = totals[name] / totals["lora_lab"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
