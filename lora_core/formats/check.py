"""Check LoRA: which family and layout a LoRA file is for, which of its modules a model's loader applies and which it
ignores (by block, with their names), and how much the applied ones change each block's weights (‖ΔW‖ / ‖W‖ at
strength 1). "My LoRA does nothing once loaded" answered from the file and the model, before an image is made.

The engine checks with lora_core's own loader (`check_modules`); the nodes build the same `LoRACheck` from what
ComfyUI's core loader does with the file."""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import AdapterError, algorithm_of
from ..families import FAMILIES
from ..families.family import Family
from ..network import grouped_by_module
from .toolbox import MODULE_SUFFIXES

# A file's naming, by the prefix of its module names
NAMINGS = (("lora_unet_", "kohya"), ("lora_te", "kohya"), ("lora_transformer_", "kohya-style diffusers"),
           ("transformer.", "diffusers/PEFT"), ("text_encoder", "diffusers/PEFT"), ("unet.", "diffusers/PEFT"),
           ("diffusion_model.", "ComfyUI/diffusion-pipe"))
# A module's algorithm, by its tensors' suffixes (the first that matches)
ALGORITHM_SUFFIXES = (("dora_scale", "DoRA"), ("hada_", "LoHa"), ("lokr_", "LoKr"), ("oft_", "OFT"),
                      ("lora_", "LoRA"), ("diff", "full weight difference"))
TEXT_ENCODER_BLOCKS = ((r"lora_te1_", "text encoder 1"), (r"lora_te2_", "text encoder 2"),
                       (r"lora_te3_", "text encoder 3"), (r"lora_te_", "text encoder"),
                       (r"text_encoder_2\.", "text encoder 2"), (r"text_encoder\.", "text encoder"))
DENOISER_PREFIXES = ("lora_unet_", "lora_transformer_", "diffusion_model.", "transformer.", "unet.")
CROSS_ATTENTION_KEY = re.compile(r"attn2_(to_)?k$")  # a UNet's cross-attention key layer, which takes the context
NEGLIGIBLE_EFFECT = 1e-4  # ‖ΔW‖/‖W‖ below this changes no image visibly
NAMES_SHOWN = 12  # ignored modules listed by name in the text


def normalized(name: str) -> str:
    """A module name as `Family.file_markers` see it: lowercase, dots as underscores."""
    return name.lower().replace(".", "_")


def file_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors grouped by module, in any of the layouts LoRA Lab reads."""
    return grouped_by_module(tensors, MODULE_SUFFIXES)


def module_algorithm(suffixes: Iterable[str]) -> str:
    suffixes = list(suffixes)
    for mark, name in ALGORITHM_SUFFIXES:
        if any(suffix.startswith(mark) for suffix in suffixes):
            return name
    return "unknown (" + ", ".join(sorted(suffixes)) + ")"


def file_layout(tensors: dict[str, torch.Tensor]) -> str:
    """The file's naming and algorithms, e.g. "kohya names; LoRA" or "diffusers/PEFT names; LoRA, DoRA"."""
    modules = file_modules(tensors)
    namings = sorted({next((naming for prefix, naming in NAMINGS if name.startswith(prefix)),
                           f"unknown ({name.split('.')[0].split('_')[0]}…)") for name in modules})
    algorithms = sorted({module_algorithm(suffixes) for suffixes in modules.values()})
    return f"{' + '.join(namings)} names; {', '.join(algorithms)}"


def cross_attention_width(modules: dict[str, dict[str, torch.Tensor]]) -> int | None:
    """The context width a UNet LoRA's cross-attention key layers take in, where the file has one as LoRA factors."""
    for name, tensors in modules.items():
        down = tensors.get("lora_down.weight", tensors.get("lora_A.weight"))
        if down is not None and CROSS_ATTENTION_KEY.search(normalized(name)):
            return int(down.shape[1])
    return None


def file_families(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[tuple[Family, ...], str]:
    """The families the file is for and what told: its `ss_base_model_version` or `modelspec.architecture`, else its
    module names (`Family.file_markers`; a UNet's by its cross-attention width). Several where names alone cannot
    tell them apart (Flux.1's and HunyuanVideo's double/single blocks); none where nothing matches."""
    version = metadata.get("ss_base_model_version", "")
    for family in FAMILIES:
        if version == family.version:
            return (family,), f"its ss_base_model_version {version!r}"
    architecture = metadata.get("modelspec.architecture", "").split("/")[0]
    for family in FAMILIES:
        if architecture and architecture in (family.modelspec, family.modelspec_v):
            return (family,), f"its modelspec.architecture {architecture!r}"
    modules = file_modules(tensors)
    names = [normalized(name) for name in modules]
    width = cross_attention_width(modules)
    if width not in {family.context_width for family in FAMILIES}:  # a width no released UNet has: names alone
        width = None
    scores = [sum(any(re.search(marker, name) for name in names) for marker in family.file_markers)
              if not (family.context_width and width and width != family.context_width) else 0 for family in FAMILIES]
    if max(scores) == 0:
        return (), "its module names, which match no family LoRA Lab knows"
    return tuple(family for family, score in zip(FAMILIES, scores) if score == max(scores)), "its module names"


def finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def either(names: Iterable[str]) -> str:
    """"A", "A or B", "A, B or C"."""
    names = list(names)
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def block_of(name: str) -> str:
    """The block a module belongs to: a text encoder as a whole; else its path up to the first number
    (`input_blocks_4`, `double_blocks_12`, `blocks_3`), or its first two words where it has none (`final_layer`)."""
    for pattern, block in TEXT_ENCODER_BLOCKS:
        if re.match(pattern, name):
            return block
    for prefix in DENOISER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    words = re.split(r"[._]", name)
    number = next((index for index, word in enumerate(words) if word.isdigit()), None)
    return "_".join(words[:number + 1] if number is not None else words[:2])


@dataclass(frozen=True)
class ModuleCheck:
    """One module of the file on the model: applied (`problem` empty) with ‖ΔW‖² and ‖W‖² at strength 1, or why
    the loader ignores it."""

    name: str
    problem: str = ""
    delta_square: float = 0.0
    weight_square: float = 0.0

    @property
    def block(self) -> str:
        return block_of(self.name)


@dataclass(frozen=True)
class BlockCheck:
    name: str
    applied: int
    modules: int
    relative_change: float  # ‖ΔW‖ / ‖W‖ over the block's applied weights; nan where none applies


@dataclass(frozen=True)
class LoRACheck:
    """What a loader does with a LoRA file on a model, and what the file says it is for."""

    layout: str
    families: tuple[str, ...]
    told_by: str
    model: str  # the model as a reader names it ("SD1.x inpainting (9-channel)")
    model_family: str  # its family's name in LoRA Lab; "" where it has none
    loader: str  # whose loader decided what applies
    modules: tuple[ModuleCheck, ...]

    @property
    def ignored(self) -> list[ModuleCheck]:
        return [module for module in self.modules if module.problem]

    @property
    def applied(self) -> list[ModuleCheck]:
        return [module for module in self.modules if not module.problem]

    def blocks(self) -> list[BlockCheck]:
        """Each block's count of applied modules and ‖ΔW‖ / ‖W‖, in the order the file's modules first name them
        (numbers in numeric order)."""
        order = sorted({module.block for module in self.modules},
                       key=lambda block: [int(word) if word.isdigit() else word for word in re.split(r"(\d+)", block)])
        result = []
        for block in order:
            members = [module for module in self.modules if module.block == block]
            applied = [module for module in members if not module.problem]
            weight = sum(module.weight_square for module in applied)
            change = math.sqrt(sum(module.delta_square for module in applied) / weight) if weight else math.nan
            result.append(BlockCheck(block, len(applied), len(members), change))
        return result

    def relative_change(self) -> float:
        """‖ΔW‖ / ‖W‖ over every applied weight."""
        weight = sum(module.weight_square for module in self.applied)
        return math.sqrt(sum(module.delta_square for module in self.applied) / weight) if weight else math.nan

    def for_the_model(self) -> bool | None:
        """Whether the file says it is for the model's family; None where nothing tells."""
        return self.model_family in self.families if self.families and self.model_family else None

    def verdict(self) -> str:
        """One line: applies fully, partly or not at all, and why that may look like nothing."""
        total, applied = len(self.modules), len(self.applied)
        family = either(self.families) if self.families else "no family LoRA Lab knows"
        if self.for_the_model() is False:
            return (f"wrong model: this file is for {family} (by {self.told_by}); the model is {self.model}: "
                    f"{applied} of {total} modules apply")
        if applied == 0:
            return f"does nothing: none of its {total} modules applies to this {self.model} model"
        change = self.relative_change()
        if change < NEGLIGIBLE_EFFECT:
            return (f"looks like nothing: {applied} of {total} modules apply, but they change the weights by "
                    f"{change:.1e} of their size (an untrained LoRA's up factors are zero)")
        if applied < total:
            return f"partly: {applied} of {total} modules apply, {total - applied} ignored; ‖ΔW‖/‖W‖ {change:.2%}"
        return f"ok: all {total} modules apply; ‖ΔW‖/‖W‖ {change:.2%} at strength 1"

    def text(self) -> str:
        """The report: verdict, file, then one line per block and the ignored modules by name."""
        lines = [self.verdict(),
                 f"file: {self.layout}; for {either(self.families) or 'an unknown family'} (by {self.told_by})",
                 f"model: {self.model}; applied by {self.loader}",
                 "block: applied/modules, ‖ΔW‖/‖W‖ at strength 1"]
        for block in self.blocks():
            change = "—" if math.isnan(block.relative_change) else f"{block.relative_change:.3%}"
            lines.append(f"  {block.name}: {block.applied}/{block.modules}, {change}")
        ignored = self.ignored
        if ignored:
            lines.append(f"ignored ({len(ignored)}):")
            lines += [f"  {module.name}: {module.problem}" for module in ignored[:NAMES_SHOWN]]
            if len(ignored) > NAMES_SHOWN:
                lines.append(f"  … and {len(ignored) - NAMES_SHOWN} more")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """The report as JSON values (a change where nothing applies is None)."""
        return {"verdict": self.verdict(), "layout": self.layout, "families": list(self.families),
                "told_by": self.told_by, "model": self.model, "model_family": self.model_family,
                "loader": self.loader,
                "applied": len(self.applied), "modules": len(self.modules),
                "relative_change": finite(self.relative_change()),
                "blocks": [{**vars(block), "relative_change": finite(block.relative_change)} for block in self.blocks()],
                "ignored": {module.name: module.problem for module in self.ignored}}


def describe_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, tuple[str, ...], str]:
    """The file's layout, the names of the families it is for, and what told."""
    families, told_by = file_families(tensors, metadata)
    return file_layout(tensors), tuple(family.name for family in families), told_by


@torch.no_grad()
def check_modules(tensors: dict[str, torch.Tensor], layers: dict[str, nn.Module]) -> list[ModuleCheck]:
    """lora_core's loader on `layers` (network name → layer): each module of `tensors` (in the network's names)
    rebuilt as its adapter, with ‖ΔW‖² and ‖W‖² at strength 1, or the reason it cannot be."""
    result = []
    for name, module_tensors in grouped_by_module(tensors).items():
        layer = layers.get(name)
        if layer is None:
            result.append(ModuleCheck(name, "no layer of this model has this name"))
            continue
        try:
            adapter = algorithm_of(set(module_tensors)).from_tensors(layer, module_tensors)
        except AdapterError as error:
            result.append(ModuleCheck(name, str(error)))
            continue
        weight = adapter.base_weight()
        delta = adapter.merged_weight(1.0) - weight
        result.append(ModuleCheck(name, "", float(delta.square().sum()), float(weight.square().sum())))
    return result
