"""Where a workflow may read and write: dataset folders under ComfyUI's input folder (or `lora_datasets` paths
from extra_model_paths.yaml) and LoRA files under `models/loras`. Anything else is refused with a clear error."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import folder_paths

from ..lora_core.data.dataset import CONTROL_FOLDER, IMAGE_EXTENSIONS
from ..lora_core.data.videos import VIDEO_EXTENSIONS
from ..lora_core.errors import LoRALabError
from ..lora_core.training.checkpoints import STATE_SUFFIX

DATASET_FOLDER_TYPE = "lora_datasets"
LATENT_CACHE_FOLDER = "lora_lab_latent_cache"
MAX_NAME_LENGTH = 200
SAFE_NAME = re.compile(r"^[\w\- .]+(/[\w\- .]+)*$")


class PathError(LoRALabError, ValueError):
    """A path a workflow named is outside the folders LoRA Lab may use, or malformed."""


def dataset_roots() -> list[Path]:
    """ComfyUI's input folder, then any `lora_datasets` folders the user configured."""
    extra = folder_paths.folder_names_and_paths.get(DATASET_FOLDER_TYPE, ([], set()))[0]
    return [Path(folder_paths.get_input_directory()), *map(Path, extra)]


def has_images(folder: Path) -> bool:
    """Images or video clips directly inside `folder` or in its immediate subfolders (kohya's `N_name` layout)."""
    media = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix.lower() in media:
            return True
        if entry.is_dir() and not entry.name.startswith(".") and any(
            child.suffix.lower() in media for child in entry.iterdir() if child.is_file()
        ):
            return True
    return False


def list_dataset_folders() -> list[str]:
    """Subfolders of the dataset roots that hold images, by name (the first root wins on equal names)."""
    names: list[str] = []
    for root in dataset_roots():
        if root.is_dir():
            for entry in sorted(root.iterdir()):
                if (entry.is_dir() and not entry.name.startswith(".") and entry.name not in names
                        and inside(entry, root) and has_images(entry)):
                    names.append(entry.name)
    return names


def check_name(name: str, what: str) -> str:
    """A relative name of plain characters, with no `..`, no absolute path, no backslash, no NUL."""
    if not isinstance(name, str) or not name.strip():
        raise PathError(f"the {what} is empty; give a name such as 'my_dataset'")
    if "\x00" in name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise PathError(f"the {what} {name!r} must be a relative name such as 'my_lora' or 'folder/my_lora', "
                        "without a drive, a leading '/' or backslashes")
    if len(name) > MAX_NAME_LENGTH:
        raise PathError(f"the {what} is {len(name)} characters long; use at most {MAX_NAME_LENGTH}")
    if any(part in ("", ".", "..") for part in name.split("/")) or not SAFE_NAME.match(name):
        raise PathError(f"the {what} {name!r} may use letters, digits, '_', '-', '.', spaces and '/' between "
                        "folder names, and no '..'")
    return name


def inside(path: Path, root: Path) -> bool:
    """`path` lies in `root` once every symbolic link is resolved."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), real_root]) == real_root


def resolve_dataset(name: str) -> Path:
    """The dataset folder called `name` inside a dataset root, links resolved; refused if it, or anything in it
    that Load Dataset reads, leads elsewhere."""
    check_name(name, "dataset folder")
    roots = dataset_roots()
    for root in roots:
        candidate = root / name
        if candidate.is_dir():
            if not inside(candidate, root):
                raise PathError(f"the dataset folder {name!r} is a link that leads outside {root}; refused")
            folder = Path(os.path.realpath(candidate))
            for entry in dataset_entries(folder):
                if not any(inside(entry, allowed) for allowed in roots):
                    raise PathError(
                        f"'{entry.relative_to(folder).as_posix()}' in the dataset folder {name!r} is a link that leads "
                        f"to {os.path.realpath(entry)}, outside {', '.join(map(str, roots))}; refused: copy or move "
                        "those files into the dataset folder instead of linking them")
            return folder
    raise PathError(f"no dataset folder {name!r} in {', '.join(map(str, roots))}; put your images in a subfolder "
                    f"of ComfyUI's input folder (or add a '{DATASET_FOLDER_TYPE}:' path to extra_model_paths.yaml)")


def dataset_entries(folder: Path) -> list[Path]:
    """What Load Dataset reads from `folder`: its visible entries and those of its visible subfolders (kohya's
    `N_name` layout, and the `control/` folders of edit pairs' reference images in them), in order, links not
    followed."""
    entries = []
    for entry in sorted(folder.iterdir()):
        if not entry.name.startswith("."):
            entries.append(entry)
            if entry.is_dir():
                for child in sorted(child for child in entry.iterdir() if not child.name.startswith(".")):
                    entries.append(child)
                    if child.is_dir() and child.name == CONTROL_FOLDER:
                        entries += sorted(item for item in child.iterdir() if not item.name.startswith("."))
    return entries


def dataset_fingerprint(folder: Path) -> str:
    """A hash of the folder's listing with each entry's size and modification time: it changes when images or
    captions are added, removed, replaced or edited."""
    listing = hashlib.sha256()
    for entry in dataset_entries(folder):
        status = entry.stat() if entry.exists() else entry.lstat()  # a dangling link has no target
        listing.update(f"{entry.relative_to(folder).as_posix()}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return listing.hexdigest()


def loras_root() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def next_lora_path(prefix: str) -> Path:
    """`models/loras/<prefix>_00001_.safetensors` with the next free counter, as SaveImage numbers images."""
    check_name(prefix, "filename prefix")
    root = loras_root()
    folder = (root / prefix).parent
    existing = folder
    while not existing.exists() and existing != root:
        existing = existing.parent
    if not inside(existing, root):
        raise PathError(f"the filename prefix {prefix!r} leads outside {root} through a link; refused: use a folder "
                        f"inside {root}")
    stem = Path(prefix).name
    numbered = re.compile(rf"^{re.escape(stem)}_(\d{{5}})_\.safetensors$")
    used = [int(match.group(1)) for entry in (folder.iterdir() if folder.is_dir() else [])
            if (match := numbered.match(entry.name))]
    return folder / f"{stem}_{max(used, default=0) + 1:05d}_.safetensors"


def lora_files() -> list[str]:
    """The `.safetensors` LoRAs of ComfyUI's `loras` list (pickled formats and training states are never offered)."""
    return [name for name in folder_paths.get_filename_list("loras")
            if name.lower().endswith(".safetensors") and not name.endswith(STATE_SUFFIX)]


def training_states() -> list[str]:
    """Checkpoint sidecars in the `loras` folders, to resume a run from."""
    return [name for name in folder_paths.get_filename_list("loras") if name.endswith(STATE_SUFFIX)]


def resolve_lora(name: str) -> Path:
    """The full path of a listed LoRA file, checked to lie inside one of the `loras` folders."""
    path = folder_paths.get_full_path("loras", name) if name else None
    if path is None:
        raise PathError(f"no LoRA file {name!r} in {', '.join(folder_paths.get_folder_paths('loras'))}; "
                        "pick one from the list (refresh the page after adding files)")
    if not any(inside(Path(path), Path(root)) for root in folder_paths.get_folder_paths("loras")):
        raise PathError(f"the LoRA file {name!r} is a link that leads outside the loras folders; refused")
    return Path(path)


def latent_cache_folder() -> Path:
    """Where Train LoRA keeps latents between runs when asked: inside ComfyUI's output folder."""
    return Path(folder_paths.get_output_directory()) / LATENT_CACHE_FOLDER
