"""LoRA file size against its payload: bytes on disk / (parameters × bytes per element), with kohya metadata, and
against the same tensors and metadata written by the safetensors library itself (the format's own overhead: every
tensor's name, dtype, shape and offsets in the JSON header).

    python bench/file_size.py --size full     # SD1.5's UNet and CLIP-L shapes (random weights, CPU, ~1 minute)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_core import LoRANetwork, TrainingConfig, kohya_metadata, load_file, save_lora  # noqa: E402
from lora_core.targets import (  # noqa: E402
    TEXT_ENCODER_PREFIX, TEXT_ENCODER_PRESET, UNET_PREFIX, find_targets, kohya_paths, named_for_kohya,
)

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def models(size: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(Path(__file__).parent))
    from train_step import UNETS

    text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12) if size == "full" \
        else dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    return UNet2DConditionModel(**UNETS[size]), CLIPTextModel(CLIPTextConfig(**text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "small"], default="small")
    args = parser.parse_args()
    torch.manual_seed(0)
    unet, text_encoder = models(args.size)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for preset in ("attention", "transformer", "full"):
            targets = named_for_kohya(UNET_PREFIX, find_targets(unet, preset))
            text_layers = kohya_paths(text_encoder, find_targets(text_encoder, TEXT_ENCODER_PRESET))
            targets.update(named_for_kohya(TEXT_ENCODER_PREFIX, text_layers))
            network = LoRANetwork.create(targets, rank=8)
            metadata = kohya_metadata(network, training={**TrainingConfig().metadata(), "steps": 1000},
                                      dataset={"tag_frequency": {"10_sks": {"sks": 20, "red circle": 20}}})
            for dtype, size in BYTES.items():
                path = save_lora(Path(folder) / f"{preset}-{dtype}.safetensors", network, metadata, dtype=dtype)
                weights = sum(p.numel() for p in network.parameters())
                payload = weights * size + 4 * len(network.adapters)  # alphas are fp32 scalars
                tensors, written = load_file(path)
                library = Path(folder) / "library.safetensors"
                safetensors.torch.save_file(tensors, library, metadata=written)
                rows.append({"preset": preset, "dtype": dtype, "modules": len(network.adapters), "parameters": weights,
                             "file_bytes": path.stat().st_size, "payload_bytes": payload,
                             "ratio": path.stat().st_size / payload,
                             "ratio_to_safetensors_library": path.stat().st_size / library.stat().st_size})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
