"""The latent cache on disk."""
from __future__ import annotations

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, train
from lora_core.families.sd1 import DiffusersBackend
from lora_core.formats.files import tensor_bytes


class CountingVAE(DiffusersBackend):
    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        self.vae_calls = 0

    def encode_images(self, pixels, generator):
        self.vae_calls += 1
        return super().encode_images(pixels, generator)


def test_latent_cache_on_disk_skips_the_vae_and_changes_nothing(pipeline, concept_dir, tmp_path) -> None:
    config = dict(steps=3, gradient_accumulation=1, seed=2)
    losses, calls = [], []
    for cache in (None, tmp_path / "latents", tmp_path / "latents"):
        backend = CountingVAE(pipeline)
        dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64, flip=True))
        network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4, seed=1)
        result = train(backend, network, dataset,
                       TrainingConfig(**config, latent_cache_dir=str(cache) if cache else None))
        losses.append(result.losses)
        calls.append(backend.vae_calls)
    distinct = {tensor_bytes(dataset.image_pixels(i, flip)) for i in range(dataset.num_images) for flip in (0, 1)}
    assert calls == [2 * dataset.num_images, len(distinct), 0]  # identical pixels share one cached latent
    assert losses[0] == losses[1] == losses[2]
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == len(distinct)
