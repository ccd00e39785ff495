"""Peak host memory of the ONNX export against the weights' size, on a full-width, reduced-depth transformer.

    python benchmarks/e2e/export_memory.py                  # width 3072, 2 double + 2 single blocks: a run folder
    python benchmarks/e2e/export_memory.py --smoke --out F  # tiny, for CI: checks the script runs

Each case runs in its own process, so the kernel's peak-RSS counter (VmHWM) covers that export alone:
    baseline   RSS after importing torch and the exporters, before the model exists
    weights    bytes of the module's state (what a checkpoint load puts in memory once)
    peak       VmHWM at the end, reset once the weights are in memory (so it is the export's own peak);
               ratio = (peak - baseline) / weights
Random weights stand in for a checkpoint load: both leave exactly one copy of the weights in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the timer, the run folders, by name
import run_folder  # noqa: E402
from timing import timed  # noqa: E402

CASES = {"fp16-dynamo": ("float16", "dynamo"), "bf16-fp8-torchscript": ("bfloat16", "torchscript")}


def _rss_mib() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak():
    """Reset VmHWM to the current RSS (Linux: 5 > /proc/self/clear_refs); harmless where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure(case: str, smoke: bool, folder: Path) -> dict:
    """One export in this process (run by the parent as a child)."""
    import torch

    from kontext_rt.config import PRESETS
    from kontext_rt.export import specs
    from kontext_rt.export.onnx_export import example_inputs, export_onnx, transformer_graph, weight_bytes
    from kontext_rt.model.transformer import FluxTransformer

    dtype_name, exporter = CASES[case]
    dtype = getattr(torch, dtype_name)
    base_cfg = PRESETS["tiny" if smoke else "flux-kontext-dev"]
    cfg = dataclasses.replace(base_cfg, depth=2, depth_single_blocks=2)
    spec = specs.transformer_spec(cfg, text_tokens=8)
    if exporter == "torchscript":
        import modelopt.torch.quantization  # noqa: F401  (imported before the baseline, like the exporters)
    baseline, _ = _rss_mib()
    with torch.device("meta"):
        model = FluxTransformer(cfg)
    model = model.to_empty(device="cpu").to(dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.02)
    weights = weight_bytes(model)
    loaded, _ = _rss_mib()
    _reset_peak()  # the peak from here on is the export's
    if exporter == "torchscript":  # the FP8 path: quantizers calibrated on one example batch, then exported
        from kontext_rt.export import fp8

        fp8.quantize(model, lambda m: transformer_graph(m)(*example_inputs(spec, dtype, "cpu")))
    path, sample = timed(
        lambda: export_onnx(transformer_graph(model), spec, folder / "transformer.onnx", dtype, exporter)
    )
    seconds = sample.wall_ms / 1e3
    _, peak = _rss_mib()
    data = path.with_name(path.name + ".data")
    return {
        "case": case,
        "hidden_size": cfg.hidden_size,
        "depth": cfg.depth,
        "depth_single_blocks": cfg.depth_single_blocks,
        "dtype": dtype_name,
        "exporter": exporter,
        "weights_mib": round(weights / 2**20, 1),
        "baseline_rss_mib": round(baseline, 1),
        "after_load_rss_mib": round(loaded, 1),
        "peak_rss_mib": round(peak, 1),
        "ratio_peak_over_weights": round((peak - baseline) / (weights / 2**20), 3),
        "onnx_mib": round(path.stat().st_size / 2**20, 2),
        "external_data_mib": round(data.stat().st_size / 2**20, 1) if data.exists() else 0.0,
        "export_seconds": round(seconds, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model (checks the script, measures nothing useful)")
    ap.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/cpu-<arch>-export-memory-<date>/)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(measure(args.child, args.smoke, Path(d))))
        return 0
    host = f"cpu-{platform.machine()}"
    if args.smoke and (args.out is None or run_folder.in_results(args.out)):
        raise SystemExit("--smoke measures a tiny model: give --out outside benchmarks/results (real measurements)")
    out = run_folder.check_out(args.out or run_folder.default_path(host, "export-memory", "export-memory.json"))
    started = run_folder.now_utc()
    results = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case] + (["--smoke"] if args.smoke else [])
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            sys.stderr.write(run.stderr[-4000:])
            return run.returncode
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"host": host, "torch": torch.__version__, "smoke": args.smoke, "results": results}, indent=1) + "\n"
    )
    what = "peak host memory of the ONNX export against the weights' size (benchmarks/e2e/export_memory.py)"
    run_folder.record(out, what, run_folder.host(torch=torch.__version__), started, __file__, argv)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
