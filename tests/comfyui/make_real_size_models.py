"""Writes the real-size models tests/comfyui/test_real_size.py trains on into a ComfyUI checkout's model folders, with
random weights (torch's default init per layer, a fixed seed), laid out as the files people download:

- checkpoints/lora_lab_test_sdxl_full.safetensors: SDXL at full size in one file (UNet 2.6 B parameters, CLIP-L,
  CLIP-G in OpenCLIP's layout, VAE), fp16, as ComfyUI's own checkpoint saver lays it out;
- diffusion_models/lora_lab_test_flux_full_width_fp8.safetensors: a Flux.1-dev transformer in BFL's layout at full
  width (3072, 24 heads; 4096-wide text input) with 2 double and 2 single blocks instead of 19 and 38, its Linear
  weights in fp8 e4m3fn (norms and biases bf16), as the fp8 Flux files are;
- text_encoders/lora_lab_test_t5xxl_fp8_e4m3fn.safetensors (T5-XXL at full size, 4.7 B parameters, all fp8 as
  ComfyUI's t5xxl_fp8_e4m3fn: ComfyUI builds T5-XXL whole whatever a file holds) and lora_lab_test_clip_l.safetensors;
- vae/lora_lab_test_flux_ae.safetensors: Flux's 16-channel autoencoder.

Each model is built on the meta device from ComfyUI's own classes and made one layer at a time, so no full fp32 copy
is ever held; each file is loaded back through ComfyUI, which must detect its family. Run with the Python ComfyUI
runs in: `python tests/comfyui/make_real_size_models.py --comfy-dir .cache/comfyui-0.3.64`.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 0
SDXL_CHECKPOINT = "lora_lab_test_sdxl_full.safetensors"
FLUX_TRANSFORMER = "lora_lab_test_flux_full_width_fp8.safetensors"
T5XXL = "lora_lab_test_t5xxl_fp8_e4m3fn.safetensors"
CLIP_L = "lora_lab_test_clip_l.safetensors"
FLUX_VAE = "lora_lab_test_flux_ae.safetensors"
FLUX_BLOCKS = 2  # double blocks, and as many single blocks
LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial logit scale


def random_weights(model: torch.nn.Module, dtype: torch.dtype, prefix: str = "",
                   fp8_linear: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`model`'s state dict (built on the meta device) with torch's default init, made one module at a time in fp32 and
    stored in `dtype` (2-D Linear weights in `fp8_linear` where given). Parameters no reset_parameters sets: norm
    scales are 1, CLIP's logit scale its initial value; any other is an error."""
    out = {}
    for name, module in model.named_modules():
        own = dict([*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)])
        if not own:
            continue
        for key, tensor in own.items():
            setattr_tensor(module, key, torch.full(tensor.shape, float("nan")))
        reset_to_torch_default_init_once(module)
        for key in own:
            value = getattr(module, key)
            if not torch.isfinite(value).all():
                if key in ("scale", "weight") and "norm" in f"{name}.{key}".lower() or key == "scale":
                    value = torch.ones(value.shape)
                elif key == "logit_scale":
                    value = torch.full(value.shape, LOGIT_SCALE)
                else:
                    raise RuntimeError(f"{name}.{key} is set by no reset_parameters")
            storage = fp8_linear if fp8_linear and isinstance(module, torch.nn.Linear) and key == "weight" else dtype
            out[f"{prefix}{name}.{key}" if name else f"{prefix}{key}"] = value.to(storage).contiguous()
            setattr_tensor(module, key, torch.empty(value.shape, device="meta"))
    return out


def setattr_tensor(module: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    if key in module._parameters:
        module._parameters[key] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[key] = value


def reset_to_torch_default_init_once(module: torch.nn.Module) -> None:
    """torch's own reset_parameters of this module alone (not its children: they are made in their turn)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") and "reset_parameters" in vars(cls):
            with torch.no_grad():
                cls.reset_parameters(module)
            return


def on_meta(build):
    with torch.device("meta"):
        return build()


def sdxl_checkpoint() -> dict[str, torch.Tensor]:
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet_config = sdxl_unet_config()
    unet = on_meta(lambda: UNetModel(**unet_config, device="meta", operations=comfy.ops.disable_weight_init))
    state = random_weights(unet, torch.float16, "model.diffusion_model.")
    clip = on_meta(lambda: comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float32))
    clip_state = random_weights(clip, torch.float16)
    model_config = comfy.supported_models.SDXL(unet_config)
    state.update(model_config.process_clip_state_dict_for_saving(clip_state))
    state.update(random_weights(on_meta(lambda: AutoencoderKL(ddconfig=vae_config(4), embed_dim=4)), torch.float16,
                                "first_stage_model."))
    return state


def sdxl_unet_config() -> dict:
    """ComfyUI's SDXL UNet (its model_detection's entry for SDXL)."""
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
            "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "use_temporal_attention": False, "use_temporal_resblock": False}


def vae_config(channels: int) -> dict:
    return {"double_z": True, "z_channels": channels, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def flux_transformer() -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    params = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": FLUX_BLOCKS,
              "depth_single_blocks": FLUX_BLOCKS, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
              "guidance_embed": True}
    model = on_meta(lambda: Flux(**params, device="meta", dtype=torch.float32, operations=comfy.ops.disable_weight_init))
    return random_weights(model, torch.bfloat16, fp8_linear=torch.float8_e4m3fn)


def t5xxl() -> dict[str, torch.Tensor]:
    import comfy.text_encoders.sd3_clip

    encoder = on_meta(lambda: comfy.text_encoders.sd3_clip.T5XXLModel(device="meta", dtype=torch.float32))
    return random_weights(encoder.transformer, torch.float8_e4m3fn)


def clip_l() -> dict[str, torch.Tensor]:
    import comfy.sd1_clip

    encoder = on_meta(lambda: comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32))
    return random_weights(encoder.transformer, torch.float16)


def flux_vae() -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return random_weights(on_meta(lambda: AutoencoderKL(ddconfig=vae_config(16), embed_dim=16)), torch.float16)


def verify(kind: str, path: Path) -> str:
    """`path` loaded as its loader node loads it; the family ComfyUI detects, or an error."""
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    with torch.inference_mode():
        if kind == "checkpoint":
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
            assert type(model.model.model_config) is comfy.supported_models.SDXL and clip is not None and vae is not None
            return "SDXL"
        if kind == "diffusion_model":  # as Load Diffusion Model's weight_dtype fp8_e4m3fn loads it
            model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float8_e4m3fn})
            assert type(model.model.model_config) is comfy.supported_models.Flux, type(model.model.model_config)
            dtypes = {p.dtype for p in model.model.diffusion_model.parameters()}
            assert torch.float8_e4m3fn in dtypes, dtypes
            return "Flux (fp8)"
        if kind == "vae":
            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
            assert vae.latent_channels == 16
            return "Flux VAE"
    return kind


def write(path: Path, tensors: dict[str, torch.Tensor], kind: str) -> None:
    """Written beside the target and renamed when ComfyUI has read it back, so a half-written file never stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.safetensors")
    try:
        save_file(tensors, str(partial), metadata={"format": "pt"})
        found = verify(kind, partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    parameters = sum(tensor.numel() for tensor in tensors.values())
    print(f"wrote {path} ({found}): {len(tensors)} tensors, {parameters / 1e9:.2f} B values, "
          f"{path.stat().st_size / 2**30:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy-dir", type=Path, required=True, help="the ComfyUI checkout (0.3.64's layout)")
    args = parser.parse_args()
    from make_checkpoint import import_comfy  # beside this file, run as a script

    import_comfy(args.comfy_dir)
    models = args.comfy_dir / "models"
    files = [(models / "checkpoints" / SDXL_CHECKPOINT, sdxl_checkpoint, "checkpoint"),
             (models / "diffusion_models" / FLUX_TRANSFORMER, flux_transformer, "diffusion_model"),
             (models / "text_encoders" / T5XXL, t5xxl, "text_encoder"),
             (models / "text_encoders" / CLIP_L, clip_l, "text_encoder"),
             (models / "vae" / FLUX_VAE, flux_vae, "vae")]
    for path, make, kind in files:
        if not path.exists():
            torch.manual_seed(SEED)
            write(path, make(), kind)


if __name__ == "__main__":
    main()
