"""`python node_inputs_probe.py COMFY_DIR` prints, as JSON, the inputs of every node of the pack as ComfyUI gets them
(the pack imported inside that ComfyUI checkout's Python, no server), by node class name."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_machinery_probe import PACK_NAME, import_backend  # noqa: E402

if __name__ == "__main__":
    import_backend(Path(sys.argv[1]))
    nodes = sys.modules[PACK_NAME].NODE_CLASS_MAPPINGS
    print(json.dumps({cls.__name__: cls.INPUT_TYPES() for cls in nodes.values()}, default=str))
