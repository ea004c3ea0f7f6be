"""kohya `ss_*` and `modelspec.*` metadata, so LoRA browsers, A1111 and kohya's tools read our files as theirs."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from .network import LoRANetwork

LYCORIS_ALGORITHMS = {"dora": "lora", "loha": "loha", "lokr": "lokr"}


def timestamp() -> int:
    """Now, or SOURCE_DATE_EPOCH where it is set, so reproducible builds give byte-identical files."""
    return int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))


def network_metadata(network: LoRANetwork) -> dict[str, str]:
    """How the network was built, in kohya's and LyCORIS' words."""
    algorithm = network.algorithm
    args: dict[str, str] = {}
    if algorithm == "lora":
        module = "networks.lora"
        if any(adapter.is_conv and adapter.weight_shape[2:] != (1, 1) for _, adapter in network.items()):
            args = {"conv_dim": str(network.rank), "conv_alpha": f"{network.alpha:g}"}
    else:
        module = "lycoris.kohya"
        args = {"algo": LYCORIS_ALGORITHMS[algorithm]}
        if algorithm == "dora":
            args["dora_wd"] = "True"
    return {
        "ss_network_module": module,
        "ss_network_dim": str(network.rank),
        "ss_network_alpha": f"{network.alpha:g}",
        "ss_network_args": json.dumps(args) if args else "null",
    }


def kohya_metadata(
    network: LoRANetwork,
    *,
    training: dict[str, Any] | None = None,
    model: dict[str, str] | None = None,
    dataset: dict[str, Any] | None = None,
    title: str = "",
    resolution: int = 512,
    prediction_type: str = "epsilon",
) -> dict[str, str]:
    """The full metadata dict: network, base model, training run and dataset; every value a string."""
    model = model or {}
    version = model.get("version", "sd_v1")
    now = timestamp()
    metadata = network_metadata(network)
    metadata.update({
        "ss_sd_model_name": model.get("name", ""),
        "ss_sd_model_hash": model.get("hash", "")[:8],
        "ss_new_sd_model_hash": model.get("hash", ""),
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_output_name": title,
        "ss_training_finished_at": str(now),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{'stable-diffusion-v1' if version == 'sd_v1' else version}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
    })
    for key, value in (training or {}).items():
        metadata[f"ss_{key}"] = value if isinstance(value, str) else json.dumps(value)
    for key, value in (dataset or {}).items():
        metadata[f"ss_{key}"] = value if isinstance(value, str) else json.dumps(value)
    return {key: value for key, value in metadata.items() if value != ""}
