"""A tiny random QwenImagePipeline with the real diffusers architectures, built offline.

The tokenizer is Qwen2.5's own (the files ComfyUI ships in `comfy/text_encoders/qwen25_tokenizer`, which
`scripts/setup_comfyui.sh` unpacks), so the pipeline's prompt template drops its real 34 tokens; the Qwen2.5-VL text
encoder, the transformer and the Wan-style VAE are small and random.
"""
from __future__ import annotations

import torch

from support.tiny_flow_models import COMFYUI

QWEN_TOKENIZER = COMFYUI / "comfy" / "text_encoders" / "qwen25_tokenizer"
TEXT_WIDTH = 32
# Qwen-Image's scheduler_config (Qwen/Qwen-Image): resolution-dependent shift over 256…8192 image tokens
QWEN_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
                  "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential", "shift": 1.0}


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(QWEN_TOKENIZER)


def qwen_text_encoder(tokenizer, seed: int):
    """Qwen2.5-VL with a 2-layer text model of width 32 and a 1-layer vision tower (text prompts never run it)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
           for name in ("vision_start", "vision_end", "image_pad", "video_pad", "im_end")}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": TEXT_WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 152064, "rope_theta": 1e6,
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                     "bos_token_id": None, "eos_token_id": ids["im_end"]},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": TEXT_WIDTH},
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_vae(seed: int):
    """AutoencoderKLQwenImage in the real layout (16 channels, 8× down, causal 3D convolutions), narrow; Qwen-Image's
    own latents_mean/std."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])


def build_tiny_qwen_image(seed: int = 0):
    """A random QwenImagePipeline: 2 blocks of width 32 (2 heads of 16), joint attention over a width-32 text model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed + 3)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(4, 6, 6),
    )
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=qwen_vae(seed),
        text_encoder=qwen_text_encoder(tokenizer, seed + 1), tokenizer=tokenizer, transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def qwen_processor(tokenizer):
    """Qwen2.5-VL's processor over the tokenizer: Qwen2VLImageProcessor with Qwen2.5-VL's pixel bounds (transformers
    requires a video processor too; images never use it)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056),
                            tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())


def build_tiny_qwen_image_edit(pipeline: str = "QwenImageEditPlusPipeline", seed: int = 0):
    """Qwen-Image-Edit (QwenImageEditPipeline) or -2509 and later (QwenImageEditPlusPipeline) over the same tiny
    components as `build_tiny_qwen_image`, with Qwen2.5-VL's processor: the vision tower sees the references."""
    import diffusers

    base = build_tiny_qwen_image(seed)
    edit = getattr(diffusers, pipeline)(**base.components, processor=qwen_processor(base.tokenizer))
    edit.set_progress_bar_config(disable=True)
    return edit
