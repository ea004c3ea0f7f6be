"""Which base weights each target preset adapts in lora_core (on diffusers' model) and in the ComfyUI nodes (on
ComfyUI's model of the same architecture), run inside a ComfyUI checkout's Python.

`python presets_probe.py COMFY_DIR` builds, per family (SD1.x, SDXL, SD3, Flux.1, Chroma, Qwen-Image), the tiny
diffusers model the lora_core tests train and ComfyUI's model of the same layout (detected from the diffusers weights
as ComfyUI's loaders detect them; Flux, Chroma and Qwen-Image from their configs, which ComfyUI's detection fixes at
full width). Each adapted layer is written in ComfyUI's naming as (weight key, rows): lora_core's diffusers layers
through ComfyUI's own maps (`unet_to_diffusers`, `mmdit_to_diffusers`, `flux_to_diffusers`, Chroma's too; Qwen-Image
names them as diffusers does; a piece of a fused layer is its rows), the nodes' layers as whole weights. Prints one
JSON object {family: {preset: {"lora_core_only", "nodes_only", "values"}}}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families_probe import HUNYUAN_VIDEO_CONFIG, patcher  # noqa: E402
from model_machinery_probe import import_backend  # noqa: E402

from support.tiny_sdxl import COMFY_UNET_CONFIG  # noqa: E402

PRESETS = ("attention", "transformer", "full")
# lora_core.demo.tiny_model's UNet in ComfyUI's words (SDXL's: tests/support/tiny_sdxl.py)
SD1_CONFIG = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
              "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
              "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [1, 1, 0],
              "transformer_depth_output": [1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1, "context_dim": 32,
              "num_heads": 8, "num_head_channels": -1, "use_linear_in_transformer": False,
              "use_temporal_resblock": False, "use_temporal_attention": False}
FLUX_CONFIG = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
               "context_in_dim": 64, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
               "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True}


CHROMA_CONFIG = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
                 "context_in_dim": 64, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                 "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "in_dim": 64,
                 "out_dim": 32, "hidden_dim": 32, "n_layers": 1}  # support/tiny_flow_models.py's Chroma
QWEN_IMAGE_CONFIG = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
                     "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                     "axes_dims_rope": [4, 6, 6]}  # support/tiny_qwen_image.py's transformer
HIDREAM_CONFIG = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
                  "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 4, "caption_channels": [64, 32],
                  "text_emb_dim": 64, "num_routed_experts": 4, "num_activated_experts": 2,
                  "axes_dims_rope": [4, 2, 2], "max_resolution": [16, 16], "llama_layers": [0, 1]}  # tiny_hidream.py's
LUMINA2_CONFIG = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
                  "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16,
                  "qk_norm": True, "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512]}  # support/tiny_lumina2.py's


WAN_CONFIG = {"image_model": "wan2.1", "model_type": "t2v", "dim": 32, "num_heads": 2, "num_layers": 2, "ffn_dim": 64,
              "in_dim": 16, "out_dim": 16, "text_dim": 32, "freq_dim": 32, "patch_size": (1, 2, 2)}  # tiny_wan.py's


def nextdit_to_diffusers(config: dict) -> dict:
    """diffusers' weight key → ComfyUI's NextDiT key (with rows where qkv is fused), by the rules of diffusers'
    `convert_lumina2_to_diffusers` (loaders/single_file_utils.py), with qkv split at this model's head counts."""
    head = config["dim"] // config["n_heads"]
    q, kv = config["n_heads"] * head, config["n_kv_heads"] * head
    blocks = [("noise_refiner", config["n_refiner_layers"], True), ("context_refiner", config["n_refiner_layers"], False),
              ("layers", config["n_layers"], True)]
    mapping = {}
    for group, count, modulated in blocks:
        for index in range(count):
            ours, theirs = f"{group}.{index}.", f"{group}.{index}."
            for part, (offset, size) in zip(("to_q", "to_k", "to_v"), ((0, q), (q, kv), (q + kv, kv))):
                mapping[f"{theirs}attn.{part}.weight"] = (f"{ours}attention.qkv.weight", (0, offset, size))
            mapping[f"{theirs}attn.to_out.0.weight"] = f"{ours}attention.out.weight"
            for number in (1, 2, 3):
                mapping[f"{theirs}feed_forward.linear_{number}.weight"] = f"{ours}feed_forward.w{number}.weight"
            if modulated:
                mapping[f"{theirs}norm1.linear.weight"] = f"{ours}adaLN_modulation.1.weight"
    return mapping


def diffusers_pipelines() -> dict:
    from lora_core.demo.tiny_model import build_tiny_pipeline
    from support.tiny_flow_models import build_tiny_chroma, build_tiny_flux, build_tiny_sd3
    from support.tiny_hidream import build_tiny_hidream
    from support.tiny_hunyuan_video import build_tiny_hunyuan_video
    from support.tiny_lumina2 import build_tiny_lumina2
    from support.tiny_qwen_image import build_tiny_qwen_image
    from support.tiny_wan import build_tiny_wan
    from support.tiny_sdxl import build_tiny_sdxl

    return {"sd1": build_tiny_pipeline(seed=0), "sdxl": build_tiny_sdxl(), "sd3": build_tiny_sd3(),
            "flux": build_tiny_flux(), "qwen_image": build_tiny_qwen_image(), "chroma": build_tiny_chroma(),
            "lumina2": build_tiny_lumina2(), "hidream": build_tiny_hidream(), "wan": build_tiny_wan(),
            "hunyuan_video": build_tiny_hunyuan_video()}


def comfy_model_and_map(family: str, denoiser: torch.nn.Module):
    """ComfyUI's model of the diffusers `denoiser`'s layout, and ComfyUI's map diffusers weight key → its weight."""
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    state = denoiser.state_dict()
    if family in ("sd1", "sdxl"):  # ComfyUI detects only full-size diffusers UNets; these are the tiny ones' configs
        config = (comfy.supported_models.SD15(dict(SD1_CONFIG)) if family == "sd1"
                  else comfy.supported_models.SDXL(dict(COMFY_UNET_CONFIG)))
        return patcher(config), comfy.utils.unet_to_diffusers(config.unet_config)
    if family == "sd3":
        config = comfy.model_detection.model_config_from_unet(comfy.model_detection.convert_diffusers_mmdit(state, ""),
                                                              "")
        return patcher(config), comfy.utils.mmdit_to_diffusers(config.unet_config, output_prefix="")
    if family == "qwen_image":  # ComfyUI's Qwen-Image names its layers as diffusers does: the map is the identity
        config = comfy.supported_models.QwenImage(dict(QWEN_IMAGE_CONFIG))
        return patcher(config), {key: key for key in state}
    if family == "hidream":  # ComfyUI's HiDream names its layers as diffusers does: the map is the identity
        config = comfy.supported_models.HiDream(dict(HIDREAM_CONFIG))
        return patcher(config), {key: key for key in state}
    if family == "wan":  # ComfyUI has no diffusers map for Wan: lora_core's names (diffusers' Wan converter reads
        # them back in tests/families/test_wan.py)
        from lora_core.families.wan import wan_path

        config = comfy.supported_models.WAN21_T2V(dict(WAN_CONFIG))
        return patcher(config), {key: f"{wan_path(key.removesuffix('.weight'))}.weight" for key in state
                                 if key.endswith(".weight")}
    if family == "hunyuan_video":  # ComfyUI builds it from Flux's layers and has no diffusers map for it: lora_core's
        # table of which diffusers layers each fused layer holds (diffusers' converter reads them back in
        # tests/families/test_hunyuan_video.py)
        from lora_core.families.flux import bfl_paths

        config = comfy.supported_models.HunyuanVideo(dict(HUNYUAN_VIDEO_CONFIG))
        modules, mapping = dict(denoiser.named_modules()), {}
        for comfy_path, paths in bfl_paths(denoiser).items():
            offset = 0
            for path in paths:
                rows = modules[path].out_features
                mapping[f"{path}.weight"] = (f"{comfy_path}.weight", (0, offset, rows)) if len(paths) > 1 \
                    else f"{comfy_path}.weight"
                offset += rows
        return patcher(config), mapping
    if family == "lumina2":
        config = comfy.supported_models.Lumina2(dict(LUMINA2_CONFIG))
        return patcher(config), nextdit_to_diffusers(LUMINA2_CONFIG)
    config = (comfy.supported_models.Chroma(dict(CHROMA_CONFIG)) if family == "chroma"
              else comfy.supported_models.Flux(dict(FLUX_CONFIG)))
    return patcher(config), comfy.utils.flux_to_diffusers(config.unet_config, output_prefix="")


def rows_of(target, weights: dict[str, torch.Tensor]) -> tuple[str, tuple[int, int]]:
    """ComfyUI's weight key (under the diffusion model) and rows [start, end) for one entry of its diffusers map."""
    key, rows = (target, None) if isinstance(target, str) else target[:2]
    if rows is None:  # the whole weight (its rows reordered where the entry names a function)
        return key, (0, weights[key].shape[0])
    _, offset, size = rows
    return key, (offset, offset + size)


def covered(pieces: list[tuple[str, tuple[int, int]]]) -> set[tuple[str, int, int]]:
    """The pieces with adjacent rows of one weight merged: (weight key, first row, end row)."""
    by_key: dict[str, list[tuple[int, int]]] = {}
    for key, rows in pieces:
        by_key.setdefault(key, []).append(rows)
    merged = set()
    for key, spans in by_key.items():
        spans.sort()
        start, end = spans[0]
        for span_start, span_end in spans[1:]:
            if span_start <= end:
                end = max(end, span_end)
            else:
                merged.add((key, start, end))
                start, end = span_start, span_end
        merged.add((key, start, end))
    return merged


def compare(backend_module, family: str, pipeline) -> dict:
    from lora_core.families import backend_class, denoiser

    diffusers_denoiser = denoiser(pipeline)
    lora_core_backend = backend_class(pipeline)(pipeline)
    model, to_comfy = comfy_model_and_map(family, diffusers_denoiser)
    comfy_backend = backend_module.ComfyBackend(model, None)
    weights = model.model.diffusion_model.state_dict()
    paths = {id(module): path for path, module in diffusers_denoiser.named_modules()}
    comfy_paths = {name: path for path, name in comfy_backend._unet_names.items()}
    results = {}
    for preset in PRESETS:
        pieces, unmapped = [], []
        for module in lora_core_backend.adapter_targets(preset, False).values():
            target = to_comfy.get(f"{paths[id(module)]}.weight")
            if target is None:
                unmapped.append(paths[id(module)])
            else:
                pieces.append(rows_of(target, weights))
        ours = covered(pieces)
        nodes = {(f"{comfy_paths[name]}.weight", 0, weights[f"{comfy_paths[name]}.weight"].shape[0])
                 for name in comfy_backend.adapter_targets(preset, False)}

        def values(layers):
            return sum((end - start) * weights[key][0].numel() for key, start, end in layers)

        results[preset] = {"lora_core_only": sorted(map(list, ours - nodes)) + [[path] for path in unmapped],
                           "nodes_only": sorted(map(list, nodes - ours)),
                           "values": [values(ours), values(nodes)]}
    return results


def main() -> None:
    backend_module = import_backend(Path(sys.argv[1]))
    with torch.inference_mode():  # as ComfyUI's loaders build models
        pipelines = diffusers_pipelines()
        print(json.dumps({family: compare(backend_module, family, pipeline)
                          for family, pipeline in pipelines.items()}))


if __name__ == "__main__":
    main()
