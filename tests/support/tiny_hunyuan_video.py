"""A tiny random HunyuanVideoPipeline with the real diffusers architectures, built offline: HunyuanVideo's VAE layout
(16 latent channels, 4× temporal and 8× spatial compression) narrow, a transformer of width 32 with one double and one
single block and the guidance embedding, a 3-layer Llama (the pipeline takes its third-last hidden states) under a
Llama-3-style tokenizer, and CLIP-L; the scheduler is FlowMatchEuler with HunyuanVideo's shift 7.

The tokenizer is built so that the pipeline's template means what it means with the real one: the template's text
before the caption is 95 tokens (the pipeline crops `crop_start` = 95), and the ids ComfyUI's template crop looks for
are Llama 3's (<|start_header_id|> 128006, "user" 882, <|end_header_id|> 128007, "\\n\\n" 271, <|eot_id|> 128009)."""
from __future__ import annotations

import json
import re
import string
from pathlib import Path

import torch

from support.tiny_flow_models import CLIP_WIDTH, clip_text_encoder, clip_tokenizer

LLAMA_WIDTH = 32
LLAMA_VOCAB = 128320  # Llama 3's ids, its pad 128258 among them
SPECIAL_IDS = {"<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
               "<|eot_id|>": 128009, "<pad>": 128258}
LLAMA3_IDS = {"\n\n": 271, "user": 882}
SHIFT = 7.0


def llama3_tokenizer_model():
    """A `tokenizers` BPE over characters that takes each word of HunyuanVideo's template whole (but "by", two
    characters: with the template's 93 other pieces that makes the real 95); other words are spelled out. Llama 3's
    special and template ids."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
        DEFAULT_PROMPT_TEMPLATE,
    )
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    vocab = {character: index for index, character in enumerate(
        ["<unk>", *string.ascii_letters, *string.digits, *string.punctuation])}
    vocab |= SPECIAL_IDS | LLAMA3_IDS
    words = re.findall(r"\w+|[^\w\s]+", re.sub(r"<\|\w+\|>|\{\}", " ", template))
    vocab |= {word: 1000 + index for index, word in enumerate(dict.fromkeys(words))
              if word not in vocab and word != "by"}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_IDS])
    tokenizer.add_tokens([AddedToken("\n\n", normalized=False)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", SPECIAL_IDS["<|begin_of_text|>"])])
    prefix = template[:template.index("{}")]
    count = len(tokenizer.encode(prefix).ids)
    assert count == DEFAULT_PROMPT_TEMPLATE["crop_start"], f"the template's prefix is {count} tokens"
    return tokenizer


def llama3_tokenizer():
    from transformers import LlamaTokenizerFast

    return LlamaTokenizerFast(tokenizer_object=llama3_tokenizer_model(), bos_token="<|begin_of_text|>",
                              eos_token="<|eot_id|>", pad_token="<pad>", add_bos_token=True, add_eos_token=False,
                              padding_side="right")


def llama3_tokenizer_folder(folder: Path) -> Path:
    """The same tokenizer in the files LlamaTokenizerFast reads (ComfyUI's copy lacks its llama tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    llama3_tokenizer_model().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<pad>", "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def build_tiny_hunyuan_video(seed: int = 0):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    tokenizer, clip = llama3_tokenizer(), clip_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                                    mid_block_add_attention=False)
    torch.manual_seed(seed + 1)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=LLAMA_VOCAB, hidden_size=LLAMA_WIDTH, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, pad_token_id=SPECIAL_IDS["<pad>"],
        bos_token_id=SPECIAL_IDS["<|begin_of_text|>"], eos_token_id=SPECIAL_IDS["<|eot_id|>"])).eval()
    torch.manual_seed(seed + 2)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, text_embed_dim=LLAMA_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        rope_axes_dim=(4, 6, 6))
    pipeline = HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=clip_text_encoder(clip, False, seed + 3),
        tokenizer_2=clip)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
