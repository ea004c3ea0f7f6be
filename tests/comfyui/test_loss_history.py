"""The loss history that Train LoRA puts into `/history` and its done event is bounded (nodes/progress.py; no server)."""
from __future__ import annotations

import importlib.util
import random

from .harness import REPO_ROOT

spec = importlib.util.spec_from_file_location("lora_lab_progress", REPO_ROOT / "nodes" / "progress.py")
progress = importlib.util.module_from_spec(spec)
spec.loader.exec_module(progress)  # nodes/__init__.py needs ComfyUI; this module does not


def test_short_runs_keep_every_step() -> None:
    losses = [0.5, 0.25, 0.125]
    assert progress.loss_history(losses, [0.5, 0.4, 0.3]) == {
        "loss_steps": [1, 2, 3], "losses": losses, "smoothed": [0.5, 0.4, 0.3]}


def test_long_runs_keep_500_points_with_the_first_last_and_lowest() -> None:
    rng = random.Random(0)
    for count in (501, 2000, 100_000):
        losses = [rng.random() for _ in range(count)]
        lowest = min(range(count), key=losses.__getitem__) + 1
        history = progress.loss_history(losses, losses)
        steps = history["loss_steps"]
        assert len(steps) <= 500 and steps == sorted(set(steps))
        assert steps[0] == 1 and steps[-1] == count and lowest in steps
        assert max(b - a for a, b in zip(steps, steps[1:])) <= 2 * count / 498  # evenly spread
        assert history["losses"] == [losses[step - 1] for step in steps] == history["smoothed"]
