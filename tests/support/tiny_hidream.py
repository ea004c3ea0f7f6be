"""A tiny random HiDreamImagePipeline with the real diffusers architectures, built offline: CLIP-L and CLIP-G with
projections (128 positions: the pipeline pads CLIP prompts to 128 tokens), T5, a 2-layer Llama under the
character-level tokenizer of the tiny Lumina 2, and a HiDream transformer of width 32 with one double and one single
block, each image feed-forward a mixture of a shared and four routed experts (two chosen per token), as the real one.
Every weight is random."""
from __future__ import annotations

import torch

from support.tiny_flow_models import (
    CLIP_WIDTH,
    T5_WIDTH,
    clip_tokenizer,
    flow_vae,
    t5_encoder,
    t5_tokenizer,
)
from support.tiny_lumina2 import gemma_tokenizer

LLAMA_WIDTH = 32
SHIFT = 3.0  # diffusers' HiDream training script's FlowMatchEulerDiscreteScheduler


def clip_with_projection(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=128, projection_dim=CLIP_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()


def llama(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LLAMA_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, bos_token_id=2,
        eos_token_id=1,
    )).eval()


def tiny_hidream_transformer(seed: int):
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[T5_WIDTH, LLAMA_WIDTH], text_emb_dim=2 * CLIP_WIDTH,
        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16),
        llama_layers=[0, 1],
    ).eval()  # as from_pretrained leaves it (in train mode diffusers' HiDream returns its patches unpacked)


def build_tiny_hidream(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    clip, t5, text = clip_tokenizer(), t5_tokenizer(), gemma_tokenizer()
    pipeline = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=flow_vae(0.3611, 0.1159, seed),
        text_encoder=clip_with_projection(clip, seed + 1), tokenizer=clip,
        text_encoder_2=clip_with_projection(clip, seed + 2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(t5, seed + 4), tokenizer_3=t5,
        text_encoder_4=llama(text, seed + 5), tokenizer_4=text, transformer=tiny_hidream_transformer(seed + 3),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
