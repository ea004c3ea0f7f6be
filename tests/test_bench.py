"""The benchmarks run (small variants), so they cannot rot; timings are printed, never asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> object:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(result.stdout)


def test_train_step_benchmark_small_variant() -> None:
    report = run_bench("bench/train_step.py", "--size", "small", "--steps", "2", "--blocks", "1",
                       "--cpu-conv-kernels", "both")
    assert report["lora_parameters"]["lora_lab"] == report["lora_parameters"]["reference"] > 0
    assert not report["failures"] and report["step_ratio"] > 0 and report["losses_finite"] and report["lora_lab_weights_changed"]
    assert report["step_ratio_lora_lab_pytorch_kernels"] > 0  # the kernel lever's before, timed in the same run
    assert report["lora_lab_parameter_dtypes"] == ["torch.float32"]


def test_train_step_benchmark_sdxl_small_variant() -> None:
    """SDXL's UNet (text-time conditioning) through both trainers: same adapter size, both train."""
    report = run_bench("bench/train_step.py", "--size", "sdxl-small", "--steps", "2", "--blocks", "1")
    assert report["denoiser"] == "sdxl-small" and report["resolution"] == 64
    assert report["lora_parameters"]["lora_lab"] == report["lora_parameters"]["reference"] > 0
    assert not report["failures"] and report["losses_finite"] and report["lora_lab_weights_changed"]


def test_train_step_benchmark_flux_small_variant() -> None:
    """Flux's transformer (flow matching, packed latents) through both trainers: same adapter size, both train."""
    report = run_bench("bench/train_step.py", "--size", "flux-small", "--steps", "2", "--blocks", "1")
    assert report["denoiser"] == "flux-small"
    assert report["lora_parameters"]["lora_lab"] == report["lora_parameters"]["reference"] > 0
    assert not report["failures"] and report["losses_finite"] and report["lora_lab_weights_changed"]


def test_train_step_benchmark_qwen_image_small_variant_with_checkpointing() -> None:
    """Qwen-Image's transformer (img_shapes, text mask) through both trainers, both recomputing blocks in backward."""
    report = run_bench("bench/train_step.py", "--size", "qwen-image-small", "--steps", "2", "--blocks", "1",
                       "--gradient-checkpointing")
    assert report["denoiser"] == "qwen-image-small" and report["gradient_checkpointing"]
    assert report["lora_parameters"]["lora_lab"] == report["lora_parameters"]["reference"] > 0
    assert not report["failures"] and report["losses_finite"] and report["lora_lab_weights_changed"]


@pytest.mark.parametrize("size", ["wan-small", "hunyuan-video-small"])
def test_train_step_benchmark_video_small_variants(size: str) -> None:
    """Wan's and HunyuanVideo's transformers on 5-frame video latents (2 latent frames) through both trainers, and
    LoRA Lab alone with --skip-reference (the full-size runs' setting: no second copy of the denoiser)."""
    args = ("bench/train_step.py", "--size", size, "--height", "32", "--width", "48", "--frames", "5", "--steps", "2",
            "--blocks", "1")
    report = run_bench(*args)
    assert (report["frames"], report["tokens"]) == (5, 2 * 2 * 3)
    assert report["lora_parameters"]["lora_lab"] == report["lora_parameters"]["reference"] > 0
    assert not report["failures"] and report["losses_finite"] and report["lora_lab_weights_changed"]
    alone = run_bench(*args, "--skip-reference", "--gradient-checkpointing")
    assert set(alone["median_step_seconds"]) == {"lora_lab"} and "step_ratio" not in alone
    assert alone["losses_finite"] and alone["lora_lab_weights_changed"]


def test_file_size_benchmark_small_variant() -> None:
    rows = run_bench("bench/file_size.py", "--size", "small")
    assert {row["preset"] for row in rows} == {"attention", "transformer", "full"}
    assert all(row["file_bytes"] > row["payload_bytes"] for row in rows)


def test_train_step_benchmark_flux_small_variant_in_fp8_with_swap() -> None:
    """The GPU round's fp8 + swap runs, small: LoRA Lab on fp8 weights, with and without a swapped block, both train
    (the memory planned for fp8 counts one byte a weight)."""
    report = run_bench("bench/train_step.py", "--size", "flux-small", "--steps", "2", "--blocks", "1", "--fp8",
                       "--gradient-checkpointing", "--skip-reference", "--blocks-to-swap", "0", "1")
    assert report["lora_lab_fp8_weights"] and set(report["median_step_seconds"]) == {"lora_lab", "lora_lab_swap_1"}
    assert not report["failures"] and report["losses_finite"] and report["lora_lab_weights_changed"]
