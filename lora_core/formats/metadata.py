"""kohya `ss_*` and `modelspec.*` metadata, so LoRA browsers, A1111 and kohya's tools read our files as theirs."""
from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from ..families import version_family
from ..network import LoRANetwork

if TYPE_CHECKING:
    from ..backend import TrainingBackend
    from ..data.dataset import ImageFolderDataset
    from ..training.config import TrainingConfig

LYCORIS_ALGORITHMS = {"dora": "lora", "loha": "loha", "lokr": "lokr"}


def timestamp() -> int:
    """Now, or SOURCE_DATE_EPOCH where it is set, so reproducible builds give byte-identical files."""
    return int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))


def network_args(network: LoRANetwork) -> dict[str, str]:
    """kohya's `--network_args` that rebuild this network (strings, as kohya parses them); empty for plain LoRA."""
    args: dict[str, str] = {}
    if network.algorithm != "lora":
        args["algo"] = LYCORIS_ALGORITHMS[network.algorithm]
    if any(adapter.is_conv and adapter.weight_shape[2:] != (1, 1) for _, adapter in network.items()):
        args.update(conv_dim=str(network.rank), conv_alpha=f"{network.alpha:g}")
    if network.algorithm == "dora":
        args["dora_wd"] = "True"
    args.update({key: str(value) for key, value in network.options.items()})
    return args


def network_metadata(network: LoRANetwork) -> dict[str, str]:
    """How the network was built, in kohya's and LyCORIS' words (rank and alpha as asked)."""
    metadata = {
        "ss_network_module": "networks.lora" if network.algorithm == "lora" else "lycoris.kohya",
        "ss_network_dim": str(network.rank),
        "ss_network_alpha": f"{network.alpha:g}",
    }
    args = network_args(network)
    if args:  # kohya writes the key only when there are network args
        metadata["ss_network_args"] = json.dumps(args)
    if network.clamped_ranks:
        metadata["ss_clamped_ranks"] = json.dumps(network.clamped_ranks)
    return metadata


def modelspec_architecture(version: str, prediction_type: str) -> str:
    """The modelspec id of a LoRA for base model `version` (kohya's `ss_base_model_version`), as kohya's
    library/sai_model_spec.py writes it."""
    family = version_family(version)
    v_prediction = prediction_type == "v_prediction" and family.modelspec_v
    return f"{family.modelspec_v if v_prediction else family.modelspec}/lora"


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
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(version, prediction_type),
        "modelspec.implementation": version_family(version).modelspec_implementation,
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


def lora_metadata(network: LoRANetwork, config: TrainingConfig, backend: TrainingBackend,
                  dataset: ImageFolderDataset, steps: int, title: str = "") -> dict[str, str]:
    """The metadata a LoRA file of this run holds after `steps` steps: what the CLI, the node and the demo save."""
    return kohya_metadata(
        network, training={**config.metadata(), **backend.objective(config).metadata(), "steps": steps},
        model=backend.model_info(),
        dataset={"num_train_images": dataset.num_training_examples, "num_reg_images": dataset.num_regularization_images,
                 "tag_frequency": dataset.tag_frequency()},
        title=title, resolution=dataset.config.resolution, prediction_type=backend.prediction_type,
    )
