"""A tiny random Lumina2Pipeline with the real diffusers architectures, built offline: Gemma-2 (2 layers of width 32)
under a character-level GemmaTokenizer, a NextDiT of width 64 with grouped-query attention (2 query heads over 1
key/value head) in 2 joint layers and 1 layer per refiner, Flux's 16-channel VAE. Every weight is random."""
from __future__ import annotations

import string

import torch

from support.tiny_flow_models import flow_vae

TEXT_WIDTH = 32
SHIFT = 6.0  # Lumina-Image-2.0's scheduler (and ComfyUI's Lumina2 sampling): a fixed shift


def gemma_tokenizer():
    """Gemma's specials (pad 0, eos 1, bos 2, unk 3) and one token per printable character, ▁ for spaces."""
    from transformers import GemmaTokenizer

    characters = sorted(set(string.printable) - set(string.whitespace))
    return GemmaTokenizer(vocab={token: index for index, token in enumerate(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", *characters])}, merges=[])


def gemma_text_encoder(tokenizer, seed: int):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    return Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )).eval()


def tiny_lumina2_transformer(seed: int):
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, hidden_size=64, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 12, 12), cap_feat_dim=TEXT_WIDTH,
    )


def build_tiny_lumina2(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    tokenizer = gemma_tokenizer()
    pipeline = Lumina2Pipeline(
        transformer=tiny_lumina2_transformer(seed + 3), scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        vae=flow_vae(0.3611, 0.1159, seed), text_encoder=gemma_text_encoder(tokenizer, seed + 1), tokenizer=tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
