"""`kontext-rt export`: the stages from a checkpoint to engines, each resumable.

    onnx vae_encoder -> onnx vae_decoder -> [fp8: calibration] -> onnx transformer -> engine x3 (unless --onnx-only)

A stage is skipped when the manifest beside its output matches what it would make now (same checkpoint
fingerprint, precision, I/O contract and profiles, tool versions, GPU) and its files are intact; otherwise it is
redone and its manifest written last. Layout of --out DIR:

    DIR/onnx-<precision>/{transformer,vae_encoder,vae_decoder}.onnx (+ .onnx.data past 2 GB) and .json
    DIR/calibration/fp8.safetensors, fp8.json                   (fp8 only)
    DIR/trt-<precision>/{transformer,vae_encoder,vae_decoder}.plan and .json, timing.cache
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from kontext_rt.backends.manifest import Manifest, Precision, engine_folder, file_sizes, onnx_folder
from kontext_rt.export import specs
from kontext_rt.export.fp8 import CalibrationSet
from kontext_rt.weights.formats import detect

# A checkpoint whose shapes leave the variant open (a BFL file of FLUX.1 [dev] shapes) is exported as Kontext:
# calibration runs edits, and FLUX.1 [dev] and Kontext [dev] have the same graphs and text length (the same engines).
EXPORT_VARIANT = "flux-kontext-dev"
# The dtype of each precision's graphs: fp8 keeps bf16 around its FP8 GEMMs, and its VAE in bf16.
GRAPH_DTYPE = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16, Precision.FP8: torch.bfloat16}


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path
    out: Path
    precision: Precision | str  # a string is read as its Precision (Export refuses others)
    onnx_only: bool = False
    device: str = "cpu"
    ae: Path | None = None
    text_encoders: Path | None = None
    max_batch: int = 1
    calibration: CalibrationSet = field(default_factory=CalibrationSet)
    workspace_gib: float | None = None
    variant: str | None = None  # a name in config.VARIANTS; None: the checkpoint's, else flux-kontext-dev


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


class Export:
    """One export run; `run()` goes through the stages and reports each through `log(line)`."""

    def __init__(self, opts: ExportOptions, log: Callable[[str], None] = lambda line: None):
        self.opts, self.log = opts, log
        self.precision = Precision.parse(opts.precision)
        self.checkpoint = detect(opts.checkpoint, ae=opts.ae, text_encoders=opts.text_encoders)
        self.fingerprint = self.checkpoint.fingerprint()
        self.cfg, self.vae_cfg = self.checkpoint.transformer_config(), self.checkpoint.vae_config()
        self.variant = self.checkpoint.variant(opts.variant, if_ambiguous=EXPORT_VARIANT)
        text_tokens = self.variant.max_sequence_length
        self.specs = {
            "transformer": specs.transformer_spec(self.cfg, text_tokens, opts.max_batch),
            "vae_encoder": specs.vae_encoder_spec(self.vae_cfg, opts.max_batch),
            "vae_decoder": specs.vae_decoder_spec(self.vae_cfg, opts.max_batch),
        }
        self.dtype = GRAPH_DTYPE[self.precision]
        self._quantized = None  # the calibrated transformer, when calibration ran in this process

    def stages(self) -> list[tuple[str, str]]:
        out = [("onnx", "vae_encoder"), ("onnx", "vae_decoder")]
        if self.precision is Precision.FP8:
            out.append(("calibration", "fp8"))
        out.append(("onnx", "transformer"))
        if not self.opts.onnx_only:
            out += [("engine", g) for g in ("vae_encoder", "vae_decoder", "transformer")]
        return out

    def run(self) -> None:
        """Run every stage, reusing those already finished."""
        if not self.opts.onnx_only:
            from kontext_rt.export.engine_build import require_tensorrt

            require_tensorrt()  # before hours of calibration, not after
        stages = self.stages()
        for i, (stage, graph) in enumerate(stages, 1):
            label = f"[{i}/{len(stages)}] {stage} {graph}"
            want, folder = self._manifest(stage, graph), self._folder(stage)
            have = Manifest.read(folder / f"{graph}.json")
            if have is not None and have.identity() == want.identity() and not have.files_intact(folder):
                self.log(f"{label}: up to date, reused")
                continue
            self.log(f"{label}: ...")
            t0 = time.perf_counter()
            files, info = self._make(stage, graph, folder)
            info["seconds"] = round(time.perf_counter() - t0, 1)
            Manifest(**{**want.__dict__, "files": file_sizes(*files), "info": info}).write(folder / f"{graph}.json")
            self.log(f"{label}: done in {info['seconds']} s -> {files[0]}")

    # ---- per stage ------------------------------------------------------------------------------------------------

    def _folder(self, stage: str) -> Path:
        out, p = Path(self.opts.out), self.precision
        return {"onnx": onnx_folder(out, p), "calibration": out / "calibration", "engine": engine_folder(out, p)}[stage]

    def _manifest(self, stage: str, graph: str) -> Manifest:
        tools = {"kontext-rt": _version("kontext-rt"), "torch": torch.__version__, "onnx": _version("onnx")}
        if self.precision is Precision.FP8:
            tools["modelopt"] = _version("nvidia-modelopt")
        gpu = None
        if stage == "engine":
            from kontext_rt.export.engine_build import gpu_name, tensorrt_version

            tools["tensorrt"], gpu = tensorrt_version(), gpu_name()
        io = self.specs[graph].to_json(self.dtype) if graph in self.specs else {}
        if self.precision is Precision.FP8 and graph in ("transformer", "fp8"):
            # the FP8 graph and its engine carry the calibration's scales: other calibration data, other artifacts
            io["calibration"] = self.opts.calibration.describe()
        return Manifest(stage, graph, self.precision.value, self.fingerprint, io, tools, gpu)

    def _make(self, stage: str, graph: str, folder: Path) -> tuple[list[Path], dict]:
        if stage == "calibration":
            return self._calibrate(folder)
        if stage == "engine":
            from kontext_rt.export.engine_build import build_engine

            plan = folder / f"{graph}.plan"
            folder.mkdir(parents=True, exist_ok=True)
            info = build_engine(
                self._folder("onnx") / f"{graph}.onnx",
                plan,
                self.specs[graph],
                folder / "timing.cache",
                self.opts.workspace_gib,
            )
            return [plan], info
        return self._export_onnx(graph, folder), {}

    def _export_onnx(self, graph: str, folder: Path) -> list[Path]:
        from kontext_rt.export.onnx_export import VAEDecoderGraph, VAEEncoderGraph, export_onnx, transformer_graph
        from kontext_rt.export.trt_ops import check_parsable

        path, spec = folder / f"{graph}.onnx", self.specs[graph]
        if graph == "transformer":
            module = transformer_graph(self._transformer())
            exporter = "torchscript" if self.precision is Precision.FP8 else "dynamo"
        else:
            vae = self.checkpoint.load_vae(self.dtype, self.opts.device)
            module, exporter = (VAEEncoderGraph if graph == "vae_encoder" else VAEDecoderGraph)(vae), "dynamo"
        export_onnx(module, spec, path, self.dtype, exporter)
        check_parsable(path)
        return [path, path.with_name(path.name + ".data")]

    def _transformer(self):
        if self.precision is not Precision.FP8:
            return self.checkpoint.load_transformer(self.dtype, self.opts.device)
        if self._quantized is not None:
            return self._quantized
        from kontext_rt.export.fp8 import restore_calibration

        model = self.checkpoint.load_transformer(self.dtype, self.opts.device)
        return restore_calibration(model, self._folder("calibration") / "fp8.safetensors", self.fingerprint)

    def _calibrate(self, folder: Path) -> tuple[list[Path], dict]:
        from kontext_rt import Pipeline
        from kontext_rt.export.fp8 import calibration_loop, quantize, save_calibration

        pipe = Pipeline.from_pretrained(
            self.opts.checkpoint,
            device=self.opts.device,
            dtype=self.dtype,
            backend="eager",  # the modules the ONNX export traces, with their own ops
            ae=self.opts.ae,
            text_encoders=self.opts.text_encoders,
            variant=self.variant.name,
        )
        quantize(pipe.transformer, calibration_loop(pipe, self.opts.calibration, self.log))
        self._quantized = pipe.transformer
        path = save_calibration(pipe.transformer, folder / "fp8.safetensors", self.fingerprint)
        return [path], {"data": self.opts.calibration.describe()}
