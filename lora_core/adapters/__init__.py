"""Adapter modules, one file per algorithm over the shared `Adapter` base."""
from __future__ import annotations

from .base import Adapter, AdapterError
from .dora import DoRAAdapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .lora import LoRAAdapter

ALGORITHMS: dict[str, type[Adapter]] = {
    cls.algorithm: cls for cls in (LoRAAdapter, DoRAAdapter, LoHaAdapter, LoKrAdapter)
}


def algorithm_of(suffixes: set[str]) -> type[Adapter]:
    """The adapter class whose file keys these are: `dora_scale` marks DoRA, `hada_` LoHa, `lokr_` LoKr."""
    if "dora_scale" in suffixes:
        return DoRAAdapter
    if any(key.startswith("hada_") for key in suffixes):
        return LoHaAdapter
    if any(key.startswith("lokr_") for key in suffixes):
        return LoKrAdapter
    if any(key.startswith("lora_") for key in suffixes):
        return LoRAAdapter
    raise AdapterError(f"no known adapter has the keys {sorted(suffixes)}")


__all__ = ["ALGORITHMS", "Adapter", "AdapterError", "DoRAAdapter", "LoHaAdapter", "LoKrAdapter", "LoRAAdapter", "algorithm_of"]
