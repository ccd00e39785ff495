"""Backends: each builds what it runs (a Denoiser and a VAE) and owns its checks; only `auto` falls back.

    backend = resolve(name, device)   # refuses, with the reason, a backend that cannot run here
    backend = checked(backend, request, auto=name == "auto")   # before any weights are read
    loaded = backend.load(request)    # Loaded(denoiser, vae, transformer, loras)

The eager and triton backends run the runtime's own model with their op table (the reference ops, or the Triton
kernels); the tensorrt backend runs engines built by `kontext-rt export` and reads no transformer or VAE weights.
Nothing outside this module compares backend names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from kontext_rt.backends import graph_io
from kontext_rt.config import FluxConfig
from kontext_rt.errors import BackendUnavailable, InputError
from kontext_rt.model.op_table import EAGER_OPS, Ops
from kontext_rt.options import Optimizations
from kontext_rt.placement import Placement
from kontext_rt.sampling import denoisers
from kontext_rt.sampling.loop import Denoiser
from kontext_rt.transformer_placement import place_transformer
from kontext_rt.vae_stage import StagedVAE
from kontext_rt.weights.formats import CheckpointFormat
from kontext_rt.weights.lora import LoRAStack


@dataclass(frozen=True)
class LoadRequest:
    """Everything a backend needs to build a pipeline's model (Pipeline.from_pretrained fills it in)."""

    checkpoint: CheckpointFormat  # the detected checkpoint
    path: Path  # the checkpoint as the user named it: messages and export commands name it
    cfg: FluxConfig
    dtype: torch.dtype
    optimize: Optimizations
    loras: tuple = ()  # LoRA files, each a path or (path, strength), fused at load
    engines: Path | None = None  # tensorrt: the folder `kontext-rt export --out` wrote
    engine_precision: str | None = None
    placement: Placement = Placement()


@dataclass
class Loaded:
    """What a backend built: the loop's denoiser, the VAE, and (for the runtime's own model) the transformer and
    its LoRA stack; engines have neither (None)."""

    denoiser: Denoiser
    vae: object
    transformer: torch.nn.Module | None = None
    loras: LoRAStack | None = None


class Backend:
    name: str
    passed_over: tuple[str, ...] = ()  # auto: why each backend before this one could not run (resolve, checked)
    engines = False  # True: runs prebuilt engines (needs engines=DIR, takes no runtime speed options or LoRAs)

    def __init__(self, device: torch.device):
        self.device = device

    def check(self, req: LoadRequest) -> None:
        """Refuse what this backend cannot run, naming the fix (before any weights are read)."""

    def load(self, req: LoadRequest) -> Loaded:
        raise NotImplementedError


class TorchBackend(Backend):
    """The runtime's own model, run with this backend's op table."""

    ops: Ops = EAGER_OPS

    def check(self, req: LoadRequest) -> None:
        """Engines, head dims, every LoRA file (read against the model built on the meta device: no weights) and
        the static FP8 calibration (kept for load)."""
        from kontext_rt.model import fp8_linear as fp8
        from kontext_rt.model.transformer import FluxTransformer
        from kontext_rt.weights import lora

        for given, what in ((req.engines, "engines="), (req.engine_precision, "engine_precision=")):
            if given is not None:
                raise InputError(f"{what} is only used by backend='tensorrt', not {self.name!r}")
        if self.ops.head_dims is not None and req.cfg.head_dim not in self.ops.head_dims:
            raise BackendUnavailable(
                f"backend {self.name!r} supports head dims {self.ops.head_dims}, this model "
                f"has {req.cfg.head_dim}; use backend='eager'"
            )
        if req.loras:
            with torch.device("meta"):
                shape_only = FluxTransformer(req.cfg)
            for item in req.loras:
                lora.read(_lora_path(item), shape_only)
        self._amax = None
        if req.optimize.fp8 == "static":
            self._amax = fp8.read_calibration(req.optimize.fp8_calibration, req.checkpoint.fingerprint())

    def load(self, req: LoadRequest) -> Loaded:
        """The transformer is read into host memory when any of it will live there (placement) or be quantized
        (fp8): the device never holds a full-precision copy of what it does not keep."""
        placement, opt = req.placement, req.optimize
        streamed = placement.offloads_blocks or placement.modulation == "staged"
        host = torch.device("cpu")
        transformer = req.checkpoint.load_transformer(req.dtype, host if streamed or opt.fp8 else self.device)
        staged_vae = placement.vae == "staged"
        vae = req.checkpoint.load_vae(req.dtype, host if staged_vae else self.device)
        # FP8 weights are quantized on the device one linear at a time; blocks streamed from host memory go back
        # there as soon as their linears are quantized: the device never holds more than one block of them
        stack = _prepare(
            transformer, self.ops, req, self.device, self._amax, host if placement.offloads_blocks else None
        )
        residency = place_transformer(transformer, placement, self.device)
        denoiser = denoisers.for_model(
            transformer, self.ops, req.dtype, opt.hoist, opt.cuda_graphs, max_graphs=opt.max_graphs
        )
        if residency is not None:
            denoiser = residency.denoiser(denoiser)
        return Loaded(denoiser, StagedVAE(vae, self.device) if staged_vae else vae, transformer, stack)


class Eager(TorchBackend):
    name = "eager"


class Triton(TorchBackend):
    name = "triton"

    def __init__(self, device: torch.device):
        super().__init__(device)
        try:
            from kontext_rt.kernels import ops as kernels
        except ImportError as err:
            raise BackendUnavailable(
                f"backend 'triton' needs the triton package ({err}); install triton or use backend='eager'"
            ) from err
        if device.type == "cuda":
            if kernels.interpreted():
                raise BackendUnavailable(
                    "backend 'triton' was asked for on a CUDA device, but its kernels were "
                    "compiled for the Triton interpreter (TRITON_INTERPRET=1): unset it, or use "
                    "backend='eager'"
                )
            if not torch.cuda.is_available():
                raise BackendUnavailable("backend 'triton' needs a CUDA GPU and none is visible; use backend='eager'")
            if torch.cuda.get_device_capability(device) < (8, 0):
                name = torch.cuda.get_device_name(device)
                raise BackendUnavailable(
                    f"backend 'triton' needs compute capability 8.0 or newer (bf16), {name} "
                    f"has {torch.cuda.get_device_capability(device)}; use backend='eager'"
                )
            launches(kernels, device)
        elif device.type == "cpu":
            if not kernels.interpreted():
                raise BackendUnavailable(
                    "backend 'triton' needs a CUDA GPU; on the CPU its kernels run only under "
                    "the Triton interpreter (TRITON_INTERPRET=1, for tests); use "
                    "backend='eager'"
                )
        else:
            raise BackendUnavailable(f"backend 'triton' runs on CUDA devices, not {device.type}; use backend='eager'")
        self.ops = Ops(
            attention=kernels.attention_sdpa,
            modulate=kernels.modulate,
            gated_residual=kernels.gated_residual,
            row_linear=kernels.row_linear_op,
            quantize_rows=kernels.quantize_rows,
            head_dims=kernels.HEAD_DIMS,
        )


def launches(kernels, device: torch.device) -> None:
    """Compile and run one small kernel, so that a machine where Triton cannot build its launcher (no C compiler,
    no writable cache folder) is refused here, before any weights are read, not at the first denoising step."""
    try:
        x = torch.zeros(1, 1, 16, device=device)
        kernels.gated_residual(x, x, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # whatever Triton's toolchain raises: the reason is the message
        raise BackendUnavailable(
            f"backend 'triton' could not compile and run a kernel here ({type(err).__name__}: {err}); "
            "use backend='eager'"
        ) from err


class TensorRT(Backend):
    """Engines replace the whole transformer and VAE. Needs a CUDA GPU and TensorRT."""

    name = "tensorrt"
    engines = True

    def __init__(self, device: torch.device):
        super().__init__(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"backend 'tensorrt' needs a CUDA GPU (device is {device}); use backend='eager'")
        try:
            import tensorrt  # noqa: F401
        except ImportError as err:  # PyPI's tensorrt stubs fail here too, on a missing libnvinfer
            raise BackendUnavailable(
                f"backend 'tensorrt' needs TensorRT, which is not importable here ({err}); "
                "install it from NVIDIA's package index, or use backend='eager'"
            ) from err

    def check(self, req: LoadRequest) -> None:
        optimize = req.optimize
        if req.engines is None:
            raise InputError("backend='tensorrt' needs engines=DIR, the folder `kontext-rt export --out DIR` wrote")
        if optimize.cuda_graphs or optimize.fp8 or optimize.compile:
            raise InputError(
                "backend='tensorrt' runs engines: cuda_graphs, fp8 and compile apply to the eager and "
                "triton backends (engines get FP8 from `kontext-rt export --precision fp8`)"
            )
        if req.placement != Placement():
            raise InputError("backend='tensorrt' runs engines, which stay resident: placement applies to eager/triton")
        if req.loras:
            raise InputError(
                "backend='tensorrt' runs engines, which take no LoRAs: fuse a LoRA into the "
                "checkpoint's weights before exporting it, or use the eager or triton backend"
            )

    def load(self, req: LoadRequest) -> Loaded:
        from kontext_rt.backends.tensorrt import open_engines

        transformer, vae = open_engines(
            req.engines,
            req.checkpoint.fingerprint(),
            req.path,
            self.device,
            req.cfg,
            req.checkpoint.vae_config(),
            req.engine_precision,
        )
        # the state is cast once per step, to what the engine reads (not to the pipeline's dtype, then again)
        return Loaded(denoisers.PerStep(transformer, transformer.engine.dtypes[graph_io.IMG]), vae)


REGISTRY: dict[str, type[Backend]] = {"eager": Eager, "triton": Triton, "tensorrt": TensorRT}
# What auto tries, by device type. On CUDA the triton backend first: on an H200 its step took 336 ms against
# eager's 411 and diffusers' 369 (benchmarks/results/h200-2026-11-28-8fc0047). Elsewhere the reference path: on a
# CPU the kernels run only in the Triton interpreter, which is for tests.
AUTO_ORDER = MappingProxyType({"cuda": ("triton", "eager")})
AUTO_DEFAULT = ("eager",)


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return AUTO_ORDER.get(device.type, AUTO_DEFAULT)


def resolve(name: str, device, engines=None) -> Backend:
    """The backend called `name`, ready for `device`. `auto` runs the engines when given a folder of them, else
    takes the first backend in AUTO_ORDER for the device's type that can run there."""
    device = torch.device(device)
    if name == "auto" and engines is not None:
        return TensorRT(device)
    if name == "auto":
        return _first_of(_auto_order(device), device, [], None, f"runs on {device}")
    if name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(['auto', *REGISTRY])}")
    return REGISTRY[name](device)


def checked(backend: Backend, request: LoadRequest, auto: bool) -> Backend:
    """backend.check(request). For `auto`, a refusal (e.g. a head dim the kernels lack) moves on to the next backend
    of the order that can run here and accepts the request; each reason is kept in `passed_over`, and on a GPU,
    where that costs speed, given in a RuntimeWarning."""
    try:
        backend.check(request)
    except BackendUnavailable as err:
        if not auto:
            raise
        order = _auto_order(backend.device)
        rest = order[order.index(backend.name) + 1 :] if backend.name in order else ()
        reasons = [*backend.passed_over, str(err)]
        backend = _first_of(rest, backend.device, reasons, request, "runs this model here")
    if auto and backend.passed_over and backend.device.type == "cuda":
        warnings.warn(
            f"backend 'auto' runs {backend.name!r} on this GPU, not a faster one: {'; '.join(backend.passed_over)}",
            RuntimeWarning,
            stacklevel=3,
        )
    return backend


def _first_of(candidates, device, reasons: list[str], request: LoadRequest | None, what: str) -> Backend:
    """The first candidate that can run on `device` (and accepts `request`, if given), with the reasons for every
    one passed over, these included, in its `passed_over`."""
    for candidate in candidates:
        try:
            backend = REGISTRY[candidate](device)
            if request is not None:
                backend.check(request)
        except BackendUnavailable as e:
            reasons.append(str(e))
            continue
        backend.passed_over = tuple(reasons)
        return backend
    raise BackendUnavailable(f"backend 'auto' found none that {what}: {'; '.join(reasons)}")


def _lora_path(item) -> Path:
    """A loras= entry is a path or (path, strength)."""
    if isinstance(item, (str, Path)):
        return Path(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, Path)):
        return Path(item[0])
    raise InputError(f"each LoRA is a path or (path, strength), got {item!r}")


def _prepare(transformer, ops: Ops, req: LoadRequest, device, amax=None, park=None) -> LoRAStack:
    """LoRAs fused, then FP8 quantization (each linear moved to `device` first, each block to `park` after, when
    given), then regional compile: the order each needs."""
    from kontext_rt.model import fp8_linear as fp8

    optimize = req.optimize
    stack = LoRAStack(transformer)
    for item in req.loras:
        stack.load(_lora_path(item), 1.0 if isinstance(item, (str, Path)) else item[1])
    if optimize.fp8 is not None:
        fp8.convert(transformer, ops.quantize_rows, amax, fp8.matmul_for(device), device=device, park=park)
        stack.forget_originals()  # unloading is refused on FP8 pipelines
    if optimize.compile:
        backend = "inductor" if optimize.compile is True else optimize.compile
        for block in (*transformer.double_blocks, *transformer.single_blocks):
            block.compile(backend=backend, fullgraph=True, dynamic=False)
    return stack
