"""Training checkpoints: a LoRA file users can try, plus a sidecar with all a resumed run needs (no pickle).

The sidecar is a safetensors file: every tensor of the training state (network in fp32, optimizer moments,
generator states, best weights) as a tensor, and everything else as JSON in its metadata.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..formats.files import LoRAFileError, LoRAWeights, save_file
from ..network import LoRANetwork
from ..settings import Setting, Widget

STATE_SUFFIX = ".state.safetensors"
STATE_KEY = "lora_lab_training_state"
CHECKPOINT_SETTINGS = (  # a Checkpointer's every and keep, as the CLI and Training Options offer them
    Setting("checkpoint_every", int, 0, "Save a checkpoint every N steps", minimum=0, aliases=("--save-every",),
            widget=Widget(maximum=100000, note="into models/loras (LoRA + .state file to resume); 0: none.")),
    Setting("keep_checkpoints", int, 0, "Keep only the newest N checkpoints; 0 keeps all.", minimum=0,
            widget=Widget(maximum=1000)),
)


def flatten(value: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """`value` as JSON, with each tensor moved into `tensors` and replaced by {"tensor": key}; dicts with other
    than string keys become {"items": [[key, value], ...]} so their keys come back as they were."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {"dict": {key: flatten(item, tensors, f"{path}.{key}") for key, item in value.items()}}
        return {"items": [[key, flatten(item, tensors, f"{path}.{index}")] for index, (key, item) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"list": [flatten(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]}
    return {"value": value}


def unflatten(encoded: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in encoded:
        return tensors[encoded["tensor"]]
    if "dict" in encoded:
        return {key: unflatten(item, tensors) for key, item in encoded["dict"].items()}
    if "items" in encoded:
        return {key: unflatten(item, tensors) for key, item in encoded["items"]}
    if "list" in encoded:
        return [unflatten(item, tensors) for item in encoded["list"]]
    return encoded["value"]


def state_path(lora_path: Path) -> Path:
    """The sidecar of a checkpoint's LoRA file: `x.safetensors` → `x.state.safetensors`."""
    return lora_path.with_name(lora_path.name.removesuffix(".safetensors") + STATE_SUFFIX)


def save_state(path: Path, state: dict) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.dumps(flatten(state, tensors))
    return save_file(path, tensors, {STATE_KEY: encoded}, overwrite=True)


def load_state(path: str | Path) -> dict:
    """The training state saved beside a checkpoint (`<name>.state.safetensors`)."""
    path = Path(path)
    if not path.name.endswith(STATE_SUFFIX):
        raise LoRAFileError(f"{path} is not a training-state file; resume from the `{STATE_SUFFIX}` file saved "
                            "beside a checkpoint")
    try:  # outside inference mode, so that the optimizer may update the tensors in place (ComfyUI runs in it)
        with torch.inference_mode(False), safe_open(str(path), framework="pt") as stream:
            encoded = (stream.metadata() or {})[STATE_KEY]
            tensors = {key: stream.get_tensor(key) for key in stream.keys()}
        return unflatten(json.loads(encoded), tensors)
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as error:
        raise LoRAFileError(f"{path} is not a readable training state ({type(error).__name__}: {error}); "
                            "resume from an intact checkpoint, or start a new run") from error


@dataclass
class Checkpointer:
    """Every `every` steps, `<directory>/<name>-step00000100.safetensors` (a LoRA with `metadata(step)`) and its
    `.state.safetensors` sidecar; only the newest `keep` pairs stay (0 keeps all)."""

    directory: Path
    every: int
    keep: int = 0
    name: str = "checkpoint"
    metadata: Callable[[int], dict[str, str]] = field(default=lambda step: {})
    dtype: str = "float16"

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.every < 1 or self.keep < 0:
            raise ValueError(f"checkpoints every {self.every} steps keeping {self.keep}: use every ≥ 1 and keep ≥ 0")

    def check_fresh(self) -> None:
        """A new run never overwrites another run's checkpoints (a resumed run continues its own)."""
        if self.saved():
            raise LoRAFileError(f"{self.directory} already holds checkpoints named {self.name}-step…; choose another "
                                "name (prefix), delete them, or resume from their .state file")

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, network: LoRANetwork, step: int, state: dict) -> Path:
        path = self.directory / f"{self.name}-step{step:08d}.safetensors"
        LoRAWeights.from_network(network, self.metadata(step), self.dtype).save(path, overwrite=True)
        save_state(state_path(path), state)
        self.prune()
        return path

    def saved(self) -> list[Path]:
        pattern = re.compile(rf"^{re.escape(self.name)}-step\d{{8}}\.safetensors$")
        return sorted(p for p in self.directory.glob(f"{self.name}-step*.safetensors") if pattern.match(p.name))

    def prune(self) -> None:
        if self.keep:
            for old in self.saved()[: -self.keep]:
                state_path(old).unlink(missing_ok=True)
                old.unlink()
