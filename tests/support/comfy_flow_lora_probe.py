"""How ComfyUI's core Load LoRA reads a Flux or SD3 LoRA file, run inside a ComfyUI checkout's Python.

`python comfy_flow_lora_probe.py COMFY_DIR FAMILY CONFIG_JSON LORA_FILE...` builds ComfyUI's own model (`comfy.model_base.Flux`
or `SD3` from `supported_models` with the unet_config given) and, for text-encoder keys, ComfyUI's CLIP-L
(`comfy.clip_model.CLIPTextModel`) under the `clip_l.transformer` path its CLIP wrappers use; then maps the file as
`comfy.sd.load_lora_for_models` does (`lora_convert.convert_lora`, `model_lora_keys_unet`/`_clip`, `lora.load_lora`),
patches the model (ModelPatcher) and prints a JSON list, per file: the keys ComfyUI did not load, how many patches it
made, and the patched weights that did not change (a patch ComfyUI skipped, e.g. for a shape mismatch).
"""
from __future__ import annotations

import json
import logging
import sys

import torch


def main(comfy_dir: str, family: str, config_json: str, *lora_files: str) -> None:
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.clip_model
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models
    import comfy.utils

    config = json.loads(config_json)
    model = getattr(comfy.supported_models, family)(config["unet"]).get_model({}, device="cpu")
    clip = torch.nn.Module()
    clip.clip_l = torch.nn.Module()
    clip.clip_l.transformer = comfy.clip_model.CLIPTextModel(config["clip_l"], torch.float32, "cpu",
                                                             comfy.ops.manual_cast)
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    reports = []
    for lora_file in lora_files:
        messages.clear()
        lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(lora_file, safe_load=True))
        patches = comfy.lora.load_lora(lora, key_map)
        unet_patches = {key: value for key, value in patches.items()
                        if (key[0] if isinstance(key, tuple) else key).startswith("diffusion_model.")}
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
        patcher.add_patches(unet_patches, 1.0)
        patcher.patch_model()
        after = model.state_dict()
        weights = {key[0] if isinstance(key, tuple) else key for key in unet_patches}
        reports.append({
            "not_loaded": [m.split(": ", 1)[1] for m in messages if m.startswith("lora key not loaded")],
            "errors": [m for m in messages if "ERROR" in m or "mismatch" in m],
            "patches": len(patches),  # one per module of the file that ComfyUI maps (q/k/v each to a slice of qkv)
            "unchanged": sorted(key for key in weights if torch.equal(before[key], after[key])),
        })
        patcher.unpatch_model()
    print(json.dumps(reports))


if __name__ == "__main__":
    main(*sys.argv[1:])
