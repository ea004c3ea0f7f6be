"""Apply-LoRA overhead at sampling time, in a real ComfyUI server: KSampler with Apply LoRA (strength 0.8) against
the base model, same seeds and steps, alternating blocks. Prints JSON with median seconds per prompt and the ratio.

    python bench/apply_overhead.py                  # starts the test ComfyUI (scripts/setup_comfyui.sh first)

Apply LoRA goes through ComfyUI's patches, which are merged into the weights when the model loads: sampling runs
at the base model's speed, and switching between the patched and the plain model costs one re-patch (reported).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from comfyui.harness import TEST_CHECKPOINT, ComfyServer  # noqa: E402

from lora_core.demo.demo import make_concept_images  # noqa: E402

POLL_SECONDS = 0.005


def sampling_graph(seed: int, size: int, steps: int, lora: str | None) -> dict:
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}}}
    model, clip = ["1", 0], ["1", 1]
    if lora:
        graph["2"] = {"class_type": "LoraLab_LoadLoRA", "inputs": {"lora_name": lora}}
        graph["3"] = {"class_type": "LoraLab_ApplyLoRA", "inputs": {
            "model": model, "clip": clip, "lora": ["2", 0], "strength_model": 0.8, "strength_clip": 0.8}}
        model, clip = ["3", 0], ["3", 1]
    graph.update({
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a photo of sks"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": seed,
            "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    })
    return graph


def timed_run(server: ComfyServer, graph: dict) -> float:
    """Seconds from queueing to the history entry, polled every 5 ms."""
    started = time.perf_counter()
    prompt_id = server.queue_prompt(graph)
    while prompt_id not in server.get_json(f"/history/{prompt_id}"):
        time.sleep(POLL_SECONDS)
    return time.perf_counter() - started


def train_lora(server: ComfyServer) -> str:
    """A small LoRA of the test checkpoint, trained through the pack."""
    make_concept_images(server.input_dir / "bench_concept", count=4, resolution=64)
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "LoraLab_LoadDataset", "inputs": {
            "folder": "bench_concept", "resolution": 64, "caption_extension": ".txt",
            "default_caption": "a photo of {token}", "token": "sks", "repeats": 1, "flip": False}},
        "3": {"class_type": "LoraLab_InjectLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "algorithm": "lora",
                                                             "rank": 8, "alpha": 8.0, "target": "transformer",
                                                             "train_text_encoder": True}},
        "4": {"class_type": "LoraLab_TrainLoRA", "inputs": {
            "network": ["3", 0], "dataset": ["2", 0], "vae": ["1", 2], "steps": 3, "learning_rate": 1e-3,
            "batch_size": 1, "gradient_accumulation": 1, "optimizer": "AdamW", "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "min_snr_gamma": 0.0, "noise_offset": 0.0, "seed": 0, "early_stopping_patience": 0}},
        "5": {"class_type": "LoraLab_SaveLoRA", "inputs": {"lora": ["4", 0], "filename_prefix": "bench_apply",
                                                            "precision": "float16"}},
    }
    entry = server.run(graph, timeout=600)
    return entry["outputs"]["5"]["lora_lab_saved"][0]["filename"]


def measure(server: ComfyServer, lora: str, rounds: int, runs: int, size: int, steps: int) -> dict:
    """Alternating blocks of `runs` prompts each; the first prompt of a block (model switch) is reported apart."""
    times: dict[str, list[float]] = {"base": [], "lora": []}
    switches: dict[str, list[float]] = {"base": [], "lora": []}
    for round_index in range(rounds):
        for name in ("base", "lora"):
            for run in range(runs):
                seed = round_index * runs + run  # new for every prompt of a side, nothing comes from the cache
                elapsed = timed_run(server, sampling_graph(seed, size, steps, lora if name == "lora" else None))
                (switches if run == 0 else times)[name].append(elapsed)
    base, with_lora = statistics.median(times["base"]), statistics.median(times["lora"])
    return {
        "size": size, "steps": steps, "prompts_per_side": len(times["base"]),
        "median_seconds": {"base": base, "apply_lora_0.8": with_lora},
        "first_prompt_after_switch_seconds": {k: statistics.median(v) for k, v in switches.items()},
        "apply_ratio": with_lora / base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=4, help="prompts per block (the first one is the switch)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    server = ComfyServer()
    server.start()
    try:
        lora = train_lora(server)
        try:
            print(json.dumps(measure(server, lora, args.rounds, args.runs, args.size, args.steps), indent=2))
        finally:
            (server.loras_dir / lora).unlink()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
