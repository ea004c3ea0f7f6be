"""Apply LoRA's block_weights on tiny SDXL, Flux.1 and SD3 models built from ComfyUI's own classes (families_probe's
builders), run inside a ComfyUI checkout: `python block_weights_probe.py COMFY_DIR FAMILY`.

A rank-2 LoRA on every Linear of the denoiser's blocks, named as ComfyUI's key map names them (kohya's LDM names; the
diffusers UNet names' block numbers hold for SDXL's two res blocks per level, not for the tiny UNet's one), is applied with weight
2, 1, 0, 2, 1, 0 … counting back from the last block (0) of the family's full layout; prints `{weight key: [block, weight, strengths]}` with
the strengths of the patches ComfyUI's ModelPatcher holds for that weight, and the same for one CLIP-L layer (BASE),
as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families_probe import BUILDERS  # noqa: E402
from model_machinery_probe import PACK_NAME, import_backend  # noqa: E402

FAMILIES = {"sdxl": "SDXL", "flux": "Flux", "sd3": "SD3"}
STRENGTH_MODEL, STRENGTH_CLIP = 0.7, 0.6


def main() -> None:
    comfy_dir, family = Path(sys.argv[1]), sys.argv[2]
    import_backend(comfy_dir)
    import comfy.lora

    block_weights = sys.modules[f"{PACK_NAME}.lora_core.formats.block_weights"]
    LoRAWeights = sys.modules[f"{PACK_NAME}.lora_core.formats.files"].LoRAWeights
    ApplyLoRA = sys.modules[f"{PACK_NAME}.nodes.lora_nodes"].ApplyLoRA
    patches = sys.modules[f"{PACK_NAME}.nodes.patches"]
    with torch.inference_mode():
        model, clip, _ = BUILDERS[family]()
    name = FAMILIES[family]
    layout = block_weights.layouts(name, patches.block_layout(model)[1])[-1]
    weights = {block: (len(layout) - 1 - index) % 3 for index, block in enumerate(layout)}  # the last block 0
    spec = ",".join(str(weight) for weight in weights.values())
    generator = torch.Generator().manual_seed(0)
    tensors, modules, state = {}, {}, model.model.state_dict()
    for lora_name, key in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        block = block_weights.module_block(f"{lora_name}.alpha", name)
        ldm_name = not lora_name.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks"))
        if not (isinstance(key, str) and lora_name.startswith("lora_unet_") and ldm_name and block and key in state):
            continue
        weight = state[key]
        if weight.dim() != 2:
            continue
        tensors[f"{lora_name}.lora_down.weight"] = torch.randn(2, weight.shape[1], generator=generator)
        tensors[f"{lora_name}.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=generator)
        modules[key] = block
    clip_state = clip.cond_stage_model.state_dict()
    text_encoder_key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    clip_key = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})[text_encoder_key]
    tensors[f"{text_encoder_key}.lora_down.weight"] = torch.randn(2, clip_state[clip_key].shape[1], generator=generator)
    tensors[f"{text_encoder_key}.lora_up.weight"] = torch.randn(clip_state[clip_key].shape[0], 2, generator=generator)
    applied, applied_clip = ApplyLoRA().apply(model, clip, LoRAWeights(tensors), STRENGTH_MODEL, STRENGTH_CLIP, spec)
    print(json.dumps({"layout": list(layout), "untouched": not model.patches and not clip.patcher.patches,
                      "keys": {key: [block, weights[block], [entry[0] for entry in applied.patches.get(key, [])]]
                               for key, block in modules.items()},
                      "text_encoder": [weights["BASE"], [entry[0] for entry in applied_clip.patcher.patches[clip_key]]],
                      "other_clip_keys": sorted(applied_clip.patcher.patches.keys() - {clip_key})}))


if __name__ == "__main__":
    main()
