"""A tiny random WanPipeline with the real diffusers architectures, built offline: the Wan 2.1 VAE layout (16
latent channels, 4× temporal and 8× spatial compression, Wan's own latents_mean/std) narrow, a 2-block transformer of
width 32 and a 1-layer umT5 over the test T5 tokenizer; the scheduler is Wan's UniPC with its flow shift 3.0."""
from __future__ import annotations

import torch

from support.tiny_flow_models import t5_tokenizer

TEXT_WIDTH = 32


def wan22_vae(seed: int):
    """The Wan 2.2 VAE's layout (TI2V 5B's): residual blocks over 2×2-patched pixels (12 channels in), 48 latent
    channels, 16× spatial and 4× temporal compression, its own latents_mean/std (random here), narrow."""
    from diffusers import AutoencoderKLWan

    generator = torch.Generator().manual_seed(seed)
    mean, std = (torch.randn(48, generator=generator) * 0.5).tolist(), (torch.rand(48, generator=generator) + 0.5).tolist()
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                            patch_size=2, scale_factor_spatial=16, latents_mean=mean, latents_std=std)


def build_tiny_wan(seed: int = 0, experts: bool = False, ti2v: bool = False):
    """With `experts`, Wan 2.2 A14B's layout: a second transformer for the low noise levels, split at 0.875. With
    `ti2v`, Wan 2.2 TI2V 5B's: the 2.2 VAE, a transformer of 48 channels in and out, the time expanded per token
    (WanPipeline's expand_timesteps), UniPC's flow shift 5.0."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    vae = wan22_vae(seed) if ti2v else AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                                         temperal_downsample=[False, True, True])
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=tokenizer.vocab_size + 8, d_model=TEXT_WIDTH, d_ff=64,
                                               d_kv=16, num_heads=2, num_layers=1)).eval()
    transformers = []
    for offset in range(2 if experts else 1):
        torch.manual_seed(seed + 2 + offset)
        transformers.append(WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=vae.config.z_dim,
            out_channels=vae.config.z_dim, text_dim=TEXT_WIDTH, freq_dim=32, ffn_dim=64, num_layers=2,
            rope_max_seq_len=64))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=5.0 if ti2v else 3.0)
    pipeline = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                           transformer=transformers[0], transformer_2=transformers[1] if experts else None,
                           boundary_ratio=0.875 if experts else None, expand_timesteps=ti2v)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
