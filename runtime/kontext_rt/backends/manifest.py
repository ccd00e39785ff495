"""Manifests: the JSON written beside every export artifact (ONNX graph, calibration state, TensorRT engine).

A manifest says what the artifact was made from and with what: the checkpoint fingerprint, the precision, the
I/O contract and shape profiles, the tool versions, the GPU. The export stage skips a stage whose manifest matches
what it would make now (resumable); the runtime refuses an engine whose manifest does not match the checkpoint it
was asked to serve (stale), naming the export command that rebuilds it. Files are listed with their sizes, so a
truncated or replaced artifact does not pass for a finished one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from kontext_rt.errors import InputError

FORMAT = 1


class Precision(StrEnum):
    """What an export's graphs compute in (`kontext-rt export --precision`, engine_precision=): fp16, bf16, or FP8
    GEMMs inside bf16 graphs. Manifests and folder names hold the strings."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"

    def __repr__(self) -> str:  # as the string it stands for: reprs of options (and the docs made from them) read so
        return repr(self.value)

    @classmethod
    def parse(cls, value, what: str = "precision") -> Precision:
        """The member for a precision given as a string (or a member); InputError naming the choices otherwise."""
        if isinstance(value, str) and value in {m.value for m in cls}:
            return cls(value)
        raise InputError(f"{what} must be one of {', '.join(cls)}, got {value!r}")


GRAPHS = ("transformer", "vae_encoder", "vae_decoder")


@dataclass(frozen=True)
class Manifest:
    stage: str  # "onnx" | "calibration" | "engine"
    graph: str  # one of GRAPHS, or "fp8" for calibration state
    precision: str  # a Precision (read back from JSON as its string)
    checkpoint: str  # checkpoint.fingerprint() of the weights it was made from
    io: dict = field(default_factory=dict)  # inputs, outputs, profiles (export.specs.GraphSpec.to_json)
    tools: dict = field(default_factory=dict)  # name -> version, for every tool whose output this depends on
    gpu: str | None = None  # engines only: they run on the GPU model they were built for
    files: dict = field(default_factory=dict)  # artifact file name (beside the manifest) -> size in bytes
    info: dict = field(default_factory=dict)  # not compared: timings, calibration data, the command line
    format: int = FORMAT

    def identity(self) -> dict:
        """What must match for the artifact to be reused: everything but `files` and `info`."""
        d = asdict(self)
        d.pop("files"), d.pop("info")
        return d

    def write(self, path: Path) -> None:
        """Atomically: the manifest is written last and is what marks a stage finished."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        """The manifest at path, or None when it is missing, unreadable or of another format."""
        try:
            d = json.loads(Path(path).read_text())
            return cls(**d) if d.get("format") == FORMAT else None
        except (OSError, ValueError, TypeError):
            return None

    def files_intact(self, folder: Path) -> list[str]:
        """Names of listed files that are missing or have another size (empty: all intact)."""
        bad = []
        for name, size in self.files.items():
            p = Path(folder) / name
            if not p.is_file() or p.stat().st_size != size:
                bad.append(name)
        return bad


def file_sizes(*paths: Path) -> dict[str, int]:
    return {Path(p).name: Path(p).stat().st_size for p in paths if Path(p).exists()}


def export_command(checkpoint, out, precision: Precision | str) -> str:
    return f"kontext-rt export --checkpoint {checkpoint} --out {out} --precision {precision}"


def engine_folder(out: Path, precision: Precision | str) -> Path:
    return Path(out) / f"trt-{precision}"


def onnx_folder(out: Path, precision: Precision | str) -> Path:
    return Path(out) / f"onnx-{precision}"
