"""The load spec: everything Pipeline.from_pretrained takes, as one frozen value, and its one check.

    spec = LoadSpec(path, device="cuda", dtype=torch.bfloat16, optimize=Optimizations(fp8="dynamic"))
    checked = spec.check()              # every check that reads no weights: InputError/CheckpointError
    pipe = Pipeline.load(checked)       # the weights (Pipeline.load(spec) checks, then loads)

`Pipeline.from_pretrained(path, **options)` is `Pipeline.load(LoadSpec(path, **options))`. The CLI, the server and
Ray Serve's replicas build a LoadSpec from their arguments (kontext_rt.cli.load_spec), so every load option is the
same on every door. path may be a checkpoint found already (kontext_rt.weights.formats.detect: its configs read
once, kept): the CLI finds it once for its own checks, and the load reads nothing of it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kontext_rt import backends, load_checks
from kontext_rt.backends import Accepted, Backend, LoadRequest
from kontext_rt.backends.manifest import Precision
from kontext_rt.config import FluxConfig, Variant
from kontext_rt.context_cache import check_capacity
from kontext_rt.errors import InputError
from kontext_rt.model.vae_tiling import DEFAULT_TILE
from kontext_rt.options import Optimizations
from kontext_rt.parallel import Parallel
from kontext_rt.placement import Placement
from kontext_rt.weights.formats import CheckpointFormat

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoadSpec:
    """What to load and how (Pipeline.from_pretrained's arguments; its docstring says what each means)."""

    path: object  # a checkpoint folder or file (str or Path), or a found checkpoint (weights.formats.detect)
    device: object = "cpu"
    dtype: torch.dtype = torch.float32
    backend: str = "auto"
    max_sequence_length: int | None = None
    ae: object = None
    text_encoders: object = None
    text_cache_dir: object = None
    text_cache_size: int = 64
    engines: object = None
    engine_precision: str | None = None
    optimize: Optimizations | None = None
    loras: tuple = ()
    variant: str | None = None
    max_memory: int | None = None
    plan_size: tuple[int, int] = (1024, 1024)
    placement: Placement | str | None = None
    vae_tiling: bool | str = "auto"
    vae_tile: int = DEFAULT_TILE
    context_cache_size: int = 16
    parallel: object = None  # None or 1: one process; N or a Parallel: N ranks (kontext_rt.parallel)

    def check(self) -> CheckedLoad:
        """Every argument checked before any weights are read, in the order a user fixes them: the device, dtype,
        backend and speed options, the placement and VAE tiling, the checkpoint (its configs and variant), the
        sequence length, the LoRA list, the memory plan, then the backend's own checks. parallel: what cannot run
        sharded first, the process group after the speed options, the heads it must divide after the configs."""
        device = load_checks.check_device(self.device)
        parallel = Parallel.parse(self.parallel)
        if parallel is not None:  # before the backend is made: TensorRT's may not even import here
            self.check_sharded(parallel.size)
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {self.dtype!r}")
        precision = (
            None if self.engine_precision is None else Precision.parse(self.engine_precision, "engine_precision")
        )
        chosen = backends.resolve(self.backend, device, self.engines)
        optimize = self.optimize or Optimizations()
        optimize.check(device, self.dtype)
        if parallel is not None:
            parallel = parallel.check_group(device)
        placement = Placement.parse(self.placement)
        placement.check(optimize)
        load_checks.check_vae_tiling(self.vae_tiling, self.vae_tile, chosen)
        check_capacity(self.context_cache_size)
        checkpoint, cfg, variant, trained_sizes = load_checks.checkpoint(
            self.path, self.ae, self.text_encoders, self.variant
        )
        if parallel is not None:
            parallel.check_model(cfg.num_heads)
        msl = load_checks.sequence_length(
            variant, self.max_sequence_length, load_checks.tokenizer_limit(checkpoint.text_encoders)
        )
        if isinstance(self.loras, (str, Path)):
            raise InputError(
                f"loras must be a list of LoRA files (each a path or (path, strength)), got {self.loras!r}"
            )
        tile = None if self.vae_tiling is False else self.vae_tile
        load_checks.check_memory(
            chosen, checkpoint, cfg, device, self.dtype, optimize, variant, msl, self.max_memory, self.plan_size,
            placement, tile,
        )  # fmt: skip
        request = LoadRequest(
            checkpoint,
            checkpoint.path,
            cfg,
            self.dtype,
            optimize,
            tuple(self.loras),
            None if self.engines is None else Path(self.engines),
            precision,
            placement,
            parallel,
        )
        accepted = backends.checked(chosen, request, auto=self.backend == "auto")
        chosen = accepted.backend
        return CheckedLoad(
            self, device, chosen, optimize, placement, checkpoint, cfg, variant, trained_sizes, msl, accepted, parallel
        )

    def check_sharded(self, ranks: int) -> None:
        """What cannot run on `ranks` sequence-parallel ranks, refused with no process group (check() does it first;
        `serve --ray --gpus-per-replica` before Ray starts): TensorRT engines."""
        engines = self.backend == "tensorrt" or (self.backend == "auto" and self.engines is not None)
        Parallel(ranks).check_backend(self.backend, engines)


@dataclass(frozen=True)
class CheckedLoad:
    """A LoadSpec after its check: what Pipeline.load builds the pipeline from (no weights read yet)."""

    spec: LoadSpec
    device: torch.device
    backend: Backend
    optimize: Optimizations
    placement: Placement
    checkpoint: CheckpointFormat
    cfg: FluxConfig
    variant: Variant
    trained_sizes: tuple[tuple[int, int], ...] | None
    max_sequence_length: int
    accepted: Accepted = field(repr=False)  # what the backend's check returned: its load takes it
    parallel: Parallel | None = None  # with its process group resolved
