"""Each family is described once, in lora_core/families/<name>.py, and everything that names a family reads that
description: ComfyUI's model classes resolve to exactly one family, the diffusers backends are their description's,
its presets name layers of the family's tiny model, and no other module keeps a table of families. (That the nodes'
presets adapt the same weights as lora_core's is tests/comfyui/test_presets.py.)"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lora_core.families import FAMILIES, backend_class, comfy_family, denoiser, version_family
from lora_core.targets import find_targets

REPO = Path(__file__).resolve().parents[2]
COMFY_MODELS = REPO / ".cache" / "comfyui-0.3.64" / "comfy" / "supported_models.py"


def tiny_pipeline(pipeline_class: str):
    from lora_core.demo.tiny_model import build_tiny_pipeline
    from support.tiny_flow_models import build_tiny_chroma, build_tiny_flux, build_tiny_sd3
    from support.tiny_hidream import build_tiny_hidream
    from support.tiny_hunyuan_video import build_tiny_hunyuan_video
    from support.tiny_lumina2 import build_tiny_lumina2
    from support.tiny_qwen_image import build_tiny_qwen_image
    from support.tiny_sdxl import build_tiny_sdxl
    from support.tiny_wan import build_tiny_wan

    return {"StableDiffusionPipeline": build_tiny_pipeline, "StableDiffusionXLPipeline": build_tiny_sdxl,
            "StableDiffusion3Pipeline": build_tiny_sd3, "FluxPipeline": build_tiny_flux,
            "QwenImagePipeline": build_tiny_qwen_image, "ChromaPipeline": build_tiny_chroma,
            "Lumina2Pipeline": build_tiny_lumina2, "HiDreamImagePipeline": build_tiny_hidream,
            "WanPipeline": build_tiny_wan, "HunyuanVideoPipeline": build_tiny_hunyuan_video}[pipeline_class](seed=0)


def comfy_class_bases() -> dict[str, list[str]]:
    """Each class of ComfyUI's supported_models.py → the names of its bases, from the source (no ComfyUI import)."""
    if not COMFY_MODELS.exists():
        pytest.skip(f"{COMFY_MODELS} is missing: run scripts/setup_comfyui.sh")
    tree = ast.parse(COMFY_MODELS.read_text())
    return {node.name: [ast.unparse(base).rpartition(".")[2] for base in node.bases]
            for node in tree.body if isinstance(node, ast.ClassDef)}


def lineage(name: str, bases: dict[str, list[str]]) -> list[str]:
    """The class and its ancestors in ComfyUI's supported_models.py, nearest first (as config_family walks them)."""
    found = [name]
    for base in bases.get(name, []):
        found += [ancestor for ancestor in lineage(base, bases) if ancestor not in found]
    return found


def test_every_comfy_class_the_nodes_train_resolves_to_exactly_one_family() -> None:
    bases = comfy_class_bases()
    for family in FAMILIES:
        for name in [*family.comfy_configs, *family.comfy_variants]:
            assert name in bases, f"{family.name} names ComfyUI's {name}, which supported_models.py does not define"
        trained = {name for other in FAMILIES for name in other.comfy_configs}
        assert not trained & family.comfy_variants.keys(), "a variant Train LoRA refuses is also a trained class"
        for name in family.comfy_configs:
            assert [other.name for other in FAMILIES if name in other.comfy_configs] == [family.name]
            assert comfy_family(lineage(name, bases)) is family
    for name in bases:  # a subclass of a trained class is trained as its family (SSD-1B as SDXL), others not at all
        family = comfy_family(lineage(name, bases))
        assert family is None or any(ancestor in family.comfy_configs for ancestor in lineage(name, bases))


@pytest.mark.parametrize("family", [family for family in FAMILIES if family.pipelines], ids=lambda f: f.name)
def test_the_diffusers_backend_is_its_descriptions_and_its_presets_name_layers_of_the_tiny_model(family) -> None:
    pipeline = tiny_pipeline(family.pipelines[0])
    backend = backend_class(pipeline)(pipeline)
    assert type(backend) is family.backend_class()
    assert backend.family == family.name and version_family(backend.model_info()["version"]) is family
    model = denoiser(pipeline)
    for name, preset in family.presets.items():
        layers = find_targets(model, preset)
        assert layers, f"{family.name}'s preset {name} selects nothing in the tiny model"
        for leaf in preset.leaf_names:
            assert any(path.endswith(leaf) for path in layers), f"{family.name} {name}: no layer {leaf}"
        assert backend.adapter_targets(name, False)


def family_identifiers() -> set[str]:
    return {identifier for family in FAMILIES for identifier in (
        family.name, family.version, family.modelspec, family.block_layout.name, *family.pipelines,
        *family.comfy_configs, *family.comfy_variants)}


def test_no_module_outside_the_families_keeps_a_family_table() -> None:
    """A dict, tuple, list or set literal naming two families (by name, version, ComfyUI or diffusers class) outside
    lora_core/families is a second description of them."""
    identifiers, tables = family_identifiers(), []
    sources = [path for path in [*(REPO / "lora_core").rglob("*.py"), *(REPO / "nodes").glob("*.py")]
               if (REPO / "lora_core" / "families") not in path.parents]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                entries = [*node.keys, *node.values]
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                entries = node.elts
            else:
                continue
            named = {entry.value for entry in entries if isinstance(entry, ast.Constant) and entry.value in identifiers}
            if len(named) > 1:
                tables.append(f"{path.relative_to(REPO)}:{node.lineno} {sorted(named)}")
    assert not tables, tables
