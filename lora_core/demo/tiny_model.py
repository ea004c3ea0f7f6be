"""A small random Stable Diffusion 1.x pipeline with the real diffusers architecture, built offline.

Nothing is downloaded: the CLIP tokenizer's vocabulary and merges are written here from a word list, and every
weight is random. Tests and the demo use it where a real SD1.5 checkpoint cannot be fetched.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
DEMO_WORDS = (
    "a photo of sks red blue green yellow circle square triangle on white background small large shape picture"
).split()


def byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tokenizer_files(directory: Path, words: tuple[str, ...] | list[str] = DEMO_WORDS) -> Path:
    """vocab.json and merges.txt of a CLIP BPE tokenizer that knows `words` whole and any other text by bytes."""
    vocabulary: list[str] = []
    for character in byte_alphabet():
        vocabulary += [character, character + "</w>"]
    merges: list[str] = []
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in vocabulary:
                vocabulary.append(pieces[0])
    vocabulary += SPECIAL_TOKENS
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocabulary)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return directory


def build_tiny_pipeline(seed: int = 0, resolution: int = 64, prediction_type: str = "epsilon"):
    """A random StableDiffusionPipeline: SD1.x block types and schedule, small widths (about 2 M parameters)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as directory:
        files = write_tokenizer_files(Path(directory))
        tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
