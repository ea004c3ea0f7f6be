"""Crashes: a writer killed with SIGKILL mid-save leaves the old file or the new one, never a partial one."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lora_core import load_file
from lora_core.formats.files import save_file

ROOT = Path(__file__).resolve().parents[3]
WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from lora_core.formats.files import save_file
version = 1
while True:
    version += 1
    save_file({path!r}, {{"lora_unet_x.lora_down.weight": torch.full((4_000_000,), float(version))}},
              {{"version": str(version)}}, overwrite=True)
    print(version, flush=True)
"""


def test_sigkill_during_saves_never_leaves_a_partial_file(tmp_path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file(path, {"lora_unet_x.lora_down.weight": torch.full((4_000_000,), 1.0)}, {"version": "1"})
    rng = random.Random(0)
    versions = set()
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))],
                                  stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # it has saved at least once: now it is somewhere in the next save
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        tensors, metadata = load_file(path)  # whole and consistent, whichever version it is
        values = tensors["lora_unet_x.lora_down.weight"]
        assert values.min() == values.max() == float(metadata["version"])
        versions.add(metadata["version"])
        visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
        assert visible == ["lora.safetensors"], "no partial file under a visible name"
    assert len(versions) > 1, "the kills landed during different saves"
