"""Peak memory and speed of Train LoRA against ComfyUI's own TrainLoraNode, on the same ComfyUI 0.3.64 server,
checkpoint, images, captions and settings (rank 8, AdamW, fp32, batch 1, no gradient checkpointing).

    python bench/train_memory.py                   # 4 images at 128 px, 10 steps; scripts/setup_comfyui.sh first
    python bench/train_memory.py --images 2 --resolution 64 --steps 2   # the small variant CI runs

Each method gets a fresh server. A warm-up prompt loads the checkpoint and trains one step on a copy of the
images; then the server's peak RSS (VmHWM) is reset and the measured prompt trains `steps` steps on another copy
of the same images, so both methods load the images, encode them (VAE) and their captions (CLIP) and train, over
a model that is already loaded. A third prompt trains 2×`steps` steps with another seed; the difference of the two
wall times over `steps` is the seconds per step (encoding cancels out). Prints JSON; CPU only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from comfyui.harness import TEST_CHECKPOINT, ComfyServer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lora_core.demo.demo import make_concept_images  # noqa: E402

COMFYUI = ROOT / ".cache" / "comfyui-0.3.64"
METHODS = ("lora_lab", "comfy_native")
RANK, LEARNING_RATE = 8, 1e-4
CAPTION = "a photo of sks"


def lora_lab_graph(folder: str, resolution: int, steps: int, seed: int) -> dict:
    """Load Dataset → Inject LoRA ("full": attention, ResNet and sampler layers, like the native node) → Train."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "LoraLab_LoadDataset", "inputs": {
            "folder": folder, "resolution": resolution, "caption_extension": ".txt", "default_caption": CAPTION,
            "token": "sks", "repeats": 1, "flip": False}},
        "3": {"class_type": "LoraLab_InjectLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "algorithm": "lora",
                                                             "rank": RANK, "alpha": float(RANK), "target": "full",
                                                             "train_text_encoder": False}},
        "4": {"class_type": "LoraLab_TrainLoRA", "inputs": {
            "network": ["3", 0], "dataset": ["2", 0], "vae": ["1", 2], "steps": steps, "learning_rate": LEARNING_RATE,
            "batch_size": 1, "gradient_accumulation": 1, "optimizer": "AdamW", "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "min_snr_gamma": 0.0, "noise_offset": 0.0, "seed": seed, "early_stopping_patience": 0}},
        "5": {"class_type": "LoraLab_SaveLoRA", "inputs": {"lora": ["4", 0], "filename_prefix": "bench_memory",
                                                            "precision": "float32"}},
    }


def native_graph(folder: str, resolution: int, steps: int, seed: int) -> dict:
    """ComfyUI 0.3.64's training example: images and captions from a folder → VAE Encode → TrainLoraNode."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "LoadImageTextSetFromFolderNode", "inputs": {
            "folder": folder, "clip": ["1", 1], "resize_method": "None", "width": resolution, "height": resolution}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "TrainLoraNode", "inputs": {
            "model": ["1", 0], "latents": ["3", 0], "positive": ["2", 1], "batch_size": 1, "grad_accumulation_steps": 1,
            "steps": steps, "learning_rate": LEARNING_RATE, "rank": RANK, "optimizer": "AdamW", "loss_function": "MSE",
            "seed": seed, "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": "LoRA",
            "gradient_checkpointing": False, "existing_lora": "[None]"}},
        "5": {"class_type": "SaveLoRANode", "inputs": {"lora": ["4", 1], "prefix": "loras/bench_memory_native"}},
    }


GRAPHS = {"lora_lab": lora_lab_graph, "comfy_native": native_graph}


def server_pid(server: ComfyServer) -> int:
    """The process of the server that listens on `server.port`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if b"main.py" in arguments and b"--port" in arguments and str(server.port).encode() in arguments:
            return int(cmdline.parent.name)
    raise RuntimeError(f"no ComfyUI process listens on port {server.port}")


def memory_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Linux resets VmHWM to the current RSS when "5" is written to clear_refs."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def images(server: ComfyServer, name: str, count: int, resolution: int) -> str:
    folder = make_concept_images(server.input_dir / name, count=count, resolution=resolution)
    for image in folder.glob("*.png"):  # every image captioned: the native loader has no default caption
        image.with_suffix(".txt").write_text(CAPTION)
    return name


def saved_loras(server: ComfyServer) -> set[Path]:
    """The LoRA files the bench's graphs write: LoRA Lab's in models/loras, the native node's in output/loras."""
    return set(server.loras_dir.glob("bench_memory*")) | set(server.output_dir.glob("loras/bench_memory*"))


def measure_method(server: ComfyServer, method: str, count: int, resolution: int, steps: int) -> dict:
    """Peak RSS of one measured run over the loaded model, seconds per step and the LoRA's size, on a running
    server; the images and LoRA files it writes are deleted afterwards."""
    graph, pid, before = GRAPHS[method], server_pid(server), saved_loras(server)
    try:
        server.run(graph(images(server, f"bench_{method}_warm", count, resolution), resolution, 1, 0), timeout=1200)
        measured = images(server, f"bench_{method}_measured", count, resolution)
        reset_peak(pid)
        loaded = memory_kib(pid, "VmRSS")  # after the reset: RSS that dropped in between cannot read as a peak below it
        started = time.perf_counter()
        server.run(graph(measured, resolution, steps, 1), timeout=1200)
        seconds = time.perf_counter() - started
        peak = max(memory_kib(pid, "VmHWM"), loaded)  # the window's peak includes the moment `loaded` was read
        saved = max(saved_loras(server) - before, key=lambda path: path.stat().st_mtime)
        parameters = sum(tensor.numel() for key, tensor in load_file(saved).items() if not key.endswith(".alpha"))
        started = time.perf_counter()
        server.run(graph(measured, resolution, 2 * steps, 2), timeout=1200)
        seconds_double = time.perf_counter() - started
    finally:
        for path in saved_loras(server) - before:
            path.unlink()
        for name in ("warm", "measured"):
            shutil.rmtree(server.input_dir / f"bench_{method}_{name}", ignore_errors=True)
    return {"loaded_rss_mib": loaded / 1024, "peak_rss_mib": peak / 1024, "peak_over_loaded_mib": (peak - loaded) / 1024,
            "run_seconds": seconds, "seconds_per_step": (seconds_double - seconds) / steps,
            "lora_parameters": parameters}


def compare(results: dict) -> dict:
    ours, native = results["lora_lab"], results["comfy_native"]
    return {"peak_rss_ratio": ours["peak_rss_mib"] / native["peak_rss_mib"],
            "peak_over_loaded_ratio": ours["peak_over_loaded_mib"] / max(native["peak_over_loaded_mib"], 1e-9),
            "step_time_ratio": ours["seconds_per_step"] / native["seconds_per_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--comfy-dir", type=Path, default=COMFYUI, help="a ComfyUI with TrainLoraNode (0.3.64)")
    args = parser.parse_args()
    results = {}
    for method in METHODS:  # a fresh server each: nothing one method left behind counts for the other
        server = ComfyServer(comfy_dir=args.comfy_dir)
        server.start()
        try:
            results[method] = measure_method(server, method, args.images, args.resolution, args.steps)
        finally:
            server.stop()
    settings = {"comfyui": args.comfy_dir.name, "checkpoint": TEST_CHECKPOINT, "images": args.images,
                "resolution": args.resolution, "steps": args.steps, "rank": RANK, "optimizer": "AdamW",
                "precision": "fp32", "batch_size": 1, "device": "cpu"}
    print(json.dumps({"settings": settings, **results, **compare(results)}, indent=2))


if __name__ == "__main__":
    main()
