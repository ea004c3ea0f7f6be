"""A small random SDXL pipeline with the real diffusers classes and SDXL's layout, built offline.

SDXL's shape at small widths: a first level without attention, two res blocks per level, two transformer blocks per
attention below it (so block indices in kohya's SGM names are exercised), CLIP-L and OpenCLIP-G-with-projection text
encoders whose penultimate states concatenate to the cross-attention width, the size/crop `text_time` embedding, an
Euler scheduler and a VAE with SDXL's scaling factor and `force_upcast`. The tokenizers are written from a word list
(`lora_core.demo.tiny_model`); every weight is random.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lora_core.demo.tiny_model import write_tokenizer_files

TEXT_WIDTH = 32  # each encoder's width; the UNet's context is both, concatenated
TIME_EMBED_WIDTH = 8  # per size/crop number (SDXL: 256)
TEXT_LAYERS = 3  # ComfyUI needs more than two for the penultimate layer

# The same UNet in ComfyUI's words (`comfy.model_detection.detect_unet_config` of its SGM state dict).
COMFY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": TEXT_WIDTH + 6 * TIME_EMBED_WIDTH, "in_channels": 4,
    "out_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2], "channel_mult": [1, 2],
    "transformer_depth": [0, 0, 2, 2], "transformer_depth_output": [0, 0, 0, 2, 2, 2], "transformer_depth_middle": 2,
    "use_linear_in_transformer": True, "context_dim": 2 * TEXT_WIDTH, "num_head_channels": 16, "num_heads": -1,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# ComfyUI's SDXLClipModel at the same widths (`model_options` override its CLIP-L and CLIP-G json configs).
COMFY_CLIP_OPTIONS = {
    f"{name}_model_config": {"hidden_size": TEXT_WIDTH, "intermediate_size": 64, "num_attention_heads": 4,
                             "num_hidden_layers": TEXT_LAYERS, "projection_dim": TEXT_WIDTH}
    for name in ("clip_l", "clip_g")
}


def build_tiny_sdxl(seed: int = 0, resolution: int = 64, prediction_type: str = "epsilon"):
    """A random StableDiffusionXLPipeline (about 3 M parameters)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as directory:
        files = write_tokenizer_files(Path(directory))
        tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77)
        tokenizer_2 = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77,
                                    pad_token="!")  # OpenCLIP's padding, as SDXL's tokenizer_2 has it

    def text_config(**extra) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=TEXT_LAYERS, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **extra,
        )

    text_encoder = CLIPTextModel(text_config(pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(pad_token_id=tokenizer_2.pad_token_id,
                                                             projection_dim=TEXT_WIDTH, hidden_act="gelu"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=resolution, scaling_factor=0.13025, force_upcast=True,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=2 * TEXT_WIDTH, norm_num_groups=32, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * TIME_EMBED_WIDTH,  # pooled G + six size/crop numbers
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", prediction_type=prediction_type,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
