"""The graph a LoRA was made with, kept in its file the way ComfyUI keeps it in images and checkpoints.

`prompt` (the API graph the server ran) and `workflow` (the front end's graph) are JSON strings in the safetensors
metadata: the keys ComfyUI's Save Checkpoint writes, which its front ends (the 2024 one, 1.27 and 1.58) load when a
`.safetensors` file is dropped on the canvas. Absolute paths and embedded files are taken out first: a shared LoRA
carries how it was made, not its maker's folders or pictures.
"""
from __future__ import annotations

import json
import re
from typing import Any

from .files import LoRAWeights, header

GRAPH_KEYS = ("prompt", "workflow")
FRONT_END_READ_BYTES = 4 * 1024 * 1024  # the front ends look for the header in a dropped file's first 4 MiB
PATH_REMOVED = "[absolute path removed]"
FILE_REMOVED = "[embedded file removed]"
# A path from a root: C:\ or C:/, \\server or //server, ~/, file://, or /a/… (or a lone /a ending the text) with a
# letter or digit in its first part, where no word, '.', '/' or '\' comes just before, up to a space, a quote, '<',
# '>', '|', ',', ';' or '`'. So URLs (https://…), relative names (loras/x.safetensors) and text such as "and/or",
# "1/2" or /\/\/\ stay.
ROOT = r"""(?:(?i:file)://|[A-Za-z]:[\\/]|\\\\(?=\w)|(?<!:)//(?=\w)|~[\\/]|/(?=[^\s/]*\w[^\s/]*(?:/|$)))"""
ABSOLUTE_PATH = re.compile(r"(?<![\w./\\])" + ROOT + r"""[^\s"'<>|,;`]*""", re.MULTILINE)
# a one-line value that is a path: all of it goes, spaces included (C:\Users\John Smith\…)
WHOLE_PATH = re.compile(r"\s*" + ROOT + r"[^\n]*$")
DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+[^,\s]*;base64,[A-Za-z0-9+/=]*", re.IGNORECASE)


def node_label(where: str, value: dict) -> str:
    """`node 7 (LoadImage)` for a node of either graph, else where the value is."""
    if "class_type" in value:  # the prompt's nodes are keyed by id
        return f"node {where.rsplit('.', 1)[-1]} ({value['class_type']})"
    if "id" in value and "type" in value:  # the workflow's nodes hold theirs
        return f"node {value['id']} ({value['type']})"
    return where


def scrubbed(value: Any, where: str, removed: list[tuple[str, str]]) -> Any:
    """`value` with each absolute path and embedded file replaced by a marker; `removed` gets what and where."""
    if isinstance(value, dict):
        where = node_label(where, value)
        return {key: scrubbed(item, f"{where}.{key}", removed) for key, item in value.items()}
    if isinstance(value, list):
        return [scrubbed(item, where, removed) for item in value]
    if not isinstance(value, str):
        return value
    clean, files = DATA_URL.subn(FILE_REMOVED, value)
    removed.extend([("embedded files", where)] * files)
    if WHOLE_PATH.match(clean):
        removed.append(("absolute paths", where))
        return PATH_REMOVED
    clean, paths = ABSOLUTE_PATH.subn(PATH_REMOVED, clean)
    removed.extend([("absolute paths", where)] * paths)
    return clean


def header_bytes(weights: LoRAWeights, metadata: dict[str, str]) -> int:
    """The size of the header `LoRAWeights.save` writes for these tensors with `metadata` (and its sha256 hex)."""
    return len(header(weights.tensors, {**metadata, "sshs_model_hash": "0" * 64}))


def with_graph(weights: LoRAWeights, prompt: dict | None, workflow: dict | None) -> tuple[LoRAWeights, str]:
    """`weights` holding `prompt` and `workflow` (either may be None) in place of any graph its metadata had, and a
    line that says what was stored and what was taken out. What would push the header past the part of the file
    the front ends read is left out, the workflow first, and the line says so."""
    removed: list[tuple[str, str]] = []
    graph = {key: json.dumps(scrubbed(value, key, removed), ensure_ascii=False)
             for key, value in zip(GRAPH_KEYS, (prompt, workflow)) if value is not None}
    kept = without_graph(weights).metadata
    left_out = []
    for key in ("workflow", "prompt"):
        if key in graph and header_bytes(weights, {**kept, **graph}) > FRONT_END_READ_BYTES:
            left_out.append(f"the {key} ({len(graph.pop(key)) / 1e6:.1f} MB)")
    if "workflow" in graph:
        line = "stored the workflow (drop the file on the canvas to load it)"
    elif graph:
        line = "stored the prompt (drop the file on the canvas to load it)" + (
            "; the front end sent no UI workflow" if workflow is None else "")
    else:
        line = "stored no workflow" + ("" if left_out else ": ComfyUI sent neither the prompt nor the workflow")
    for kind in sorted({kind for kind, _ in removed}):
        places = list(dict.fromkeys(where.split(".")[0] for each, where in removed if each == kind))
        line += f"; took out {kind} from {', '.join(places[:3])}" + (" and more" if len(places) > 3 else "")
    if left_out:
        line += f"; left out {' and '.join(left_out)}: the front ends read only a file's first 4 MiB"
    return LoRAWeights(weights.tensors, {**kept, **graph}), line


def without_graph(weights: LoRAWeights) -> LoRAWeights:
    """`weights` without the graph a loaded file's metadata may carry."""
    return LoRAWeights(weights.tensors, {key: value for key, value in weights.metadata.items() if key not in GRAPH_KEYS})
