"""The tensorrt backend: TensorRT engines built by `kontext-rt export`, run on torch CUDA tensors.

Loading only loads: every engine's manifest is checked against the checkpoint before TensorRT is even imported,
and a missing or stale engine is an error naming the export command; nothing is ever built here. At run time inputs
are bound by their device pointers (no host copies), on torch's current CUDA stream; each optimization profile has
its own execution context, whose output buffers are reallocated only when the input shapes change.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from kontext_rt.backends import graph_io as io
from kontext_rt.backends.attention import refuse_fa3
from kontext_rt.backends.base import Accepted, Backend, Loaded, LoadRequest
from kontext_rt.backends.manifest import GRAPHS, Manifest, Precision, engine_folder, export_command
from kontext_rt.errors import BackendUnavailable, EngineError, InputError
from kontext_rt.placement import Placement
from kontext_rt.sampling import denoisers


def locate(engines, checkpoint, precision: Precision | str | None = None) -> Path:
    """The engine folder: `engines` itself if it holds engines, else its single (or the named) trt-<precision>/."""
    root = Path(engines)
    if (root / "transformer.json").is_file():
        return root
    found = [p for p in Precision if (engine_folder(root, p) / "transformer.json").is_file()]
    if precision is not None:
        if precision not in found:
            raise EngineError(
                f"{root}: no {precision} engines; build them with: {export_command(checkpoint, root, precision)}"
            )
        return engine_folder(root, precision)
    if len(found) == 1:
        return engine_folder(root, found[0])
    if not found:
        raise EngineError(
            f"{root}: no TensorRT engines here; build them with: {export_command(checkpoint, root, 'fp8|fp16|bf16')}"
        )
    raise EngineError(
        f"{root}: engines for {', '.join(found)}: pick one with engine_precision= (or pass "
        f"{engine_folder(root, found[0])})"
    )


def check_engines(folder: Path, fingerprint: str, checkpoint) -> dict[str, Manifest]:
    """Every graph's manifest and plan, checked against the checkpoint: {graph: manifest}."""
    folder = Path(folder)
    out = {}
    for graph in GRAPHS:
        m = Manifest.read(folder / f"{graph}.json")
        precision = m.precision if m else folder.name.removeprefix("trt-")
        rebuild = f"rebuild with: {export_command(checkpoint, folder.parent, precision)}"
        if m is None or m.stage != "engine" or m.graph != graph:
            raise EngineError(
                f"{folder}: no finished {graph} engine (manifest {graph}.json missing or unreadable); {rebuild}"
            )
        if m.checkpoint != fingerprint:
            raise EngineError(
                f"{folder / (graph + '.plan')}: stale: built from another checkpoint "
                f"({m.checkpoint}, this one is {fingerprint}); {rebuild}"
            )
        if bad := m.files_intact(folder):
            raise EngineError(f"{folder}: {', '.join(bad)} missing or changed since the build; {rebuild}")
        out[graph] = m
    return out


def pick_profile(ranges: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose (min, opt, max) range holds every input shape."""
    for p, profile in enumerate(ranges):
        if all(all(lo <= s <= hi for s, lo, hi in zip(shapes[n], r[0], r[2], strict=True)) for n, r in profile.items()):
            return p
    listed = "; ".join(", ".join(f"{n} {tuple(r[0])}..{tuple(r[2])}" for n, r in profile.items()) for profile in ranges)
    raise EngineError(
        f"input shapes {shapes} are outside every optimization profile of this engine ({listed}); "
        "export again with profiles that cover them"
    )


def _tensorrt():
    try:
        import tensorrt
    except ImportError as err:  # also the stub wheels whose import fails on a missing libnvinfer
        raise EngineError(f"TensorRT is not importable here ({err}); use backend='eager' or 'triton'") from err
    return tensorrt


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
        trt.uint8: torch.uint8,
    }
    return table[dt]


class Engine:
    """One deserialized engine; call it with torch CUDA tensors by input name, get {output name: tensor}."""

    def __init__(self, plan: Path, manifest: Manifest, device: torch.device, checkpoint):
        trt = _tensorrt()
        rebuild = export_command(checkpoint, Path(plan).parent.parent, manifest.precision)
        if manifest.tools.get("tensorrt") != trt.__version__:
            raise EngineError(
                f"{plan}: built with TensorRT {manifest.tools.get('tensorrt')}, this is "
                f"{trt.__version__}; rebuild with: {rebuild}"
            )
        gpu = torch.cuda.get_device_name(device)
        if manifest.gpu != gpu:
            raise EngineError(f"{plan}: built for {manifest.gpu}, this GPU is {gpu}; rebuild with: {rebuild}")
        self.trt, self.device = trt, device
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan}: TensorRT could not deserialize it; rebuild with: {rebuild}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.ranges = [
            {n: self.engine.get_tensor_profile_shape(n, p) for n in self.inputs}
            for p in range(self.engine.num_optimization_profiles)
        ]
        self._contexts, self._shapes, self._buffers = {}, {}, {}
        self._lock = threading.Lock()  # an execution context runs one call at a time

    def profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        return pick_profile(self.ranges, shapes)

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if set(inputs) != set(self.inputs):
            raise ValueError(f"engine inputs are {self.inputs}, got {sorted(inputs)}")
        args = {n: inputs[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        shapes = {n: tuple(t.shape) for n, t in args.items()}
        stream = torch.cuda.current_stream(self.device)
        with self._lock:
            p = self.profile_for(shapes)
            ctx = self._contexts.get(p)
            if ctx is None:
                ctx = self._contexts[p] = self.engine.create_execution_context()
                ctx.set_optimization_profile_async(p, stream.cuda_stream)
            if self._shapes.get(p) != shapes:  # new shapes: new output buffers, else reuse
                for n, s in shapes.items():
                    ctx.set_input_shape(n, s)
                self._buffers[p] = {
                    n: torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                    for n in self.outputs
                }
                for n, t in self._buffers[p].items():
                    ctx.set_tensor_address(n, t.data_ptr())
                self._shapes[p] = shapes
            for n, t in args.items():
                ctx.set_tensor_address(n, t.data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
            # a copy on the device: the buffers belong to the context and the next call overwrites them
            return {n: t.clone() for n, t in self._buffers[p].items()}


class TensorRTTransformer:
    """The Denoiser-shaped transformer: target and context tokens written into one persistent input buffer."""

    def __init__(self, engine: Engine, cfg):
        self.engine, self.cfg = engine, cfg
        self._img = None
        self._lock = threading.Lock()  # the input buffer is shared by calls

    def __call__(self, img, ctx, txt, pooled, timesteps, guidance, cos, sin, ops=None):
        with self._lock:
            return self._run(img, ctx, txt, pooled, timesteps, guidance, cos, sin)

    def _run(self, img, ctx, txt, pooled, timesteps, guidance, cos, sin):
        n = img.shape[1]
        total = n + (0 if ctx is None else ctx.shape[1])
        shape, dtype = (img.shape[0], total, img.shape[2]), self.engine.dtypes[io.IMG]
        if self._img is None or tuple(self._img.shape) != shape:
            self._img = torch.empty(shape, dtype=dtype, device=self.engine.device)
        self._img[:, :n].copy_(img)
        if ctx is not None:
            self._img[:, n:].copy_(ctx)
        inputs = {io.IMG: self._img, io.TXT: txt, io.POOLED: pooled, io.TIMESTEPS: timesteps, io.COS: cos, io.SIN: sin}
        if io.GUIDANCE in self.engine.inputs:
            inputs[io.GUIDANCE] = guidance
        return self.engine(**inputs)[io.VELOCITY][:, :n]


class TensorRTVAE:
    """encode/decode as the AutoEncoder does them, by the two VAE engines."""

    def __init__(self, encoder: Engine, decoder: Engine, cfg):
        self.encoder, self.decoder, self.cfg = encoder, decoder, cfg

    def encode(self, x):
        return self.encoder(**{io.IMAGE: x})[io.LATENT]

    def decode(self, z):
        return self.decoder(**{io.LATENT: z})[io.IMAGE]


def open_engines(engines, fingerprint: str, checkpoint, device, cfg, vae_cfg, precision=None):
    """(TensorRTTransformer, TensorRTVAE) from an engine folder, after every check that needs no TensorRT."""
    folder = locate(engines, checkpoint, precision)
    manifests = check_engines(folder, fingerprint, checkpoint)
    loaded = {g: Engine(folder / f"{g}.plan", m, device, checkpoint) for g, m in manifests.items()}
    return (
        TensorRTTransformer(loaded["transformer"], cfg),
        TensorRTVAE(loaded["vae_encoder"], loaded["vae_decoder"], vae_cfg),
    )


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

    def check(self, req: LoadRequest) -> Accepted:
        optimize = req.optimize
        if req.engines is None:
            raise InputError("backend='tensorrt' needs engines=DIR, the folder `kontext-rt export --out DIR` wrote")
        if optimize.cuda_graphs or optimize.fp8 or optimize.compile:
            raise InputError(
                "backend='tensorrt' runs engines: cuda_graphs, fp8 and compile apply to the eager and "
                "triton backends (engines get FP8 from `kontext-rt export --precision fp8`)"
            )
        refuse_fa3(optimize, self.name)
        if req.placement != Placement():
            raise InputError("backend='tensorrt' runs engines, which stay resident: placement applies to eager/triton")
        if req.loras:
            raise InputError(
                "backend='tensorrt' runs engines, which take no LoRAs: fuse a LoRA into the "
                "checkpoint's weights before exporting it, or use the eager or triton backend"
            )

    def load(self, accepted: Accepted) -> Loaded:
        req = accepted.request
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
        return Loaded(denoisers.PerStep(transformer, transformer.engine.dtypes[io.IMG]), vae)
