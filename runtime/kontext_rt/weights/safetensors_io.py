"""Validated safetensors reading: clear errors naming the file and key, never pickle.

Format (safetensors): u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data section. Headers are checked before any tensor is read, so a truncated or corrupt file fails with
the file's name instead of a crash deep inside a load.
"""

from __future__ import annotations

import json
import math
import struct
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from kontext_rt.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 2**20
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def read_header(path: Path) -> dict[str, dict]:
    """Tensor entries of one safetensors file (metadata dropped), validated against the file's size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    try:
        f = open(path, "rb")  # closed by the with below
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for key, e in header.items():
        try:
            start, end = e["data_offsets"]
            nbytes = math.prod(e["shape"]) * _DTYPE_BYTES[e["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {key!r}") from None
        if end > data:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} ends at byte {end} of a {data}-byte data section")
        if end - start != nbytes:
            raise CheckpointError(f"{path}: corrupt entry {key!r}: {end - start} bytes for shape {e['shape']}")
    return header


def digest_file(h, path: Path, samples: int = 16, window: int = 64 * 1024) -> None:
    """Feed a file into hash h without reading all of it: in full if it is not safetensors; otherwise its
    validated header, its size and `samples` evenly spaced `window`-byte slices of its data (a checkpoint of
    tens of GB is fingerprinted in milliseconds, and any retrained or fine-tuned weights change it)."""
    path = Path(path)
    h.update(f"{path.name}\0".encode())
    if path.suffix != ".safetensors":
        h.update(path.read_bytes())
        return
    read_header(path)
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(size * i // samples)
            h.update(f.read(window))


class TensorFiles:
    """Tensors spread over one or more safetensors files, addressed by key (headers read once, data on demand)."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            for key, e in read_header(path).items():
                if key in self.where:
                    raise CheckpointError(f"{path}: tensor {key!r} also appears in {self.where[key]}")
                self.where[key] = Path(path)
                self.shapes[key] = tuple(e["shape"])
        self._stack: ExitStack | None = None
        self._handles: dict[Path, object] = {}

    @classmethod
    def from_index(cls, index: Path) -> TensorFiles:
        """A sharded checkpoint: the index's weight_map names each tensor's shard."""
        try:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        shards = sorted({index.parent / f for f in weight_map.values()})
        files = cls(shards)
        for key, shard in weight_map.items():
            if files.where.get(key) != index.parent / shard:
                raise CheckpointError(f"{index}: the index puts {key!r} in {shard}, which does not hold it")
        return files

    def keys(self) -> set[str]:
        return set(self.where)

    def __enter__(self):
        self._stack = ExitStack()
        return self

    def __exit__(self, *exc):
        self._handles.clear()
        self._stack.close()

    def get(self, key: str) -> torch.Tensor:
        path = self.where[key]
        if path not in self._handles:
            try:
                self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot open ({e})") from None
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None
