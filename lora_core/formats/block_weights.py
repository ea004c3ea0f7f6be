"""Per-block LoRA strengths, as the "LoRA Block Weight" extension and nodes give them: a spec (a preset name or one
weight per block) parsed for a family's block layout, and the block each module of a LoRA file belongs to.

Layouts (the number of weights a spec must have):
- SD1.x/SD2.x: 17 — BASE (text encoder), IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03–OUT11 (the blocks with
  attention), or 26 — BASE, IN00–IN11, MID, OUT00–OUT11 (for LoCon files that also patch the other blocks).
- SDXL: 12 — BASE, IN04, IN05, IN07, IN08, MID, OUT00–OUT05, or 20 — BASE, IN00–IN08, MID, OUT00–OUT08.
- Flux: 1 + double + single — BASE, D00… (one per double block), S00… (one per single block); 58 for Flux.1.
- SD3: 1 + joint — BASE, J00… (one per joint block); 25 for SD3 medium.
Presets: NONE, ALL and ALL0.5 (every block of the longest layout) for every family; for SD1.x also INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL with the
values of hako-mikan's sd-webui-lora-block-weight. IN/OUT numbers are the LDM UNet's input_blocks/output_blocks
indices; diffusers' down_blocks.i.{resnets,attentions}.j is IN(3i+j+1), its downsampler IN(3i+3), up_blocks.i.*.j
is OUT(3i+j), its upsampler OUT(3i+2), for SD1.x and SDXL alike (two res blocks per level down, three up).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import LoRALabError
from ..families import FAMILIES
from ..families.family import TEXT_ENCODER_BLOCK as TEXT_ENCODER
from ..families.family import BlockLayout, numbered

LAYOUTS: dict[str, BlockLayout] = {family.block_layout.name: family.block_layout for family in FAMILIES}


class BlockWeightError(LoRALabError, ValueError):
    """A block-weight spec or a LoRA module does not fit the family's layout; the message says which and why."""


UNIFORM_PRESETS = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5}


def layouts(family: str, depth: tuple[int, ...] = ()) -> tuple[tuple[str, ...], ...]:
    """The block layouts a spec for `family` may use, the longest (every block) last. `depth`: Flux's (double, single) block
    counts, SD3's (joint,); unused for the UNet families."""
    layout = LAYOUTS.get(family)
    if layout is not None and layout.unet_layouts:
        return layout.unet_layouts
    if layout is not None and len(depth) == len(layout.groups):
        return ((TEXT_ENCODER, *(block for prefix, count in zip(layout.groups, depth)
                                 for block in numbered(prefix, range(count)))),)
    raise BlockWeightError(f"block weights know the families {', '.join(LAYOUTS)} (Flux with its double and single "
                           f"block counts, SD3 with its joint block count), not {family!r} with depth {depth}")


def parse(spec: str, family: str, depth: tuple[int, ...] = ()) -> dict[str, float]:
    """Each block's weight from a preset name or comma-separated weights, one per block of one of the layouts."""
    options = layouts(family, depth)
    name = spec.strip().upper()
    if name in UNIFORM_PRESETS:
        return dict.fromkeys(options[-1], UNIFORM_PRESETS[name])
    named = LAYOUTS[family].presets
    if name in named:
        spec = named[name]
    presets = [*UNIFORM_PRESETS, *named]
    entries = [entry.strip() for entry in spec.split(",")]
    try:
        values = [float(entry) for entry in entries]
    except ValueError:
        bad = next(entry for entry in entries if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", entry))
        raise BlockWeightError(f"block weights {spec.strip()!r}: {bad!r} is neither a number nor a {family} preset "
                               f"({', '.join(presets)}); give a preset or comma-separated numbers") from None
    for layout in options:
        if len(values) == len(layout):
            return dict(zip(layout, values))
    expected = " or ".join(f"{len(layout)} ({layout[0]}, {layout[1]}, …, {layout[-1]})" for layout in options)
    raise BlockWeightError(f"block weights for {family} take {expected} values, one per block; got {len(values)} "
                           f"in {spec.strip()!r}")


UNET_PATTERNS = (  # (pattern over the kohya module name, block from its groups)
    (re.compile(r"lora_unet_input_blocks_(\d+)(_|$)"), lambda m: f"IN{int(m[1]):02d}"),
    (re.compile(r"lora_unet_middle_block(_|$)"), lambda m: "MID"),
    (re.compile(r"lora_unet_output_blocks_(\d+)(_|$)"), lambda m: f"OUT{int(m[1]):02d}"),
    (re.compile(r"lora_unet_down_blocks_(\d+)_(?:attentions|resnets)_(\d+)(_|$)"),
     lambda m: f"IN{3 * int(m[1]) + int(m[2]) + 1:02d}"),
    (re.compile(r"lora_unet_down_blocks_(\d+)_downsamplers_0(_|$)"), lambda m: f"IN{3 * int(m[1]) + 3:02d}"),
    (re.compile(r"lora_unet_mid_block(_|$)"), lambda m: "MID"),
    (re.compile(r"lora_unet_up_blocks_(\d+)_(?:attentions|resnets)_(\d+)(_|$)"),
     lambda m: f"OUT{3 * int(m[1]) + int(m[2]):02d}"),
    (re.compile(r"lora_unet_up_blocks_(\d+)_upsamplers_0(_|$)"), lambda m: f"OUT{3 * int(m[1]) + 2:02d}"),
)
TEXT_ENCODER_PATTERN = re.compile(r"lora_te\d*_|text_encoder(_\d+)?\.")


def module_block(key: str, family: str) -> str | None:
    """The block of the module a file tensor `key` belongs to (`lora_unet_…`/`lora_te…` kohya names, or diffusers'
    `transformer.…`/`text_encoder.…`), or None where the family has no block for it."""
    if TEXT_ENCODER_PATTERN.match(key):
        return TEXT_ENCODER
    module, layout = module_name(key), LAYOUTS.get(family)
    if layout is None:
        return None
    if layout.unet_layouts:
        for pattern, block in UNET_PATTERNS:
            if match := pattern.match(module):
                return block(match)
    for pattern, prefix in layout.patterns:
        if match := pattern.match(module):
            return f"{prefix}{int(match[1]):02d}"
    return None


def module_name(key: str) -> str:
    """The module a file tensor belongs to: `lora_unet_x` of `lora_unet_x.lora_down.weight`, `transformer.a.b` of
    `transformer.a.b.lora_A.weight`."""
    if key.startswith(("transformer.", "text_encoder")):
        return re.split(r"\.(?:lora_|alpha$|dora_scale$)", key)[0]
    return key.partition(".")[0]


def key_weights(keys: Iterable[str], family: str, weights: dict[str, float]) -> dict[str, float]:
    """Each file tensor's block weight; a BlockWeightError names the first module the layout has no weight for."""
    result = {}
    for key in keys:
        block = module_block(key, family)
        if block not in weights:
            where = f"block {block}, which the {len(weights)}-value {family} layout has no weight for" if block else \
                f"no {family} block"
            raise BlockWeightError(
                f"LoRA module {module_name(key)} is in {where} (blocks: {', '.join(weights)}); use a layout that "
                f"covers it, or apply this LoRA without block weights")
        result[key] = weights[block]
    return result
