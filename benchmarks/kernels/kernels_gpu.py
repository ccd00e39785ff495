"""One call on a GPU machine: check the Triton kernels at FLUX.1 shapes, time them against their baselines, and
write benchmarks/results/<device>-kernels-<date>/kernels.json (with the run folder's manifest.json).

    pip install --no-deps -e .          # if kontext_rt is not installed yet
    python benchmarks/kernels/kernels_gpu.py [--out PATH] [--reps 30]
    python benchmarks/kernels/kernels_gpu.py --smoke --out /tmp/smoke.json   # CPU + Triton interpreter, tiny shapes

Attention (B=1, H=24, D=128, bf16, L = 4608 / 8704 / 12800): the fused kernel (QK norm + RoPE on load), the
two-kernel variant (norm+RoPE pass, then plain flash attention), and torch SDPA with each of its flash / cuDNN /
efficient backends, alone and with norm + RoPE done separately (torch ops, as the eager backend does, or the
Triton norm+RoPE kernel). TFLOP/s = 4 * B * H * L^2 * D / time, the attention FLOPs only, so a variant that
also spends time on RoPE shows it as a lower rate. The norm+RoPE and modulation kernels are reported in GB/s
against the device-to-device copy rate measured in the same run (their memory floor), and so is the attention
pre-pass (QK norm + RoPE + FA3's layout, plain bf16 and with per-head FP8 quantization, with and without k
smoothing) against the same work in torch ops, the FP8 activation quantizer, and the fused GELU + cat + FP8
quantizer of a single block's linear2 input (R = 8704 tokens, A = 3072, M = 12288) against gelu + cat +
quantize_rows.

Every timed kernel is first checked against the float32 reference: its error may be at most twice that of the
eager bf16 path, plus one bf16 ulp (tests/kernel_inputs.py's rule). --smoke runs the whole script on the CPU
to check that it works; its timings are the interpreter's and say nothing about kernel speed, and it refuses
to write into benchmarks/results.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/kernels/
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the kernel cases, the timer and the results' run folders, by name
import run_folder  # noqa: E402
from run_folder import RESULTS  # noqa: E402

GOAL_TFLOPS = 400.0  # the bar for the fused kernel at L=8704 on an H100


def _error_bound(out, truth, eager):
    import torch

    err = (out.float() - truth).abs().max().item()
    eager_err = (eager.float() - truth).abs().max().item()
    bound = 2 * eager_err + torch.finfo(out.dtype).eps * truth.abs().max().item()
    return {"max_error": err, "eager_max_error": eager_err, "bound": bound, "ok": bool(err <= bound)}


def _timed(fn, device, reps, flops=None, nbytes=None, copy_gbs=None):
    from timing import time_ms

    try:
        ms = time_ms(fn, device, warmup=max(2, reps // 5), reps=reps)
    except Exception as err:  # e.g. an SDPA backend this GPU or build lacks
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    row = {"ms": ms}
    if flops is not None:
        row["tflops"] = flops / (ms * 1e-3) / 1e12
    if nbytes is not None:
        row["gbs"] = nbytes / (ms * 1e-3) / 1e9
        row["fraction_of_copy_rate"] = row["gbs"] / copy_gbs
    return row


BACKEND_ROW = "triton norm+rope, sdpa default (the triton backend's attention)"


def attention_case(length, shape, device, reps):
    """One sequence length: check both Triton variants against the float32 reference, then time every row."""
    from kontext_rt.kernels import ops, reference
    from kontext_rt.kernels.qk_norm_rope import qk_norm_rope
    from kontext_rt.kernels.rope_attention import _rope_attention_tuned, rope_attention

    import kernel_cases as cases

    args = cases.attention_inputs(length, device, heads=shape["heads"], head_dim=shape["head_dim"], text=shape["text"])
    q, k, v, qs, ks, split, cos, sin = args
    flops = cases.attention_flops(1, shape["heads"], length, shape["head_dim"])
    truth = reference.rope_attention(
        q.float(), k.float(), v.float(), [s.float() for s in qs], [s.float() for s in ks], split, cos, sin
    )
    eager = reference.rope_attention(*args)
    checks = {
        "triton-fused": _error_bound(ops.attention(*args), truth, eager),
        "triton-prerotated": _error_bound(ops.attention_prerotated(*args), truth, eager),
        BACKEND_ROW: _error_bound(ops.attention_sdpa(*args), truth, eager),
    }
    del truth
    qr, kr = qk_norm_rope(q, k, qs, ks, split, cos, sin)  # rotated once, for the attention-only rows
    calls = {
        "triton-fused": lambda: ops.attention(*args),
        "triton-prerotated": lambda: ops.attention_prerotated(*args),
        BACKEND_ROW: lambda: ops.attention_sdpa(*args),
        "triton-attention-only": lambda: rope_attention(qr, kr, v, norm=False, rope=False),
        "eager (torch norm+rope, sdpa default)": lambda: cases.eager_attention(*args),
    }
    for name, backend in cases.sdpa_backends().items():
        calls[f"sdpa-{name}-attention-only"] = lambda b=backend: cases.sdpa(qr, kr, v, b)
        calls[f"sdpa-{name} + torch norm+rope"] = lambda b=backend: cases.eager_attention(*args, backend=b)
        calls[f"sdpa-{name} + triton norm+rope"] = lambda b=backend: cases.sdpa(
            *qk_norm_rope(q, k, qs, ks, split, cos, sin), v, b
        )
    rows = {name: _timed(call, device, reps, flops) for name, call in calls.items()}
    tuned = getattr(_rope_attention_tuned, "best_config", None) if device == "cuda" else None
    return {
        "length": length,
        "checks": checks,
        "timings": rows,
        "autotuned_config_last_call": str(tuned) if tuned else None,
    }


def norm_rope_case(length, shape, device, reps, copy_gbs):
    from kontext_rt.kernels import reference
    from kontext_rt.kernels.qk_norm_rope import qk_norm_rope

    import kernel_cases as cases

    q, k, _, qs, ks, split, cos, sin = cases.attention_inputs(
        length, device, heads=shape["heads"], head_dim=shape["head_dim"], text=shape["text"]
    )
    nbytes = cases.norm_rope_bytes(q, cos)
    truth = reference.qk_norm_rope(
        q.float(), k.float(), [s.float() for s in qs], [s.float() for s in ks], split, cos, sin
    )
    eager = reference.qk_norm_rope(q, k, qs, ks, split, cos, sin)
    got = qk_norm_rope(q, k, qs, ks, split, cos, sin)
    calls = {
        "triton": lambda: qk_norm_rope(q, k, qs, ks, split, cos, sin),
        "eager": lambda: reference.qk_norm_rope(q, k, qs, ks, split, cos, sin),
    }
    return {
        "length": length,
        "bytes": nbytes,
        "checks": {n: _error_bound(g, t, e) for n, g, t, e in zip("qk", got, truth, eager, strict=True)},
        "timings": {n: _timed(c, device, reps, nbytes=nbytes, copy_gbs=copy_gbs) for n, c in calls.items()},
    }


def norm_rope_section(shape, device, reps, copy_gbs):
    return {name: norm_rope_case(length, shape, device, reps, copy_gbs) for name, length in shape["lengths"].items()}


PREPASS_MODES = {"bf16": {}, "fp8": {"fp8": True}, "fp8+smooth_k": {"fp8": True, "smooth_k": True}}


def prepass_case(length, shape, device, reps, copy_gbs):
    """The attention pre-pass (kernels/prepass.py) in each mode against the same work in torch ops (reference.
    attention_prepass, bf16 on the device). GB/s over the floor of its traffic: one read of q, k, v and one write
    of each in the output dtype (the fp8 modes' second read, for the per-head statistics, counts against them).
    Checks: the bf16 mode's q and k against the float32 reference (the rule of the other kernels); the fp8 modes'
    e4m3 output equal to quantize_per_head of the kernel's own bf16 output, bit for bit (the kernel's contract)."""
    import torch

    from kontext_rt.kernels import reference
    from kontext_rt.kernels.prepass import attention_prepass

    import kernel_cases as cases

    q, k, v, qs, ks, split, cos, sin = cases.attention_inputs(
        length, device, heads=shape["heads"], head_dim=shape["head_dim"], text=shape["text"]
    )
    args = (q, k, v, qs, ks, split, cos, sin)
    plain = attention_prepass(*args)
    truth = reference.attention_prepass(q.float(), k.float(), v.float(), [t.float() for t in qs],
                                        [t.float() for t in ks], split, cos, sin)  # fmt: skip
    eager = reference.attention_prepass(*args)
    checks = {n: _error_bound(g, t, e) for n, g, t, e in zip("qk", plain[:2], truth[:2], eager[:2], strict=True)}
    for mode, kw in PREPASS_MODES.items():
        if not kw:
            continue
        got = attention_prepass(*args, **kw)
        base = attention_prepass(*args, smooth_k=kw.get("smooth_k", False))
        same = all(
            torch.equal(g.view(torch.uint8), reference.quantize_per_head(b)[0].view(torch.uint8))
            and torch.equal(d, reference.quantize_per_head(b)[1])
            for g, d, b in zip(got[:3], got[3:], base[:3], strict=True)
        )
        checks[mode] = {"equals_quantize_per_head_of_its_bf16_output": same, "ok": bool(same)}
    timings = {}
    for mode, kw in PREPASS_MODES.items():
        out_bytes = 1 if kw.get("fp8") else q.element_size()
        nbytes = 3 * q.numel() * (q.element_size() + out_bytes) + 2 * cos.numel() * cos.element_size()
        timings[f"triton {mode}"] = _timed(lambda kw=kw: attention_prepass(*args, **kw), device, reps,
                                           nbytes=nbytes, copy_gbs=copy_gbs)  # fmt: skip
        timings[f"eager {mode}"] = _timed(lambda kw=kw: reference.attention_prepass(*args, **kw), device, reps,
                                          nbytes=nbytes, copy_gbs=copy_gbs)  # fmt: skip
    return {"length": length, "checks": checks, "timings": timings}


def prepass_section(shape, device, reps, copy_gbs):
    return {name: prepass_case(length, shape, device, reps, copy_gbs) for name, length in shape["lengths"].items()}


def modulation_section(shape, device, reps, copy_gbs):
    from kontext_rt.kernels import modulation, reference

    import kernel_cases as cases

    length = shape["lengths"]["one-context"]
    x, y, shift, scale, gate = cases.rows_inputs(length, device, width=shape["width"])
    section = {}
    for name, fused, eager, args, passes in (
        ("modulate", modulation.modulate, reference.modulate, (x, shift, scale), 2),
        ("gated_residual", modulation.gated_residual, reference.gated_residual, (x, gate, y), 3),
    ):
        nbytes = passes * x.numel() * x.element_size()
        truth = eager(*(t.float() for t in args))
        section[name] = {
            "shape": list(x.shape),
            "bytes": nbytes,
            "checks": _error_bound(fused(*args), truth, eager(*args)),
            "timings": {
                "triton": _timed(lambda f=fused, a=args: f(*a), device, reps, nbytes=nbytes, copy_gbs=copy_gbs),
                "eager": _timed(lambda f=eager, a=args: f(*a), device, reps, nbytes=nbytes, copy_gbs=copy_gbs),
            },
        }
    return section


def fp8_quant_section(shape, device, reps, copy_gbs):
    """The FP8 activation quantizer on a block's linear inputs (width C and the MLP's 4C), against torch's: the
    values and scales must be equal bit for bit; bytes are one read of x and one write of q."""
    import torch

    from kontext_rt.kernels import fp8_quant
    from kontext_rt.model import fp8_linear

    length = shape["lengths"]["one-context"]
    gen = torch.Generator(device=device).manual_seed(0)
    section = {}
    for k in (shape["width"], 4 * shape["width"]):
        x = torch.randn(length, k, device=device, dtype=torch.bfloat16, generator=gen)
        (q, sq), (r, sr) = fp8_quant.quantize_rows(x), fp8_linear.quantize_rows(x)
        equal = bool(torch.equal(q.view(torch.uint8), r.view(torch.uint8)) and torch.equal(sq, sr))
        nbytes = x.numel() * (x.element_size() + 1)
        section[f"K={k}"] = {
            "shape": list(x.shape),
            "bytes": nbytes,
            "checks": {"ok": equal, "bit_for_bit": equal},
            "timings": {
                "triton": _timed(
                    lambda a=x: fp8_quant.quantize_rows(a), device, reps, nbytes=nbytes, copy_gbs=copy_gbs
                ),
                "eager": _timed(
                    lambda a=x: fp8_linear.quantize_rows(a), device, reps, nbytes=nbytes, copy_gbs=copy_gbs
                ),
            },
        }
    return section


def gelu_quant_section(shape, device, reps, copy_gbs):
    """The fused GELU(tanh) + cat + per-row e4m3 quantizer on a single block's linear2 input (R tokens, A = C,
    M = 4C) and a double block MLP's second linear input (A = 0), against the unfused paths: torch's
    gelu + cat + quantize_rows (the eager FP8 path) and gelu + cat + the Triton quantizer (the triton backend's
    today). Checks: within gelu_quant.error_bound of the eager composite (the contract); whether the bytes and
    scales are equal too is recorded (libdevice's tanhf is CUDA's, so equal bits are expected but not claimed).
    GB/s over the fused kernel's floor: one read of attn and mlp_in, one write of the e4m3 bytes and the scales.
    The unfused paths also write the bf16 GELU, copy it and attn into the cat and read the cat back (at least
    8 more bytes per GELU element, 4 per attn element; benchmarks/results/cpu-op-traffic-2026-12-07).
    """
    import torch

    from kontext_rt.kernels import fp8_quant, gelu_quant, reference

    length = shape["lengths"]["one-context"]
    gen = torch.Generator(device=device).manual_seed(0)
    section = {}
    for a_width, m_width in ((shape["width"], 4 * shape["width"]), (0, 4 * shape["width"])):
        attn = torch.randn(length, a_width, device=device, dtype=torch.bfloat16, generator=gen) if a_width else None
        mlp_in = 3 * torch.randn(length, m_width, device=device, dtype=torch.bfloat16, generator=gen)
        (q, sq), (r, sr) = gelu_quant.gelu_quantize_rows(attn, mlp_in), reference.gelu_quantize_rows(attn, mlp_in)
        err = (q.double() * sq.double() - r.double() * sr.double()).abs()
        within = bool((err <= gelu_quant.error_bound(attn, mlp_in, sq, sr)).all())
        differ = int((q.view(torch.uint8) != r.view(torch.uint8)).sum())
        nbytes = length * (a_width + m_width) * (2 + 1) + length * 4

        def triton_unfused(a=attn, m=mlp_in):
            h = torch.nn.functional.gelu(m, approximate="tanh")
            return fp8_quant.quantize_rows(h if a is None else torch.cat((a, h), -1))

        section[f"A={a_width} M={m_width}"] = {
            "shape": [length, a_width, m_width],
            "bytes": nbytes,
            "checks": {
                "ok": within,
                "within_error_bound": within,
                "bit_for_bit": bool(differ == 0 and torch.equal(sq, sr)),
                "bytes_differing": differ,
                "scales_differing": int((sq != sr).sum()),
            },
            "timings": {
                name: _timed(fn, device, reps, nbytes=nbytes, copy_gbs=copy_gbs)
                for name, fn in (
                    ("triton", lambda a=attn, m=mlp_in: gelu_quant.gelu_quantize_rows(a, m)),
                    ("gelu+cat+triton quantize_rows", triton_unfused),
                    ("eager", lambda a=attn, m=mlp_in: reference.gelu_quantize_rows(a, m)),
                )
            },
        }
        if device == "cuda":
            torch.cuda.empty_cache()
    return section


def goals(attention):
    """The issue's bar at L=8704: the fused kernel no slower than SDPA + separate RoPE, and above 400 TFLOP/s."""
    case = attention.get("one-context")
    if case is None:
        return {}
    rows = case["timings"]
    fused = rows["triton-fused"].get("ms")
    separate = {n: r["ms"] for n, r in rows.items() if n.startswith("sdpa-") and "+" in n and "ms" in r}
    best_name = min(separate, key=separate.get) if separate else None
    return {
        "fused_ms": fused,
        "backend_ms": rows.get(BACKEND_ROW, {}).get("ms"),  # what the triton backend runs (ops.attention_sdpa)
        "best_sdpa_with_separate_rope": best_name,
        "best_sdpa_with_separate_rope_ms": separate.get(best_name),
        "fused_not_slower": bool(fused is not None and best_name is not None and fused <= separate[best_name]),
        "fused_tflops": rows["triton-fused"].get("tflops"),
        "fused_above_goal_tflops": bool((rows["triton-fused"].get("tflops") or 0) > GOAL_TFLOPS),
        "goal_tflops": GOAL_TFLOPS,
    }


def run(smoke: bool, reps: int, write) -> dict:
    import torch
    import triton

    import kernel_cases as cases

    if smoke:
        device, reps = "cpu", 2
        shape = {"lengths": {"one-context": 100}, "heads": 2, "head_dim": 64, "text": 12, "width": 96}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA GPU visible; this script times kernels on a GPU (--smoke checks it runs)")
        device = "cuda"
        shape = {
            "lengths": cases.LENGTHS,
            "heads": cases.HEADS,
            "head_dim": cases.HEAD_DIM,
            "text": cases.TEXT,
            "width": cases.WIDTH,
        }
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "timings_are_kernel_speeds": device == "cuda",
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "shape": shape,
        "dtype": "bfloat16",
        "reps": reps,
        "attention": {},
    }
    # written after every section: a run killed at its deadline keeps what it measured
    result["copy_rate_gbs"] = copy_gbs = cases.copy_bandwidth_gbs(
        device, nbytes=(1 << 30) if device == "cuda" else (1 << 22)
    )
    for name, length in shape["lengths"].items():
        result["attention"][name] = attention_case(length, shape, device, reps)
        write(result)
        if device == "cuda":
            torch.cuda.empty_cache()
    result["qk_norm_rope"] = norm_rope_section(shape, device, reps, copy_gbs)
    write(result)
    result["attention_prepass"] = prepass_section(shape, device, reps, copy_gbs)
    write(result)
    result["modulation"] = modulation_section(shape, device, reps, copy_gbs)
    write(result)
    result["fp8_quant"] = fp8_quant_section(shape, device, reps, copy_gbs)
    write(result)
    result["gelu_quant"] = gelu_quant_section(shape, device, reps, copy_gbs)
    result["goals_one_context"] = goals(result["attention"]) if device == "cuda" else "not evaluated: interpreter"
    checks = [c for s in result["attention"].values() for c in s["checks"].values()]
    checks += [c for s in result["qk_norm_rope"].values() for c in s["checks"].values()]
    checks += [c for s in result["attention_prepass"].values() for c in s["checks"].values()]
    checks += [s["checks"] for s in result["modulation"].values()]
    checks += [s["checks"] for s in result["fp8_quant"].values()]
    checks += [s["checks"] for s in result["gelu_quant"].values()]
    result["all_checks_ok"] = all(c["ok"] for c in checks)
    write(result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/<device>-kernels-<date>/)")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per row (median reported)")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes: not a timing")
    args = parser.parse_args(argv)
    if args.smoke:
        if args.out is None or RESULTS in args.out.resolve().parents:
            parser.error("--smoke needs --out outside benchmarks/results (its timings are not kernel speeds)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    if args.out is not None:
        run_folder.check_out(args.out)
    started = run_folder.now_utc()

    def path(result) -> Path:
        return args.out or run_folder.default_path(result["device"], "kernels", "kernels.json", result["date"])

    def write(result):
        path(result).parent.mkdir(parents=True, exist_ok=True)
        run_folder.write_json(path(result), result)

    result = run(args.smoke, args.reps, write)
    what = "the Triton kernels at FLUX.1 shapes against their baselines (benchmarks/kernels/kernels_gpu.py)"
    machine = run_folder.host(device=result["device"], **result["versions"])
    run_folder.record(path(result), what, machine, started, __file__, argv)
    print(
        f"wrote {path(result)}; checks {'ok' if result['all_checks_ok'] else 'FAILED'}; "
        f"goals {result['goals_one_context']}"
    )
    return 0 if result["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
