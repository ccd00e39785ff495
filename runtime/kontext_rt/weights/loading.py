"""Reading checkpoint tensors straight into the runtime's modules.

Models are built on the meta device, then every tensor is read from safetensors, checked against the expected
key set and shapes, cast once and assigned: peak host memory is one copy of the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kontext_rt.errors import CheckpointError
from kontext_rt.weights.mapping import Rule
from kontext_rt.weights.safetensors_io import TensorFiles

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_LISTED = 8


def component_files(folder: Path, stem: str) -> TensorFiles:
    """The safetensors of one diffusers component: a single file or a sharded set with its index."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: component folder missing")
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return TensorFiles.from_index(index)
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return TensorFiles([single])
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
    raise CheckpointError(f"{folder}: no {stem}.safetensors or sharded index{hint}")


def strip_prefix(files: TensorFiles, prefixes: tuple[str, ...]) -> dict[str, str]:
    """Checkpoint key -> file key, with a tool prefix removed when every key carries it."""
    keys = files.keys()
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return {k[len(p) :]: k for k in keys}
    return {k: k for k in keys}


def header_shapes(path: Path, prefixes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """A single file's tensor shapes by checkpoint key (prefix stripped), from its header alone."""
    files = TensorFiles([path])
    return {k: files.shapes[v] for k, v in strip_prefix(files, prefixes).items()}


def on_meta(factory):
    """A module built on the meta device (no memory), to be filled by load_into."""
    with torch.device("meta"):
        return factory()


def shapes_of(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_into(
    module: nn.Module,
    rules: list[Rule],
    files: TensorFiles,
    names: dict[str, str],
    dtype: torch.dtype,
    device,
    where: Path,
) -> nn.Module:
    """Check the key set and every shape, then read, combine, cast and assign each tensor.

    names: checkpoint key (as the rules spell it) -> key in `files`."""
    expected = {s for r in rules for s in r.sources}
    missing, unexpected = sorted(expected - names.keys()), sorted(names.keys() - expected)
    if missing or unexpected:
        parts = [
            f"{len(missing)} missing: {', '.join(missing[:MAX_LISTED])}" if missing else "",
            f"{len(unexpected)} unexpected: {', '.join(unexpected[:MAX_LISTED])}" if unexpected else "",
        ]
        raise CheckpointError(f"{where}: keys do not match the model ({'; '.join(p for p in parts if p)})")
    targets = shapes_of(module)
    state = {}
    with files:
        for rule in rules:
            want = rule.source_shapes(targets[rule.target])
            for src, shape in zip(rule.sources, want, strict=True):
                got = files.shapes[names[src]]
                if got != shape:
                    raise CheckpointError(
                        f"{files.where[names[src]]}: tensor {names[src]!r} has shape "
                        f"{list(got)}, the model expects {list(shape)}"
                    )
            tensors = [files.get(names[s]) for s in rule.sources]
            # a fresh, aligned copy: never a view of the mmapped file (results then do not depend on file offsets)
            state[rule.target] = rule.combine(tensors).to(device=device, dtype=dtype, copy=True).contiguous()
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)
