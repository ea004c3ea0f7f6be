"""`python node_inputs_probe.py COMFY_DIR` prints, as JSON, the inputs of the training nodes as ComfyUI gets them
(the pack imported inside that ComfyUI checkout's Python, no server)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_machinery_probe import PACK_NAME, import_backend  # noqa: E402

NODES = ("TrainLoRA", "TrainingOptions", "FlowMatchingOptions", "TrainingOptionsWithFlowMatching")

if __name__ == "__main__":
    import_backend(Path(sys.argv[1]))
    train_nodes = importlib.import_module(f"{PACK_NAME}.nodes.train_nodes")
    print(json.dumps({name: getattr(train_nodes, name).INPUT_TYPES() for name in NODES}, default=str))
