"""LoRA files: kohya-format safetensors, written atomically and deterministically, read without unpickling."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LoRALabError
from ..network import LoRANetwork, NetworkError
from ..settings import Setting, Widget

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
LORA_KEY_PREFIXES = ("lora_unet_", "lora_te", "transformer.", "text_encoder.", "diffusion_model.")
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
STALE_TEMPORARY_SECONDS = 60  # a temporary file this old belongs to no writer that is still running
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAVE_PRECISION = Setting("save_precision", str, "float16", "The dtype of the file's weights: float16 halves the file; "
                         "float32 keeps every bit of the trained weights (alphas stay float32).",
                         choices=tuple(SAVE_DTYPES), aliases=("--save-dtype",), widget=Widget())


Naming = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # file names ↔ network names


def keep_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD1.x/2.x and SDXL files name layers as the network does."""
    return tensors


class LoRAFileError(LoRALabError, ValueError):
    """A LoRA file cannot be read or written; the message names the file and what to do."""


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors header, length prefix included, keys sorted so that equal inputs give equal bytes.

    (safetensors' own writer orders metadata by a per-process hash, so two identical saves differ.)
    """
    entries: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise LoRAFileError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[bytes]]:
    """The header and the data blocks of a safetensors file."""
    return header(tensors, metadata), [tensor_bytes(tensors[name]) for name in sorted(tensors)]


def data_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor data as stored, without the header: kohya's `sshs_model_hash`."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensor_bytes(tensors[name]))
    return digest.hexdigest()


def write_atomic(path: Path, chunks: list[bytes], overwrite: bool) -> None:
    """Write to a temporary file beside `path`, fsync, then move it into place in one step.

    A crash leaves either the old file or the new one, never a partial file under `path`. Without `overwrite`
    an existing file is never replaced: the final step links the file under its name, which fails if the name is
    taken; where the filesystem has no hard links (exFAT, some network mounts) it reserves the name by an exclusive
    create and renames the written file over that reservation (a crash between those two steps leaves an empty
    file, which reads as a clear error). The file's mode follows the umask, like any other file's.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise LoRAFileError(f"{path} exists already; choose another name or allow overwriting")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a writer that was killed
        if time.time() - stale.stat().st_mtime > STALE_TEMPORARY_SECONDS:
            stale.unlink(missing_ok=True)
    handle, temporary = create_temporary(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
            stream.flush()
            os.fsync(stream.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            move_without_overwriting(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def create_temporary(path: Path) -> tuple[int, str]:
    """A new file `.<name>.<random>.tmp` beside `path`, opened for writing, with the mode the umask gives (mkstemp
    would make it 0600, and the saved LoRA with it: unreadable to others sharing `models/loras`)."""
    while True:
        temporary = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), temporary
        except FileExistsError:
            continue


def move_without_overwriting(temporary: str, path: Path) -> None:
    """Give the written file `temporary` the name `path` in one step, unless someone else has taken that name."""
    taken = LoRAFileError(f"{path} was created by someone else meanwhile; nothing was overwritten")
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise taken from None
    except OSError:  # no hard links here (EPERM, ENOTSUP, EXDEV…): reserve the name, then rename over it
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise taken from None
        try:
            os.replace(temporary, path)
        except BaseException:
            path.unlink()  # our own empty reservation
            raise
        return
    os.unlink(temporary)


def save_file(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool = False
) -> Path:
    """Save `tensors` with string `metadata` as safetensors at `path`, atomically; returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAFileError(f"{path}: LoRA files are saved as .safetensors; use that extension")
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise LoRAFileError(f"metadata values must be strings; not so for {bad}")
    header, blocks = serialize(tensors, metadata)
    write_atomic(path, [header, *blocks], overwrite)
    return path


def refuse_pickle(path: Path) -> None:
    with open(path, "rb") as stream:
        start = stream.read(2)
    if path.suffix.lower() in PICKLE_SUFFIXES or start in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise LoRAFileError(
            f"{path} is a pickled PyTorch file. LoRA Lab never unpickles files, because unpickling can run "
            "arbitrary code; use the .safetensors version of this LoRA, or convert it on a machine you trust"
        )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of any safetensors file, whatever it names. Pickles are refused, never opened."""
    path = Path(path)
    if not path.is_file():
        raise LoRAFileError(f"{path}: no such LoRA file")
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as stream:
            return {key: stream.get_tensor(key) for key in stream.keys()}, stream.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise LoRAFileError(f"{path} is not a valid safetensors file ({error}); the file is damaged or not a LoRA") from error


def load_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors LoRA file, in a layout LoRA Lab reads. Pickles are refused, never opened."""
    tensors, metadata = read_safetensors(path)
    malformed = [key for key in tensors if "." not in key]
    if malformed:
        raise LoRAFileError(f"{path} has keys without a module name, for example {malformed[:3]}: not a LoRA file")
    if not any(key.startswith(LORA_KEY_PREFIXES) for key in tensors):
        raise LoRAFileError(
            f"{path} is not in kohya format (no `lora_unet_…`/`lora_te_…` keys; first key {next(iter(tensors), None)!r}) "
            "nor in the naming diffusers and ComfyUI read for DiT families (`transformer.…`/`text_encoder.…`, "
            "`diffusion_model.…`); LoRA Lab reads the kohya format that ComfyUI, A1111, kohya sd-scripts and "
            "musubi-tuner write, and those layouts where the family's files use them"
        )
    return tensors, metadata


@dataclass
class LoRAWeights:
    """A LoRA as a file holds it: kohya-named CPU tensors and string metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_network(cls, network: LoRANetwork, metadata: dict[str, str], dtype: str = "float32",
                     file_tensors: Naming = keep_names) -> LoRAWeights:
        """The network's tensors as `dtype`, named for the file by `file_tensors` (a backend's, for its family)."""
        if dtype not in SAVE_DTYPES:
            raise LoRAFileError(f"save dtype {dtype!r} is not one of {sorted(SAVE_DTYPES)}")
        return cls(file_tensors(network.kohya_tensors(SAVE_DTYPES[dtype])), dict(metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LoRAWeights:
        return cls(*load_file(path))

    def converted(self, dtype: str) -> LoRAWeights:
        """The same LoRA stored as `dtype` (alphas stay fp32)."""
        if dtype not in SAVE_DTYPES:
            raise LoRAFileError(f"save dtype {dtype!r} is not one of {sorted(SAVE_DTYPES)}")
        return LoRAWeights(
            {k: v if k.endswith(".alpha") else v.to(SAVE_DTYPES[dtype]) for k, v in self.tensors.items()}, self.metadata
        )

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the file atomically, adding kohya's `sshs_model_hash` of the tensors to the metadata."""
        return save_file(path, self.tensors, {**self.metadata, "sshs_model_hash": data_hash(self.tensors)}, overwrite)


def save_lora(
    path: str | os.PathLike,
    network: LoRANetwork,
    metadata: dict[str, str],
    dtype: str = "float16",
    overwrite: bool = False,
    file_tensors: Naming = keep_names,
) -> Path:
    """Save `network` in kohya format with `metadata`; see `LoRAWeights.save`. `file_tensors` is the backend's, for
    families whose files name or fuse layers otherwise."""
    return LoRAWeights.from_network(network, metadata, dtype, file_tensors).save(path, overwrite)


def load_lora(
    path: str | os.PathLike, modules: dict[str, torch.nn.Module], strict: bool = True,
    network_tensors: Naming = keep_names,
) -> tuple[LoRANetwork, dict[str, str]]:
    """A network rebuilt from the LoRA file at `path` on `modules` (kohya name → layer), and the file's metadata.
    `network_tensors` (the backend's) turns the file's names into the network's.

    With `strict`, modules of the file that match no layer are an error; otherwise they are skipped with a
    warning that counts them.
    """
    tensors, metadata = load_file(path)
    tensors = network_tensors(tensors)
    try:
        network, unmatched = LoRANetwork.from_tensors(tensors, modules, strict)
    except NetworkError as error:
        raise LoRAFileError(f"{path}: {error}") from error
    if unmatched:
        warnings.warn(f"{path}: {len(unmatched)} modules match no layer of this model and were skipped, "
                      f"for example {unmatched[:3]}", stacklevel=2)
    return network, metadata
