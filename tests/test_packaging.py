"""lora_core installed as a package (scripts/setup.sh: `pip install -e .`), and quiet about what does not concern it."""
from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_elsewhere(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`python *args` from `folder`, with nothing on the path but what is installed."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_the_cli_runs_from_any_folder(tmp_path) -> None:
    result = run_elsewhere(tmp_path, "-m", "lora_core", "--help")
    assert result.returncode == 0 and "train" in result.stdout, result.stderr
    # the engine is this checkout's; the ComfyUI pack root (`nodes`) is not installed
    where = run_elsewhere(tmp_path, "-c", "import importlib.util as u; print(u.find_spec('lora_core').origin, "
                                          "u.find_spec('nodes'))")
    assert where.stdout.split() == [str(ROOT / "lora_core" / "__init__.py"), "None"], where.stderr


def test_bitsandbytes_kernels_community_line_is_silenced_and_nothing_else(caplog) -> None:
    """bitsandbytes logs the line at import on AVX512-BF16 CPUs (not this one), so it is sent here through
    bitsandbytes' own logger, after checking that its source still logs it in these words."""
    import bitsandbytes.backends.cpu.ops as cpu_ops

    import lora_core  # noqa: F401  (importing the engine is what silences it)
    from lora_core.quantize import KERNELS_COMMUNITY_LOGGER, KERNELS_COMMUNITY_MESSAGE

    assert cpu_ops.logger.name == KERNELS_COMMUNITY_LOGGER and KERNELS_COMMUNITY_MESSAGE in inspect.getsource(cpu_ops)
    caplog.clear()  # on an AVX512-BF16 CPU the import above logged the real line if nothing imported lora_core first
    with caplog.at_level(logging.WARNING):
        cpu_ops.logger.warning(KERNELS_COMMUNITY_MESSAGE + ": %s. Please make sure", "No module named 'kernels'")
        cpu_ops.logger.warning("a bitsandbytes warning that matters")
    assert [record.getMessage() for record in caplog.records] == ["a bitsandbytes warning that matters"]
