"""Custom events to the browser through ComfyUI's PromptServer (the pack's web extension draws them), and the
loss history in the bounded form that events and `/history` carry."""
from __future__ import annotations

from typing import Any

HISTORY_POINTS = 500


def send_event(event: str, data: dict[str, Any]) -> None:
    """Send `event` to the client that queued the prompt; a no-op where no server runs (scripts, tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))


def history_steps(values: list[float], points: int = HISTORY_POINTS) -> list[int]:
    """At most `points` 1-based steps of a per-step series: all of a short one; of a longer one the first, the last,
    the lowest and the others evenly spaced between them."""
    count = len(values)
    if count <= points:
        return list(range(1, count + 1))
    lowest = min(range(count), key=values.__getitem__)
    spaced = {round(i * (count - 1) / (points - 2)) for i in range(points - 1)}
    return sorted(index + 1 for index in spaced | {lowest})


def loss_history(losses: list[float], smoothed: list[float]) -> dict[str, list]:
    """The raw and smoothed loss at `history_steps(losses)`, for the done event and the node's `ui` output."""
    steps = history_steps(losses)
    return {"loss_steps": steps, "losses": [losses[step - 1] for step in steps],
            "smoothed": [smoothed[step - 1] for step in steps]}
