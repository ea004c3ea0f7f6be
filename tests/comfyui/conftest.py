"""Fixtures that start a real ComfyUI server, with LoRA Lab installed, once per server flavour and test session.

Every test that takes `comfy` runs on each of `server_flavours()` (the 2024 and the 0.3.64 ComfyUI, or the
checkout that LORA_LAB_COMFYUI names); test_browser.py also on 0.3.64 with the newest front end. pytest orders
the tests so that each server starts once, and only one runs at a time.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .harness import REPO_ROOT, ComfyServer, ServerFlavour, browser_flavours, server_flavours


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "comfy" in metafunc.fixturenames:
        flavours = browser_flavours() if metafunc.module.__name__.endswith("test_browser") else server_flavours()
        only = getattr(metafunc.module, "SERVERS", None)  # a module that runs on some servers alone
        flavours = [flavour for flavour in flavours if only is None or flavour.name in only or flavour.name == "user"]
        metafunc.parametrize("comfy", flavours, ids=[flavour.name for flavour in flavours], indirect=True,
                             scope="session")


@pytest.fixture(scope="session")
def comfy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A running ComfyUI server with this repo linked in as the pack; skipped without the setup, except in CI."""
    flavour: ServerFlavour = request.param
    reason = flavour.missing_setup()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = ComfyServer(run_dir=tmp_path_factory.mktemp(f"comfyui-{flavour.name}"), comfy_dir=flavour.comfy_dir,
                         front_end_root=flavour.front_end_root)
    server.start(pack_dir=REPO_ROOT)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_object_info(comfy: ComfyServer) -> dict:
    """`/object_info` of the session's server, fetched once per server."""
    return comfy.object_info()
