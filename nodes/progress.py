"""Custom events to the browser through ComfyUI's PromptServer (the pack's web extension draws them)."""
from __future__ import annotations

from typing import Any


def send_event(event: str, data: dict[str, Any]) -> None:
    """Send `event` to the client that queued the prompt; a no-op where no server runs (scripts, tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))
