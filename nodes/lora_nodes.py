"""Save LoRA, Load LoRA, Check LoRA and Apply LoRA: LoRA files in ComfyUI's `models/loras`, applied with its patch mechanism."""
from __future__ import annotations

from comfy.cli_args import args

from ..lora_core.formats.files import SAVE_PRECISION, LoRAFileError, LoRAWeights, read_safetensors
from ..lora_core.formats.workflow import with_graph, without_graph
from .checks import check_lora, saved_file_verdict
from .patches import apply_lora, apply_lora_by_block
from .paths import lora_files, loras_root, next_lora_path, resolve_lora
from .widgets import setting_input

CATEGORY = "LoRA Lab"
SAVE_ATTEMPTS = 100


class SaveLoRA:
    DESCRIPTION = ("Writes the LoRA to models/loras in kohya format, so ComfyUI's Load LoRA, A1111 and diffusers read it, "
                   "with this graph in its metadata: dropped on the canvas, the file loads the workflow that made it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": ("LORA", {"tooltip": "From Train LoRA or Load LoRA."}),
            "filename_prefix": ("STRING", {"default": "lora_lab", "tooltip": "Saved as models/loras/<prefix>_00001_.safetensors with the next free number; 'folder/name' saves in a subfolder."}),
            "precision": setting_input(SAVE_PRECISION),  # save_precision; named so on the node since its first version
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The MODEL the LoRA was trained on: the saved file is read back, applied by ComfyUI's core loader and each layer's output on a random input compared with the trained LoRA's; the verdict shows on the node."}),
            "clip": ("CLIP", {"tooltip": "The CLIP it was trained with, to check a text-encoder LoRA's layers too."}),
            "store_workflow": ("BOOLEAN", {"default": True, "tooltip": "Stores this graph in the file's metadata as ComfyUI stores it in images (the prompt, and the UI workflow the front end sends), absolute paths and embedded files taken out: dropping the file on the canvas loads it. Off, or with ComfyUI's --disable-metadata, the file holds no graph (not even one a loaded LoRA brought)."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, lora: LoRAWeights, filename_prefix: str, precision: str, model=None, clip=None,
             store_workflow: bool = True, prompt=None, extra_pnginfo=None):
        if store_workflow and not args.disable_metadata:
            weights, stored = with_graph(lora.converted(precision), prompt, (extra_pnginfo or {}).get("workflow"))
        else:
            weights = without_graph(lora.converted(precision))
            stored = "stored no workflow: " + ("store_workflow is off" if not store_workflow else
                                               "ComfyUI runs with --disable-metadata")
        for _ in range(SAVE_ATTEMPTS):  # another prompt may take the same number meanwhile: take the next one
            path = next_lora_path(filename_prefix)
            try:
                weights.save(path)
                break
            except LoRAFileError:
                if not path.exists():
                    raise
        else:
            raise LoRAFileError(f"could not find a free file name for {filename_prefix!r} in {loras_root()}")
        name = path.relative_to(loras_root()).as_posix()
        saved = {"filename": name, "bytes": path.stat().st_size, "workflow": stored}
        if model is not None:  # the file is saved whatever the check finds
            try:
                saved["verdict"] = saved_file_verdict(model, clip, lora, LoRAWeights.load(path), precision)
            except Exception as error:  # noqa: BLE001 — reported on the node; the saved file stays
                saved["verdict"] = f"check FAILED: {type(error).__name__}: {error}"
        text = [f"{name} ({saved['bytes'] / 1e6:.2f} MB)", stored, *([saved["verdict"]] if "verdict" in saved else [])]
        return {"ui": {"text": text, "lora_lab_saved": [saved]}}


class LoadLoRA:
    DESCRIPTION = "Reads a kohya-format LoRA (.safetensors) from models/loras, without unpickling anything."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA",)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The LoRA, for Apply LoRA or to continue training in Inject LoRA.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": (lora_files(), {"tooltip": "A .safetensors file in models/loras."}),
        }}

    def load(self, lora_name: str):
        return (LoRAWeights.load(resolve_lora(lora_name)),)


class CheckLoRA:
    DESCRIPTION = ("Reports which family and layout a LoRA file is for, which of its modules ComfyUI's core loader "
                   "applies to this MODEL (and CLIP) and which it ignores, by block with their names, and how much the "
                   "applied ones change each block's weights (‖ΔW‖/‖W‖ at strength 1).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The report as text: verdict, file, one line per block, the ignored modules.",)
    OUTPUT_NODE = True
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to check the LoRA against."}),
            "lora_name": (lora_files(), {"tooltip": "Any .safetensors LoRA in models/loras, LoRA Lab's or downloaded (never unpickled)."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "The text encoder, to check the file's text-encoder modules; unconnected, they count as ignored."}),
        }}

    def check(self, model, lora_name: str, clip=None):
        report = check_lora(model, clip, LoRAWeights(*read_safetensors(resolve_lora(lora_name))))
        text = report.text()
        return {"ui": {"text": [text], "lora_lab_check": [report.as_dict()]}, "result": (text,)}


class ApplyLoRA:
    DESCRIPTION = "Applies a LoRA to MODEL and CLIP through ComfyUI's patches; the inputs stay unpatched for other branches."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("MODEL with the LoRA.", "CLIP with the LoRA.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRA to."}),
            "clip": ("CLIP", {"tooltip": "The text encoder to apply the LoRA to."}),
            "lora": ("LORA", {"tooltip": "From Load LoRA or Train LoRA."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How strongly the LoRA changes the diffusion model; 0 leaves it as it is."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How strongly the LoRA changes the text encoder."}),
        }, "optional": {
            "block_weights": ("STRING", {"default": "", "tooltip": "Per-block strengths, as LoRA Block Weight gives them: a preset (NONE, ALL, ALL0.5; SD1.x also INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL) or one weight per block, comma-separated: SD1.x 17 (BASE,IN01,IN02,IN04,IN05,IN07,IN08,MID,OUT03-OUT11) or 26, SDXL 12 (BASE,IN04,IN05,IN07,IN08,MID,OUT00-OUT05) or 20, Flux BASE + one per double block + one per single block (58), SD3 BASE + one per joint block. BASE scales the text encoder. Empty: every block 1."}),
        }}

    def apply(self, model, clip, lora: LoRAWeights, strength_model: float, strength_clip: float, block_weights: str = ""):
        if block_weights.strip():
            return apply_lora_by_block(model, clip, lora, strength_model, strength_clip, block_weights)
        return apply_lora(model, clip, lora, strength_model, strength_clip)
