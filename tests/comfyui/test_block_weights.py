"""Apply LoRA's block_weights in the real server on the SD1.5 test checkpoint: all-ones samples like plain Apply LoRA,
all-zeros like the checkpoint alone, and a zero for one block like the LoRA with that block's modules removed; on tiny
SDXL, Flux.1 and SD3 models (block_weights_probe.py, ComfyUI 0.3.64) each weight gets exactly strength x its block's
weight as its ComfyUI patch, and none for a zero block."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from lora_core.formats.block_weights import layouts, module_block

from .harness import CURRENT_COMFY_DIR, TEST_CHECKPOINT, VENV_PYTHON, ComfyError, ComfyServer
from .test_toolbox_nodes import random_lora, sampled, sampling_from

LORA, WITHOUT_BLOCK = "lora_lab_blocks.safetensors", "lora_lab_blocks_without.safetensors"
SD1_26 = layouts("SD1.x")[1]  # the test checkpoint has attention in IN01, OUT00 and OUT01


@pytest.fixture(scope="module")
def zeroed_block(comfy: ComfyServer):
    """The random LoRA, the block whose weight the test zeroes, and the same LoRA without that block's modules."""
    try:
        random_lora(comfy, LORA, seed=5)
        tensors = load_file(str(comfy.loras_dir / LORA))
        blocks = sorted({module_block(key, "SD1.x") for key in tensors} - {"BASE"}, key=SD1_26.index)
        assert len(blocks) > 1, blocks
        zeroed = blocks[-1]
        save_file({key: tensor for key, tensor in tensors.items() if module_block(key, "SD1.x") != zeroed},
                  str(comfy.loras_dir / WITHOUT_BLOCK))
        # ComfyUI lists a folder again only when its modification time differs from the one it cached; on a
        # filesystem with coarse timestamps two quick writes can leave it equal, so move it on by a second
        folder = comfy.loras_dir.stat()
        os.utime(comfy.loras_dir, ns=(folder.st_atime_ns, folder.st_mtime_ns + 1_000_000_000))
        yield zeroed
    finally:
        for name in (LORA, WITHOUT_BLOCK):
            (comfy.loras_dir / name).unlink(missing_ok=True)


def image(comfy: ComfyServer, lora: str | None, block_weights: str | None = None) -> np.ndarray:
    graph = {"c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}}}
    model, clip = ["c", 0], ["c", 1]
    if lora is not None:
        apply = {"model": model, "clip": clip, "lora": ["l", 0], "strength_model": 0.8, "strength_clip": 0.6}
        if block_weights is not None:
            apply["block_weights"] = block_weights
        graph["l"] = {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": lora}}
        graph["p"] = {"class_type": "LoraLab_ApplyLoRA", "inputs": apply}
        model, clip = ["p", 0], ["p", 1]
    return sampled(comfy, {**graph, **sampling_from(model, clip, "lora_lab_blocks")}, "7")


def test_block_weights_scale_each_blocks_patches(comfy: ComfyServer, zeroed_block: str) -> None:
    plain, base = image(comfy, LORA), image(comfy, None)
    assert np.abs(plain - base).mean() > 1.0  # the LoRA visibly changes the image
    assert np.array_equal(image(comfy, LORA, "ALL"), plain)
    assert np.array_equal(image(comfy, LORA, ",".join(["1"] * 26)), plain)
    assert np.array_equal(image(comfy, LORA, "NONE"), base)
    vector = ",".join("0" if block == zeroed_block else "1" for block in SD1_26)
    without = image(comfy, WITHOUT_BLOCK)
    assert np.abs(without - plain).mean() > 0.1, zeroed_block
    assert np.array_equal(image(comfy, LORA, vector), without)


def test_a_wrong_length_names_family_and_lengths(comfy: ComfyServer, zeroed_block: str) -> None:
    with pytest.raises(ComfyError, match=r"block weights for SD1\.x take 17 .* or 26 .* values, one per block; got 3"):
        image(comfy, LORA, "1,0,1")


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3"])
def test_each_weight_is_patched_at_its_blocks_strength(family: str) -> None:
    completed = subprocess.run([str(VENV_PYTHON), str(Path(__file__).with_name("block_weights_probe.py")),
                                str(CURRENT_COMFY_DIR), family], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["untouched"] and not result["other_clip_keys"]
    base, strengths = result["text_encoder"]
    assert strengths == ([] if base == 0 else [pytest.approx(0.6 * base)])
    weights = {weight for _, weight, _ in result["keys"].values()}
    assert 0 in weights and len(weights) > 1, result["keys"]
    for key, (block, weight, strengths) in result["keys"].items():
        assert strengths == ([] if weight == 0 else [pytest.approx(0.7 * weight)]), (key, block)
