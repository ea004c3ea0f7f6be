"""Generates the random SD1.x checkpoint the ComfyUI integration tests load with CheckpointLoaderSimple.

ComfyUI recognises a checkpoint as SD1.5 from its UNet's `model_channels` (320) and `context_dim` (768) alone,
so the UNet here has one level with one res block and one transformer block, plus the usual middle block
(~26 M parameters); the CLIP-L text encoder and the VAE are full size. The weights come from torch's default
init with a fixed seed, so the file is byte for byte the same on each run with the same torch. Keys are in the
LDM layout of a real SD1.5 `.safetensors`, in fp16.

Run with the venv's python: `python tests/comfyui/make_checkpoint.py --comfy-dir .cache/comfyui --output X`.
The file is loaded back through ComfyUI before the script succeeds.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 0
# CLIP keys a real SD1.5 checkpoint lacks too; ComfyUI logs them as "clip missing" for every SD1.5 file.
KEYS_ABSENT_FROM_SD15_FILES = {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}


def import_comfy(comfy_dir: Path) -> None:
    """Makes ComfyUI's modules importable and puts ComfyUI on the CPU, as `main.py --cpu` does."""
    sys.path.insert(0, str(comfy_dir.resolve()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read when comfy.model_management is first imported


def reset_to_torch_default_init(module: torch.nn.Module) -> None:
    """Runs torch's own `reset_parameters` on every submodule: ComfyUI's layers override it to do nothing."""
    for submodule in module.modules():
        for cls in type(submodule).__mro__:
            if cls.__module__.startswith("torch.nn") and "reset_parameters" in vars(cls):
                cls.reset_parameters(submodule)
                break


def build_unet() -> torch.nn.Module:
    """The smallest LDM UNet that ComfyUI still detects as SD1.5."""
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    sd15 = comfy.supported_models.SD15
    unet_config = {
        **sd15.unet_config,
        **sd15.unet_extra_config,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "num_res_blocks": [1],
        "channel_mult": [1],
        "transformer_depth": [1],
        "transformer_depth_output": [1, 1],
        "transformer_depth_middle": 1,
        "use_spatial_transformer": True,
        "legacy": False,
        "use_checkpoint": False,
    }
    return UNetModel(**unet_config, device="cpu", operations=comfy.ops.disable_weight_init)


def build_text_encoder() -> torch.nn.Module:
    """CLIP-L as ComfyUI builds it for SD1.x (12 layers, width 768)."""
    import comfy.sd1_clip

    with torch.no_grad():  # its constructor writes a weight in place, as ComfyUI does under inference_mode
        return comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32).transformer.text_model


def build_vae() -> torch.nn.Module:
    """The SD1.x KL autoencoder with ComfyUI's default config."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    return AutoencoderKL(ddconfig=ddconfig, embed_dim=4)


def initialised_state_dict(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The module's weights after torch's default init, as fp16 under `prefix`; fails on any weight left unset."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.fill_(float("nan"))
        reset_to_torch_default_init(module)
    state_dict = {prefix + key: tensor.to(torch.float16).contiguous() for key, tensor in module.state_dict().items()}
    unset = [key for key, tensor in state_dict.items() if not torch.isfinite(tensor).all()]
    if unset:
        raise RuntimeError(f"weights not initialised by any reset_parameters: {unset[:5]}")
    return state_dict


def make_checkpoint() -> dict[str, torch.Tensor]:
    """The whole checkpoint's state dict with LDM key names."""
    torch.manual_seed(SEED)
    return {
        **initialised_state_dict(build_unet(), "model.diffusion_model."),
        **initialised_state_dict(build_text_encoder(), "cond_stage_model.transformer.text_model."),
        **initialised_state_dict(build_vae(), "first_stage_model."),
    }


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def verify_loads_as_sd15(path: Path) -> None:
    """Loads the file the way CheckpointLoaderSimple does; fails unless it is SD1.5 with all weights used."""
    import comfy.sd
    import comfy.supported_models

    collector = _WarningCollector()
    logging.getLogger().addHandler(collector)
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs CheckpointLoaderSimple
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    finally:
        logging.getLogger().removeHandler(collector)
    if type(model.model.model_config) is not comfy.supported_models.SD15:
        raise RuntimeError(f"detected as {type(model.model.model_config).__name__}, not SD15")
    if clip is None or vae is None:
        raise RuntimeError("the checkpoint gave no CLIP or no VAE")
    expected_clip_warning = f"clip missing: {sorted(KEYS_ABSENT_FROM_SD15_FILES)}"
    unexpected = [m for m in collector.messages if m != expected_clip_warning]
    if unexpected:
        raise RuntimeError(f"ComfyUI warned while loading the checkpoint: {unexpected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy-dir", type=Path, required=True, help="the ComfyUI checkout")
    parser.add_argument("--output", type=Path, required=True, help="the .safetensors file to write")
    args = parser.parse_args()

    import_comfy(args.comfy_dir)
    state_dict = make_checkpoint()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.stem + ".partial.safetensors")  # ComfyUI goes by the suffix
    try:
        save_file(state_dict, str(partial), metadata={"format": "pt"})  # one key: safetensors orders several at random
        verify_loads_as_sd15(partial)
        partial.replace(args.output)
    finally:
        partial.unlink(missing_ok=True)
    unet_parameters = sum(t.numel() for k, t in state_dict.items() if k.startswith("model.diffusion_model."))
    print(f"wrote {args.output}: {len(state_dict)} tensors, UNet {unet_parameters / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
