"""What every subcommand of the CLI shares: argument types, the usage error, writing outputs, the summary line."""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

from kontext_rt.errors import InputError

DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


class UsageError(InputError):
    """A bad command line: a missing or malformed argument, or a user's file that cannot be used."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _int_at_least(minimum: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be at least {minimum}")
        return v

    return parse


positive_int, nonneg_int = _int_at_least(1), _int_at_least(0)


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def check_writable(folder: Path, what: str):
    """Create and remove a file in `folder`: the only test of writability that root, ACLs and read-only mounts
    all answer truthfully."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".kontext-rt-", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None


def write_atomically(out: Path, write: Callable[[Path], object]) -> None:
    """write(temporary path) beside out, then rename it to out: never a partial output file. The temporary name
    keeps out's extension (PIL picks the format from it)."""
    tmp = out.parent / f".{out.stem}.{secrets.token_hex(6)}.partial{out.suffix}"
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a folder made read-only during the run: name the user's path
        raise UsageError(f"output {out}: cannot write it ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stage_summary(report, label: str) -> str:
    names = [
        ("text_encode", "text encode"),
        ("vae_encode", "VAE encode"),
        ("denoise", "denoise"),
        ("vae_decode", "VAE decode"),
    ]
    parts = []
    for key, name in names:
        if key in report.timings:
            extra = " (cache hit)" if key == "text_encode" and report.text_cache_hit else ""
            if key == "denoise" and report.steps:
                extra = f" ({report.steps} steps, {report.timings[key] / report.steps * 1000:.1f} ms/step)"
            parts.append(f"{name} {report.timings[key]:.2f} s{extra}")
    return f"{label} | " + " | ".join(parts) + f" | seed {report.seed}"


def quiet_libraries():
    """The application, not the library, decides what third-party packages print: only their errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
