"""TensorRT engines on a GPU: build fp16 and fp8 engines for a full-width, reduced-depth transformer, check them
against PyTorch, and time one transformer step per precision against the eager bf16 model, in the same run.

    python benchmarks/gpu/tensorrt_gpu.py          # writes benchmarks/results/<device>-tensorrt-<date>/tensorrt.json

The first thing it records is whether TensorRT is importable (and its version); without TensorRT or a GPU it
writes that finding and exits 0, so a GPU session always leaves a record. Shapes: the Kontext edit layout at
1024x1024 (512 text + 4096 target + 4096 context tokens), batch 1; width 3072, 2 double + 2 single blocks
(depth only scales the time, the per-block work is the full model's). Timing: CUDA events, warmed up, median.
Checks (before timing): fp16 engine vs the eager fp32 model, bound 2x the eager fp16 model's own error + 1 ulp;
fp8 engine vs the ModelOpt fake-quant model in bf16, reported (TensorRT's FP8 GEMMs round differently).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))  # the timer and the results' run folders, by plain name
import run_folder  # noqa: E402
from timing import time_ms  # noqa: E402

KONTEXT = {"txt": 512, "grids": [(64, 64), (64, 64)]}


def tensorrt_status() -> dict:
    try:
        import tensorrt
    except ImportError as err:
        return {"importable": False, "error": str(err)}
    return {"importable": True, "version": tensorrt.__version__}


def _inputs(cfg, dtype, device):
    import torch

    from kontext_rt.model.rope import rope_table, sequence_ids

    gen = torch.Generator().manual_seed(0)
    n = sum(r * c for r, c in KONTEXT["grids"])
    cos, sin = rope_table(sequence_ids(KONTEXT["txt"], KONTEXT["grids"]), cfg.axes_dim, cfg.theta)
    x = {
        "img": torch.randn(1, n, cfg.in_channels, generator=gen),
        "txt": torch.randn(1, KONTEXT["txt"], cfg.context_in_dim, generator=gen),
        "pooled": torch.randn(1, cfg.vec_in_dim, generator=gen),
        "timesteps": torch.tensor([0.7]),
        "guidance": torch.tensor([2.5]),
        "cos": cos,
        "sin": sin,
    }
    return {k: v.to(device, dtype if k in ("img", "txt", "pooled") else torch.float32) for k, v in x.items()}


def _time_ms(fn) -> float:
    return time_ms(fn, "cuda", warmup=3, reps=15)


def _engine(model, precision, dtype, folder: Path, spec):
    from kontext_rt.backends.manifest import Manifest
    from kontext_rt.backends.tensorrt import Engine
    from kontext_rt.export.engine_build import build_engine, gpu_name, tensorrt_version
    from kontext_rt.export.onnx_export import export_onnx, transformer_graph

    onnx = export_onnx(
        transformer_graph(model),
        spec,
        folder / precision / "transformer.onnx",
        dtype,
        "torchscript" if precision == "fp8" else "dynamo",
    )
    plan = folder / precision / "transformer.plan"
    facts = build_engine(onnx, plan, spec, folder / "timing.cache")
    manifest = Manifest(
        "engine", "transformer", precision, "bench", tools={"tensorrt": tensorrt_version()}, gpu=gpu_name()
    )
    return Engine(plan, manifest, model.img_in.weight.device, "bench"), facts


def run(depth: int, single: int) -> dict:
    import torch

    from kontext_rt.config import PRESETS
    from kontext_rt.export import fp8, specs
    from kontext_rt.model.transformer import FluxTransformer

    cfg = dataclasses.replace(PRESETS["flux-kontext-dev"], depth=depth, depth_single_blocks=single)
    spec = specs.transformer_spec(cfg, text_tokens=512)
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = FluxTransformer(cfg).eval().requires_grad_(False)

    def eager(m, x):
        return m(x["img"], None, x["txt"], x["pooled"], x["timesteps"], x["guidance"], x["cos"], x["sin"])

    models = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        with torch.device("cuda"):
            m = FluxTransformer(cfg).eval().requires_grad_(False)
        m.load_state_dict(ref.state_dict())
        models[name] = m.to(dtype)
    out = {
        "config": {"hidden_size": cfg.hidden_size, "depth": depth, "depth_single_blocks": single, "tokens": KONTEXT},
        "checks": {},
        "ms_per_step": {},
        "builds": {},
    }
    with torch.no_grad():
        truth = eager(models["fp32"], _inputs(cfg, torch.float32, "cuda")).double()

        def err(v):
            return float((v.double() - truth).abs().max() / truth.abs().max())

        x16, x_bf = _inputs(cfg, torch.float16, "cuda"), _inputs(cfg, torch.bfloat16, "cuda")
        out["ms_per_step"]["eager_bf16"] = _time_ms(lambda: eager(models["bf16"], x_bf))
        with tempfile.TemporaryDirectory() as d:
            engine16, out["builds"]["fp16"] = _engine(models["fp16"], "fp16", torch.float16, Path(d), spec)
            e16, t16 = err(engine16(**x16)["velocity"]), err(eager(models["fp16"], x16))
            out["checks"]["fp16"] = {"engine_err": e16, "torch_fp16_err": t16, "ok": e16 <= 2 * t16 + 2**-10}
            out["ms_per_step"]["tensorrt_fp16"] = _time_ms(lambda: engine16(**x16))
            q = models["bf16"]
            fp8.quantize(q, lambda m: eager(m, x_bf))
            fake = eager(q, x_bf).double()
            engine8, out["builds"]["fp8"] = _engine(q, "fp8", torch.bfloat16, Path(d), spec)
            v8 = engine8(**x_bf)["velocity"].double()
            out["checks"]["fp8"] = {
                "engine_vs_fake_quant": float((v8 - fake).abs().max() / fake.abs().max()),
                "engine_vs_fp32": err(v8),
                "fake_quant_vs_fp32": err(fake),
            }
            out["ms_per_step"]["tensorrt_fp8"] = _time_ms(lambda: engine8(**x_bf))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.out is not None:
        run_folder.check_out(args.out)
    started = run_folder.now_utc()
    import torch

    record = {
        "date": datetime.date.today().isoformat(),
        "tensorrt": tensorrt_status(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
    }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    record["device"] = device
    if record["tensorrt"]["importable"] and record["cuda"]:
        record.update(run(args.depth, args.single))
    else:
        record["skipped"] = "needs TensorRT and a CUDA GPU; recorded what was found"
    out = args.out or run_folder.default_path(device, "tensorrt", "tensorrt.json", record["date"])
    out.parent.mkdir(parents=True, exist_ok=True)
    run_folder.write_json(out, record)
    what = "TensorRT engines (fp16, fp8) of a full-width 2+2 block transformer against eager bf16 (gpu/tensorrt_gpu.py)"
    run_folder.record(out, what, run_folder.host(device=device, torch=torch.__version__), started, __file__, argv)
    print(json.dumps(record, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
