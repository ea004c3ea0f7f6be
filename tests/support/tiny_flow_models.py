"""Tiny random FluxPipeline, ChromaPipeline and StableDiffusion3Pipeline with the real diffusers architectures, built
offline.

CLIP tokenizers are written from a word list as in `lora_core/tiny_model.py`; T5's is a `tokenizers` Unigram model
over the same words (T5TokenizerFast, the class both pipelines' type hints name). Every weight is random.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lora_core.demo.tiny_model import DEMO_WORDS, write_tokenizer_files

CLIP_WIDTH = 32
T5_WIDTH = 64


def clip_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as directory:
        files = write_tokenizer_files(Path(directory))
        return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77)


def clip_text_encoder(tokenizer, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=CLIP_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_tokenizer():
    """A T5TokenizerFast over the demo words (SentencePiece-style `▁word` pieces) and single letters."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + word, -1.0) for word in DEMO_WORDS]
    pieces += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz"] + [("▁", -6.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def t5_encoder(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
        decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )).eval()  # as from_pretrained leaves it: T5's dropout off


def flow_vae(scaling_factor: float, shift_factor: float, seed: int):
    """A 16-channel AutoencoderKL without quant convs, 8× down-sampling, with the family's scale and shift."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """A random FluxPipeline: Flux.1-dev's layout (guidance embedding, dynamic shift) or, without
    `guidance_embeds`, schnell's (no guidance input, no shift); 1 double and 1 single block of width 32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)
                 if guidance_embeds else FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipeline = FluxPipeline(
        scheduler=scheduler, vae=flow_vae(0.3611, 0.1159, seed), text_encoder=clip_text_encoder(tokenizer, False, seed + 1),
        tokenizer=tokenizer, text_encoder_2=t5_encoder(tokenizer_2, seed + 2), tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_chroma(seed: int = 0):
    """A random ChromaPipeline: T5 alone, no guidance input, Flux's packing; 1 double and 1 single block of width 32
    and a 1-layer distilled guidance approximator (its 64 input channels are fixed, as in ComfyUI's)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed + 3)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=64, approximator_hidden_dim=32, approximator_layers=1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipeline = ChromaPipeline(scheduler=scheduler, vae=flow_vae(0.3611, 0.1159, seed), tokenizer=tokenizer,
                              text_encoder=t5_encoder(tokenizer, seed + 2), transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_sd3(seed: int = 0):
    """A random StableDiffusion3Pipeline in SD3.5's layout (qk RMSNorm, shift 3; block 0 with SD3.5 Medium's second
    self-attention), 2 joint blocks of width 128."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(  # ComfyUI's MMDiT: width 64·heads, as many blocks as heads (depth)
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=128, pooled_projection_dim=2 * CLIP_WIDTH,
        out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=flow_vae(1.5305, 0.0609, seed), text_encoder=clip_text_encoder(tokenizer, True, seed + 1),
        tokenizer=tokenizer, text_encoder_2=clip_text_encoder(tokenizer, True, seed + 2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(tokenizer_3, seed + 3), tokenizer_3=tokenizer_3,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


COMFYUI = Path(__file__).resolve().parents[2] / ".cache" / "comfyui-0.3.64"
COMFY_CLIP_L = {"num_hidden_layers": 2, "hidden_size": CLIP_WIDTH, "num_attention_heads": 4, "intermediate_size": 64,
                "hidden_act": "quick_gelu", "max_position_embeddings": 77, "eos_token_id": 2, "vocab_size": 1000}


def comfy_reads(family: str, unet_config: dict, lora_files: list[Path]) -> list[dict]:
    """What ComfyUI 0.3.64's core Load LoRA does with each file on its own `family` model (see the probe)."""
    import json
    import subprocess
    import sys

    probe = Path(__file__).with_name("comfy_flow_lora_probe.py")
    config = json.dumps({"unet": unet_config, "clip_l": COMFY_CLIP_L})
    done = subprocess.run([sys.executable, str(probe), str(COMFYUI), family, config, *map(str, lora_files)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def concept_images(directory: Path, count: int = 4, size: int = 64, seed: int = 0) -> Path:
    """`count` red circles of varying size and place on white, captioned "a photo of sks, red circle"."""
    from PIL import Image, ImageDraw

    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        radius, x, y = (size * (0.22 + 0.1 * torch.rand((), generator=generator).item()),
                        *(size * (0.4 + 0.2 * torch.rand(2, generator=generator))).tolist())
        image = Image.new("RGB", (size, size), (245, 245, 240))
        ImageDraw.Draw(image).ellipse((x - radius, y - radius, x + radius, y + radius), fill=(210, 30, 40))
        image.save(directory / f"circle_{index:02d}.png")
        (directory / f"circle_{index:02d}.txt").write_text("a photo of sks, red circle")
    return directory


def edit_pairs(folder: Path, count: int = 4) -> Path:
    """Red circles (the targets) whose references are the same circles in blue, as edit pairs."""
    import numpy as np
    from PIL import Image

    concept_images(folder, count)
    for path in sorted(folder.glob("*.png")):
        pixels = np.asarray(Image.open(path)).copy()
        red = pixels[..., 0] > 150
        pixels[red & (pixels[..., 1] < 100)] = (40, 30, 210)
        (folder / "control").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / "control" / path.name)
    return folder


def randomized(network, seed: int = 0, std: float = 0.1):
    """`network` with every parameter moved randomly off its initialisation, so ΔW ≠ 0 everywhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return network
