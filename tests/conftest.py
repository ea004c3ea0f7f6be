"""Shared fixtures: a tiny random SD1.x pipeline and a small concept dataset, both built offline."""
from __future__ import annotations

import warnings

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture()
def pipeline():
    from lora_core.demo.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture()
def concept_dir(tmp_path):
    from lora_core.demo.demo import make_concept_images

    return make_concept_images(tmp_path / "concept", count=4, resolution=64)
