"""The exception classes a package defines, found by importing all its modules; run as
`python exception_classes.py COMFY_DIR` it lists those of the pack's nodes, imported inside that ComfyUI checkout.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path


def exception_classes(package: str) -> dict[str, list[str]]:
    """`{module.Class: the names of its classes from the MRO}` for every exception (warnings aside) that the modules
    of `package` define, found among the subclasses of BaseException once every module is imported."""
    root = importlib.import_module(package)
    for module in pkgutil.walk_packages(root.__path__, f"{package}."):
        if not module.name.endswith(".__main__"):  # running it would start the CLI
            importlib.import_module(module.name)
    found, pending = {}, [BaseException]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith(f"{package}.") and not issubclass(cls, Warning):
            found[f"{cls.__module__}.{cls.__qualname__}"] = [base.__name__ for base in cls.__mro__]
    return found


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "comfyui"))
    from model_machinery_probe import PACK_NAME, import_backend

    import_backend(Path(sys.argv[1]))  # the pack as ComfyUI imports it, nodes included
    print(json.dumps(exception_classes(f"{PACK_NAME}.nodes")))
