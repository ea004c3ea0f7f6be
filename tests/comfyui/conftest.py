"""Fixtures that start a real ComfyUI server, with LoRA Lab installed, once per test session."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .harness import COMFY_DIR, REPO_ROOT, TEST_CHECKPOINT, ComfyServer


def _missing_setup() -> str | None:
    for required in (COMFY_DIR / "main.py", COMFY_DIR / "models" / "checkpoints" / TEST_CHECKPOINT):
        if not required.exists():
            return f"ComfyUI is not set up ({required} is missing): run scripts/setup_comfyui.sh"
    return None


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A running ComfyUI server with this repo linked in as the pack; skipped without the setup, except in CI."""
    reason = _missing_setup()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = ComfyServer(run_dir=tmp_path_factory.mktemp("comfyui"))
    server.start(pack_dir=REPO_ROOT)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_object_info(comfy: ComfyServer) -> dict:
    """`/object_info` of the session's server, fetched once."""
    return comfy.object_info()
