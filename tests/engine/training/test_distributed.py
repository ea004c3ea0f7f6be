"""Data-parallel training on PyTorch's own engine: torchrun / accelerate launch over gloo on this CPU machine.

Two ranks with batch 1 train the same LoRA as one process with batch 2 (same global batch, same seed); a resumed
two-rank run continues exactly; accelerate launch trains as torchrun does; a rank killed mid-run ends the whole
launch with a clear message, and the last checkpoint stays intact and resumes.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_core import (
    DatasetConfig,
    ImageFolderDataset,
    LoRANetwork,
    TrainingConfig,
    load_file,
    train,
)
from lora_core.families.sd1 import DiffusersBackend
from lora_core.training.checkpoints import Checkpointer, load_state, state_path
from lora_core.training.distributed import (
    Distributed,
    DistributedError,
    is_peer_failure,
)
from lora_core.training.encoded import EncodedDataset
from lora_core.training.loop import TrainingError, diffusion_loss
from lora_core.training.objectives import DiscreteObjective

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
# SGD: its step is linear in the gradient, so float rounding stays at rounding size (Adam's normalisation can blow
# it up in elements whose gradient is about its eps, 1e-8)
TRAIN = ["--gradient-accumulation", "2", "--steps", "4", "--seed", "3", "--save-dtype", "float32", "--resolution", "64",
         "--rank", "4", "--flip", "--shuffle-tags", "--optimizer", "SGD", "--lr", "0.5"]
PEER_FAILURE = "another rank probably died or stalled"


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launch(launcher: list[str], *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "lora_core", "train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def torchrun(nproc: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", free_port()]


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in load_file(path)[0].items()}


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[key] - b[key]).max()) for key in a)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's base pipeline and concept images on disk, as `python -m lora_core demo` writes them."""
    from lora_core.demo.demo import make_concept_images
    from lora_core.demo.tiny_model import build_tiny_pipeline

    root = tmp_path_factory.mktemp("distributed")
    build_tiny_pipeline(0, 64).save_pretrained(root / "base")
    return root / "base", make_concept_images(root / "dataset", count=8, resolution=64)


# -- the pieces, in one process ----------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size, batch_size", [(2, 1), (3, 2)])
def test_rank_shares_make_up_the_batches_one_process_draws(concept_dir, world_size: int, batch_size: int) -> None:
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64, flip=True, shuffle_tags=True, repeats=2))
    single = dataset.batches(batch_size * world_size, torch.Generator().manual_seed(5))
    ranks = [dataset.batches(batch_size, torch.Generator().manual_seed(5), rank, world_size)
             for rank in range(world_size)]
    for _ in range(7):  # across epoch boundaries (8 examples)
        whole, shares = next(single), [next(batches) for batches in ranks]
        assert all(len(share.images) == batch_size for share in shares)
        assert [i for share in shares for i in share.images] == whole.images
        assert [f for share in shares for f in share.flipped] == whole.flipped
        assert [c for share in shares for c in share.captions] == whole.captions
    assert all(batches.generator.get_state().equal(single.generator.get_state()) for batches in ranks)
    with pytest.raises(ValueError, match="rank=2 is invalid for world_size=2"):
        dataset.batches(1, torch.Generator(), rank=2, world_size=2)


def test_rank_shares_of_the_loss_average_to_the_global_batch_loss(pipeline, concept_dir) -> None:
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64))
    encoded = EncodedDataset(backend, dataset, 0, cache_text=True)
    batch = next(dataset.batches(4, torch.Generator().manual_seed(0)))
    latents, conditioning = encoded.batch_latents(batch), encoded.batch_conditioning(batch)
    objective = DiscreteObjective(backend.alphas_cumprod(), backend.prediction_type, min_snr_gamma=5.0,
                                  noise_offset=0.1)
    with torch.no_grad():
        whole = diffusion_loss(backend, objective, latents, conditioning, torch.Generator().manual_seed(9))
        shares = [diffusion_loss(backend, objective, latents[2 * rank:2 * rank + 2], {name: value[2 * rank:2 * rank + 2] for name, value in conditioning.items()},
                                 torch.Generator().manual_seed(9), rank, 2) for rank in range(2)]
    torch.testing.assert_close(sum(shares) / 2, whole, rtol=1e-5, atol=1e-7)


def test_one_process_is_the_default_and_its_collectives_do_nothing(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single = Distributed.from_environment()
    assert (single.rank, single.world_size, single.enabled, single.is_main) == (0, 1, False, True)
    module = torch.nn.Linear(2, 2)
    assert single.wrap(module) is module and single.mean(1.5) == 1.5 and single.any(True) is True
    with single.syncing(module, sync=False), single.shielded():
        pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match="start the processes with torchrun or accelerate launch"):
        Distributed.from_environment()


def test_resuming_needs_the_world_size_the_checkpoint_was_trained_with(pipeline, concept_dir, tmp_path) -> None:
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4)
    config = TrainingConfig(steps=2, gradient_accumulation=1)
    checkpointer = Checkpointer(tmp_path, every=1, name="run")
    train(backend, network, dataset, config, checkpointer=checkpointer, callback=lambda report: False)
    state = load_state(state_path(checkpointer.saved()[-1]))
    assert state["identity"]["world_size"] == 1
    state["identity"]["world_size"] = 2
    with pytest.raises(TrainingError, match=r"trained by 2 process\(es\) and this run has 1; resume with the same"):
        train(backend, network, dataset, config, resume_state=state)


STALLING_RANKS = """
import os, sys, time
sys.path.insert(0, {root!r})
from lora_core.training.distributed import Distributed, is_peer_failure
distributed = Distributed.from_environment("cpu", timeout=3)
if distributed.rank == 1:
    time.sleep(60)  # stalled: never joins the collective
started = time.perf_counter()
try:
    distributed.mean(1.0)
except Exception as error:
    print(f"failed after {{time.perf_counter() - started:.1f}} s; peer failure: {{is_peer_failure(error)}}", flush=True)
    os._exit(3)
"""


def test_a_stalled_rank_becomes_an_error_after_the_timeout(tmp_path) -> None:
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", STALLING_RANKS.format(root=str(ROOT))], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for rank in range(2)]
    try:
        output, _ = ranks[0].communicate(timeout=60)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 3, output
    seconds = float(output.split("failed after ")[1].split(" s")[0])
    assert 2.5 < seconds < 15 and "peer failure: True" in output
    assert is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer"))
    assert not is_peer_failure(RuntimeError("CUDA out of memory"))


# -- real launches ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(demo, tmp_path_factory) -> Path:
    """A LoRA trained by `torchrun --nproc_per_node 2` with batch 1 per rank, checkpoints every 2 steps."""
    base, data = demo
    out = tmp_path_factory.mktemp("two_ranks") / "ddp.safetensors"
    run = launch(torchrun(), "--base", str(base), "--data", str(data), *TRAIN, "--batch-size", "1", "--out", str(out),
                 "--save-every", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count('"file":') == 1 and run.stdout.count("examples from") == 1, "rank 0 alone reports"
    assert "2 processes, global batch 1 × 2 × 2" in run.stdout
    return out


def test_two_ranks_train_the_lora_one_process_trains_with_the_same_global_batch(demo, two_ranks, tmp_path) -> None:
    base, data = demo
    out = tmp_path / "single.safetensors"
    single = subprocess.run([sys.executable, "-m", "lora_core", "train", "--base", str(base), "--data", str(data),
                             *TRAIN, "--batch-size", "2", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    expected, got = tensors(out), tensors(two_ranks)
    difference = max_difference(expected, got)
    print(f"two ranks against one process: max abs difference {difference:.3g}")
    assert all(np.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6) for key in expected), difference
    start = tensors(two_ranks.with_name("ddp-step00000002.safetensors"))
    assert max_difference(start, got) > 1e-3, "training moved the weights after the step-2 checkpoint"


def test_fsdp2_shards_the_base_and_trains_the_lora_one_process_trains(demo, tmp_path) -> None:
    """--fsdp: FSDP2 splits the frozen UNet over the two ranks (each holds half its weights) and gathers one block
    at a time, with gradient checkpointing recomputing the blocks; the LoRA, whole on every rank, comes out as one
    ordinary file equal to one process's with the same global batch."""
    base, data = demo
    common = ["--base", str(base), "--data", str(data), *TRAIN, "--gradient-checkpointing"]
    sharded = launch(torchrun(), *common, "--batch-size", "1", "--out", str(tmp_path / "fsdp.safetensors"), "--fsdp")
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    held = re.search(r"fsdp: each of the 2 ranks holds ([\d.]+) MiB of the denoiser's ([\d.]+) MiB", sharded.stdout)
    assert held and abs(float(held.group(1)) - float(held.group(2)) / 2) <= 0.1, sharded.stdout
    single = subprocess.run([sys.executable, "-m", "lora_core", "train", *common, "--batch-size", "2",
                             "--out", str(tmp_path / "single.safetensors")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    expected, got = tensors(tmp_path / "single.safetensors"), tensors(tmp_path / "fsdp.safetensors")
    print(f"FSDP2 over two ranks against one process: max abs difference {max_difference(expected, got):.3g}")
    assert all(np.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6) for key in expected)


@pytest.mark.parametrize(("launcher", "extra", "message"), [
    ("python", [], "--fsdp shards the base over the processes torchrun or accelerate launch starts"),
    ("torchrun", ["--blocks-to-swap", "1"], "--fsdp shards the base's weights over the ranks in their own dtype"),
])
def test_fsdp2_is_refused_where_it_cannot_shard(demo, tmp_path, launcher: str, extra: list[str], message: str) -> None:
    base, data = demo
    command = [sys.executable] if launcher == "python" else torchrun()
    run = launch(command, "--base", str(base), "--data", str(data), "--steps", "1", "--resolution", "64", "--fsdp",
                 *extra, "--out", str(tmp_path / "x.safetensors"))
    assert run.returncode != 0 and message in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "x.safetensors").exists()


def test_two_ranks_resume_from_their_checkpoint_exactly(demo, two_ranks, tmp_path) -> None:
    base, data = demo
    resumed = launch(torchrun(), "--base", str(base), "--data", str(data), *TRAIN, "--batch-size", "1",
                     "--out", str(tmp_path / "resumed.safetensors"),
                     "--resume-state", str(two_ranks.with_name("ddp-step00000002.state.safetensors")))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert max_difference(tensors(tmp_path / "resumed.safetensors"), tensors(two_ranks)) < 1e-7


def test_accelerate_launch_trains_as_torchrun_does(demo, two_ranks, tmp_path) -> None:
    """`--multi_gpu` is accelerate's torchrun-style launcher; on this CPU machine the ranks use gloo."""
    base, data = demo
    accelerate = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]
    out = tmp_path / "accelerate.safetensors"
    run = launch(accelerate, "--base", str(base), "--data", str(data), *TRAIN, "--batch-size", "1", "--out", str(out),
                 HF_HOME=str(tmp_path / "hf"))  # no accelerate config of the user's
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 processes, global batch 1 × 2 × 2" in run.stdout and run.stdout.count('"file":') == 1
    assert max_difference(tensors(out), tensors(two_ranks)) < 1e-7


def child_with_rank(parent: int, rank: int) -> int:
    """The pid of the torchrun worker of `parent` whose environment says RANK=`rank`."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                if f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no worker with RANK={rank} under {parent}")


def test_killing_a_rank_fails_the_run_clearly_and_its_last_checkpoint_resumes(demo, tmp_path) -> None:
    base, data = demo
    out = tmp_path / "run.safetensors"
    args = ["--base", str(base), "--data", str(data), "--out", str(out), "--save-every", "2", "--resolution", "64",
            "--rank", "4", "--gradient-accumulation", "1", "--distributed-timeout", "30"]
    launcher = subprocess.Popen([*torchrun(), "-m", "lora_core", "train", *args, "--steps", "100000"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("run-step*.state.safetensors")):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0]
        time.sleep(0.05)
    os.kill(child_with_rank(launcher.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    try:
        output, _ = launcher.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise AssertionError("the launch hung after a rank was killed") from None
    seconds = time.monotonic() - killed
    print(f"torchrun ended {seconds:.1f} s after rank 1 was killed")
    assert launcher.returncode != 0 and seconds < 150
    last = Checkpointer(tmp_path, every=2, name="run").saved()[-1]
    assert PEER_FAILURE in output and f"The last checkpoint is {last}" in " ".join(output.split())
    assert not out.exists(), "a failed run writes no final file"

    lora, metadata = load_file(last)
    step = load_state(state_path(last))["step"]
    assert lora and metadata["ss_steps"] == str(step)
    resumed = launch(torchrun(), *args, "--steps", str(step + 2), "--resume-state", str(state_path(last)))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert load_file(out)[1]["ss_steps"] == str(step + 2)
