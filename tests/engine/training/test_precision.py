"""The precision policy: an fp16 forward trains with a gradient scaler, so LoRA gradients match an fp32 base's."""
from __future__ import annotations

import pytest
import torch

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, train
from lora_core.demo.demo import make_concept_images
from lora_core.demo.tiny_model import build_tiny_pipeline
from lora_core.families.sd1 import DiffusersBackend
from lora_core.training.precision import Precision


@pytest.mark.parametrize(("mixed_precision", "base_dtype", "scaled"), [
    ("no", torch.float32, False), ("no", torch.float16, True), ("fp16", torch.float32, True),
    ("bf16", torch.float32, False), ("bf16", torch.float16, True), ("no", torch.bfloat16, False),
])
def test_a_scaler_whenever_any_forward_runs_in_fp16(mixed_precision: str, base_dtype, scaled: bool) -> None:
    precision = Precision.for_run(mixed_precision, base_dtype, torch.device("cpu"))
    assert precision.needs_scaler is scaled
    assert (precision.scaler() is not None) is scaled
    assert ("scaler" in precision.describe()) is scaled


def sgd_update(base_dtype: torch.dtype, folder) -> dict[str, torch.Tensor]:
    """One SGD step (lr 0.5, no clipping) of a LoRA over the tiny UNet in `base_dtype`: −0.5 × its mean gradient."""
    pipeline = build_tiny_pipeline(0, resolution=512)
    pipeline.unet.to(base_dtype)
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(folder, DatasetConfig(resolution=512))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4, seed=0)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "up" in name:
                parameter.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(name)))
    before = {k: v.detach().clone() for k, v in network.state_dict().items()}
    config = TrainingConfig(steps=1, optimizer="SGD", learning_rate=0.5, max_grad_norm=0.0, batch_size=1,
                            gradient_accumulation=4, validation_every=0, seed=1)
    train(backend, network, dataset, config)
    return {k: v - before[k] for k, v in network.state_dict().items()}


def test_fp16_base_lora_gradients_equal_the_fp32_bases_at_64x64_latents(tmp_path) -> None:
    """ComfyUI loads SD1.5 in fp16 on most GPUs; without a scaler the smallest LoRA gradients flush to zero."""
    folder = make_concept_images(tmp_path / "concept", count=4, resolution=512)
    full, half = sgd_update(torch.float32, folder), sgd_update(torch.float16, folder)
    for kind in ("lora_up", "lora_down"):
        a = torch.cat([value.flatten() for key, value in full.items() if kind in key])
        b = torch.cat([value.flatten() for key, value in half.items() if kind in key])
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        assert cosine >= 0.99, (kind, cosine)
        assert (b == 0).float().mean() <= (a == 0).float().mean() + 0.001, kind  # no gradient flushed to zero
