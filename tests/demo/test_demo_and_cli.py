"""The project's main job as a user runs it: `python -m lora_core demo`, then `generate` and `train` on its output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_core import load_file
from lora_core.demo.demo import GRID_SEED, PROMPT

ROOT = Path(__file__).resolve().parents[2]
STEPS = 200  # the demo's default
BASE_BOUND = 0.35  # how far the LoRA may lower the base prompts' accuracy (all three attributes right)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_core", *args], cwd=ROOT, capture_output=True, text=True,
                          check=check, timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    run("demo", "--out", str(out))  # the README's command, default steps
    return out


def test_demo_learns_the_concept(demo: Path) -> None:
    report = json.loads((demo / "report.json").read_text())
    assert report["steps"] == STEPS
    validation = [point["loss"] for point in report["validation"]]
    assert len(validation) == 6 and not report["validation_held_out"]  # step 0, then every fifth; 16 images
    assert report["best_validation_loss"] == min(validation) < 0.9 * validation[0], "the validation loss must fall"
    tensors, metadata = load_file(demo / "lora.safetensors")
    assert report["file_bytes"] == (demo / "lora.safetensors").stat().st_size
    assert metadata["ss_steps"] == str(STEPS) and metadata["ss_network_module"] == "networks.lora"
    assert json.loads(metadata["ss_tag_frequency"])["dataset"]["a red sks on a black background"] == 2
    for name in ("grid.png", "loss.png", "base/model_index.json", *(f"{stem}_{strength}.png"
                 for stem in ("strength", "base_strength") for strength in ("0", "0.5", "1"))):
        assert (demo / name).is_file(), name


def test_demo_draws_the_concept_with_strength_and_leaves_the_base_prompts_alone(demo: Path) -> None:
    """The detector's figures over the concept in all 8 colours × backgrounds (2 seeds), measured: cross probability
    0.000 → 0.110 → 0.673 and read as a cross 0 → 2 → 11 of 16 images; base prompts all right 0.90 at strength 0,
    0.65 at 1."""
    report = json.loads((demo / "report.json").read_text())
    cross = [report["concept_score"][strength]["cross_probability"] for strength in ("0", "0.5", "1")]
    assert cross[0] < cross[1] < cross[2], "the concept prompt must draw more of the cross as strength rises"
    assert cross[0] < 0.01 and cross[2] >= 0.45
    assert report["concept_score"]["0"]["read_as_cross"] == 0 and report["concept_score"]["1"]["read_as_cross"] >= 0.4
    accuracy = report["base_domain_accuracy"]
    assert accuracy["1"]["all"] >= accuracy["0"]["all"] - BASE_BOUND, "the LoRA must leave the base's prompts alone"
    assert report["grid_seed"] == GRID_SEED and report["seconds"] > 0


def test_strength_zero_is_the_base_model_and_generate_reproduces_the_demo(demo: Path, tmp_path) -> None:
    """The CLI's one-image `generate` (LoRA on hooks) draws the demo's grid images (one batch per strength, LoRA
    merged) to within 3 levels of 255: the same noise and weights, summed in another order."""
    def cli_image(*lora: str) -> np.ndarray:
        out = tmp_path / f"cli{len(lora)}.png"
        run("generate", "--base", str(demo / "base"), *lora, "--prompt", PROMPT, "--steps", "20", "--size", "32",
            "--guidance", "5", "--seed", str(GRID_SEED), "--out", str(out))
        return np.asarray(Image.open(out)).astype(int)

    def demo_image(strength: str) -> np.ndarray:
        return np.asarray(Image.open(demo / f"strength_{strength}.png")).astype(int)

    base, full = cli_image(), cli_image("--lora", str(demo / "lora.safetensors"))
    assert np.abs(base - demo_image("0")).max() <= 3
    assert np.abs(full - demo_image("1")).max() <= 3
    assert np.abs(full - base).mean() > 10, "at strength 1 the LoRA must change the image"


def test_cli_train_writes_a_lora_and_refuses_to_overwrite(demo: Path, tmp_path) -> None:
    out = tmp_path / "mine.safetensors"
    args = ["train", "--base", str(demo / "base"), "--data", str(demo / "dataset"), "--out", str(out), "--steps", "3",
            "--resolution", "32", "--algorithm", "loha", "--rank", "4", "--preset", "transformer", "--text-encoder"]
    result = run(*args)
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 3
    tensors, metadata = load_file(out)
    assert any(key.startswith("lora_te_") for key in tensors) and any(key.endswith("hada_w1_a") for key in tensors)
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha"}
    again = run(*args, check=False)
    assert again.returncode != 0 and "exists; choose another --out or pass --overwrite" in again.stderr


@pytest.mark.parametrize("problem, args, message", [
    ("empty folder", ["--data", "{empty}"], "No usable images"),
    ("missing folder", ["--data", "{tmp}/nowhere"], "nowhere"),
    ("rank 0", ["--rank", "0"], "rank must be a whole number ≥ 1"),
    ("not a pipeline", ["--base", "{tmp}"], "not a diffusers pipeline folder"),
    ("the old name of --start-from-lora", ["--resume-from", "{tmp}/x.safetensors"],
     "--resume-from was renamed: use --start-from-lora"),
    ("Prodigy's lr for AdamW", ["--lr", "1.0"], "learning_rate = 1.0 is out of range for AdamW"),
    ("an unknown base dtype", ["--base-dtype", "fp64"], "--base-dtype 'fp64' is not a dtype lora_core loads bases in"),
    ("LBFGS", ["--optimizer", "LBFGS"], "cannot train a LoRA: it needs a closure"),
])
def test_cli_bad_inputs_are_clear_errors(demo: Path, tmp_path, problem: str, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    base = ["train", "--base", str(demo / "base"), "--data", str(demo / "dataset"), "--out", str(tmp_path / "x.safetensors"),
            "--steps", "1", "--resolution", "32"]
    for flag, value in zip(args[::2], args[1::2]):
        value = value.format(empty=tmp_path / "empty", tmp=tmp_path)
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    result = run(*base, check=False)
    assert result.returncode != 0, problem
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_base_dtype_loads_denoiser_and_text_encoder_in_it_and_the_cli_shows_their_memory(demo: Path, tmp_path) -> None:
    """bf16 base: UNet and text encoder in bf16, the VAE in fp32, a new LoRA in fp32; the CLI prints what each
    component takes (bytes of its tensors) before training. The default on a CPU is fp32."""
    import torch

    from lora_core.families import load_pipeline, memory_of
    from lora_core.network import LoRANetwork
    from lora_core.targets import UNET_PRESETS, find_targets, named_for_kohya

    pipeline = load_pipeline(demo / "base", "cpu", torch.bfloat16)
    assert {p.dtype for p in [*pipeline.unet.parameters(), *pipeline.text_encoder.parameters()]} == {torch.bfloat16}
    assert {p.dtype for p in pipeline.vae.parameters()} == {torch.float32}
    network = LoRANetwork.create(named_for_kohya("lora_unet", find_targets(pipeline.unet, UNET_PRESETS["attention"])))
    assert {p.dtype for p in network.parameters()} == {torch.float32}
    unet_bytes = sum(t.numel() * t.element_size() for t in [*pipeline.unet.parameters(), *pipeline.unet.buffers()])
    assert memory_of(pipeline)["unet"] == (unet_bytes, ["bfloat16"])

    for dtype, expected in (("bf16", "bfloat16"), ("auto", "float32")):
        out = tmp_path / f"{dtype}.safetensors"
        result = run("train", "--base", str(demo / "base"), "--data", str(demo / "dataset"), "--out", str(out),
                     "--steps", "2", "--resolution", "32", "--base-dtype", dtype)
        line = next(line for line in result.stdout.splitlines() if line.startswith("base in memory:"))
        size = unet_bytes * (2 if expected == "float32" else 1)
        assert f"unet {size / 2**20:,.1f} MiB ({expected})" in line and "vae" in line and "(float32)" in line, line
        assert out.exists()


def test_an_fp8_base_trains_from_the_cli_in_a_quarter_of_the_unets_fp32_bytes(demo: Path, tmp_path) -> None:
    """--base-dtype fp8: the UNet's Linear and Conv2d weights in one byte (proj_in/out, kept by diffusers' layerwise
    casting, and the norms stay fp32 on a CPU); the LoRA trains from it, lowers its validation loss and is fp32."""
    import torch

    from lora_core.families import load_pipeline, memory_of

    fp32 = memory_of(load_pipeline(demo / "base", "cpu"))["unet"][0]
    out = tmp_path / "fp8.safetensors"
    result = run("train", "--base", str(demo / "base"), "--data", str(demo / "dataset"), "--out", str(out),
                 "--steps", "30", "--resolution", "32", "--base-dtype", "fp8", "--lr", "3e-3", "--save-dtype",
                 "float32", "--validation-every", "10")
    line = next(line for line in result.stdout.splitlines() if line.startswith("base in memory:"))
    unet = line.split("unet ")[1]
    assert unet.split(" (")[1].startswith("float32/float8_e4m3fn)"), line
    assert 0.25 * fp32 < float(unet.split(" MiB")[0]) * 2**20 < 0.35 * fp32, line
    tensors, _ = load_file(out)
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["best_step"] > 0, summary  # the validation loss fell below the untrained one
    refused = run(*["train", "--base", str(demo / "base"), "--data", str(demo / "dataset"), "--out",
                    str(tmp_path / "x.safetensors"), "--base-dtype", "fp8", "--qlora"], check=False)
    assert refused.returncode != 0 and "either in NF4 (--qlora) or in fp8" in refused.stderr, refused.stderr[-2000:]


def test_qlora_quantizes_the_denoiser_before_the_base_moves(demo: Path, monkeypatch) -> None:
    """Flux.1-dev in fp32 is ~67 GB: the base is quantized where it is read (the CPU), then moved to the device."""
    import diffusers

    import lora_core.quantize
    from lora_core.families import load_pipeline

    calls = []
    monkeypatch.setattr(lora_core.quantize, "quantize_linear_layers",
                        lambda root: calls.append(("quantize", next(root.parameters()).device.type)))
    move = diffusers.DiffusionPipeline.to
    monkeypatch.setattr(diffusers.DiffusionPipeline, "to",
                        lambda self, *args, **kwargs: calls.append(("to", args)) or move(self, *args, **kwargs))
    load_pipeline(demo / "base", "cpu", quantize_denoiser=True)
    assert calls == [("quantize", "cpu"), ("to", ("cpu",))]


def test_cli_sweep_saves_every_variant_the_best_as_out_and_a_variant_equals_its_run_alone(demo: Path, tmp_path) -> None:
    common = ["train", "--base", str(demo / "base"), "--data", str(demo / "dataset"), "--resolution", "32",
              "--rank", "4", "--save-dtype", "float32", "--steps", "3", "--validation-every", "3"]
    out = tmp_path / "sweep.safetensors"
    summary = json.loads(run(*common, "--out", str(out), "--sweep-learning-rate", "1e-3, 1e-2",
                             "--sweep-rank", "4, 8/4").stdout.strip().splitlines()[-1])
    assert list(summary["variants"]) == ["learning_rate 0.001, rank 4", "learning_rate 0.001, rank 8/4",
                                         "learning_rate 0.01, rank 4", "learning_rate 0.01, rank 8/4"]
    assert Image.open(summary["chart"]).size[0] > 0
    files = {label: load_file(path)[0] for label, path in summary["variants"].items()}
    best, _ = load_file(out)
    assert all(np.array_equal(best[key].numpy(), files[summary["best"]][key].numpy()) for key in best)
    alone = tmp_path / "alone.safetensors"
    run(*common, "--out", str(alone), "--lr", "1e-2", "--rank", "8", "--alpha", "4")
    alone_tensors, _ = load_file(alone)
    swept = files["learning_rate 0.01, rank 8/4"]
    assert alone_tensors.keys() == swept.keys()
    assert all(np.array_equal(alone_tensors[key].numpy(), swept[key].numpy()) for key in swept)


def test_cli_resume_continues_a_checkpointed_run_to_the_same_lora(demo: Path, tmp_path) -> None:
    common = ["train", "--base", str(demo / "base"), "--data", str(demo / "dataset"), "--resolution", "32",
              "--rank", "4", "--flip", "--shuffle-tags", "--save-dtype", "float32", "--lr", "0.005"]
    run(*common, "--out", str(tmp_path / "whole.safetensors"), "--steps", "4")
    run(*common, "--out", str(tmp_path / "part.safetensors"), "--steps", "2", "--save-every", "2",
        "--sample-every", "2", "--sample-steps", "2")
    assert (tmp_path / "part-sample-step00000002-0.png").is_file()
    state = tmp_path / "part-step00000002.state.safetensors"
    run(*common, "--out", str(tmp_path / "resumed.safetensors"), "--steps", "4", "--resume-state", str(state))
    whole, _ = load_file(tmp_path / "whole.safetensors")
    resumed, _ = load_file(tmp_path / "resumed.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert np.allclose(whole[key].numpy(), resumed[key].numpy(), rtol=1e-5, atol=1e-7), key


def test_a_killed_training_run_loses_only_the_steps_since_its_last_checkpoint(demo: Path, tmp_path) -> None:
    import signal
    import time

    from lora_core.training.checkpoints import load_state

    common = ["train", "--base", str(demo / "base"), "--data", str(demo / "dataset"), "--resolution", "32",
              "--rank", "4", "--save-dtype", "float32", "--lr", "0.005", "--steps", "6"]
    run(*common, "--out", str(tmp_path / "whole.safetensors"))
    crashing = subprocess.Popen([sys.executable, "-m", "lora_core", *common, "--out", str(tmp_path / "crash.safetensors"),
                                 "--save-every", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "crash-step00000002.state.safetensors"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and crashing.poll() is None:
        time.sleep(0.05)
    crashing.send_signal(signal.SIGKILL)
    crashing.wait()
    assert not (tmp_path / "crash.safetensors").exists(), "killed before the end: no final file"
    states = sorted(tmp_path.glob("crash-step*.state.safetensors"))
    latest = load_state(states[-1])  # intact, however the kill fell
    assert latest["step"] in (2, 4)
    run(*common, "--out", str(tmp_path / "resumed.safetensors"), "--resume-state", str(states[-1]))
    whole, _ = load_file(tmp_path / "whole.safetensors")
    resumed, _ = load_file(tmp_path / "resumed.safetensors")
    for key in whole:
        assert np.allclose(whole[key].numpy(), resumed[key].numpy(), rtol=1e-5, atol=1e-7), key
