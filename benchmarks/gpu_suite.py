"""The one-call GPU suite: the speed ladder of the runtime on a full-size FLUX.1 Kontext transformer (random weights).

    pip install --no-deps -e . [wheels/diffusers-*.whl]   # diffusers is the baseline; carry its wheel there
    python benchmarks/gpu_suite.py [--out benchmarks/results] [--steps-timed 6] [--no-compile]
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite    # CPU, tiny model: checks the script runs through

Layouts: "kontext" = 512 text + 4096 target + 4096 context tokens (1024x1024 edit of a 1024x1024 image, 8704 in
attention); "text-to-image" = 512 + 4096. Rungs, each adding to the previous one:
    eager     the reference ops, the modulation computed inside every step (sampler.denoise)
    triton    + the Triton kernels (attention with fused QK-norm/RoPE, modulation, row-invariant linears)
    hoisted   + every step's modulation computed before the loop (stepping.Stepper)
    graphs    + one CUDA graph per shape bucket, replayed per step
    fp8       + the blocks' linears in FP8 e4m3 through torch._scaled_mm, per-token activation scales
    compile   + torch.compile of each block (inductor), unless --no-compile or the time budget is spent
and diffusers' FluxTransformer2DModel (eager bf16, same sizes) as the baseline, in the same run.

Per rung: per-step latency (CUDA events, median of --repeats loops of --steps-timed steps after warm-up), host time
per step (CPU time to issue a loop, graphs rungs), MFU = step FLOPs / time / the measured bf16 (FP8 for the fp8
rungs) matmul rate, peak GPU memory. Then end-to-end edits at 28, 8 and 4 steps including VAE encode and decode
(text embeddings as a cache hit), on the eager rung and on the best rungs. Checks (bit-exactness of hoisting and
graphs, the FP8 quantizer kernel) and the FP8 drift against bf16 (velocity error per step, final-latent error)
are in the JSON. Writes <out>/<device>-<date>.json and <out>/<device>-<date>-ladder.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BUDGET_S = 540  # stay inside one 10-minute command with margin
GOALS_H100 = {"kontext_bf16_ms_per_step": 230.0, "kontext_fp8_ms_per_step": 150.0, "edit_28_steps_s": 4.5}
LAYOUTS = {"kontext": (512, 4096, 4096), "text-to-image": (512, 4096, 0)}  # text, target, context tokens
SMOKE_LAYOUTS = {"kontext": (8, 16, 16), "text-to-image": (8, 16, 0)}


def step_flops(cfg, text: int, target: int, context: int) -> float:
    """Matmul + attention FLOPs of one transformer step (2 per multiply-add); the modulation rows are negligible.

    Double block: per stream qkv (3C^2), proj (C^2), MLP (2*C*mlp) on its tokens; attention 4*L^2*C over all L.
    Single block: linear1 (C*(3C+mlp)) and linear2 ((C+mlp)*C) on all L tokens, attention 4*L^2*C.
    """
    c, mlp = cfg.hidden_size, cfg.mlp_hidden
    img, length = target + context, text + target + context
    per_token_double = 2 * (3 * c * c + c * c + 2 * c * mlp)
    double = per_token_double * (img + text) + 4 * length**2 * c
    single = 2 * (c * (3 * c + mlp) + (c + mlp) * c) * length + 4 * length**2 * c
    embed = 2 * (img * cfg.in_channels * c + text * cfg.context_in_dim * c + target * c * cfg.in_channels)
    return cfg.depth * double + cfg.depth_single_blocks * single + embed


def random_transformer(cfg, device, dtype, seed=0):
    """A full-size transformer with random weights drawn on the device (no 24 GB host copy)."""
    from kontext_rt.model import FluxTransformer

    with torch.device("meta"):
        model = FluxTransformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    return init_random(model, device, seed)


@torch.no_grad()
def init_random(model, device, seed=0):
    """Matrices ~ N(0, (0.5 / sqrt(fan_in))^2) (activations stay finite through 57 blocks), norm scales 1, biases 0."""
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            p.normal_(0, 0.5 / p.shape[1] ** 0.5, generator=gen)
        elif name.endswith(("scale", "norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            p.fill_(1.0)
        else:
            p.zero_()
    return model.eval().requires_grad_(False)


def inputs(cfg, layout, device, dtype, seed=1):
    from kontext_rt.rope import rope_table, sequence_ids
    from kontext_rt.sampler import Conditioning

    text, target, context = layout
    side = int(round(target**0.5))
    grids = [(side, target // side)] + ([(side, context // side)] if context else [])
    gen = torch.Generator(device).manual_seed(seed)
    cos, sin = rope_table(sequence_ids(text, grids, device), cfg.axes_dim, cfg.theta)
    cond = Conditioning(
        ctx=torch.randn(1, context, cfg.in_channels, device=device, generator=gen).to(dtype) if context else None,
        txt=torch.randn(1, text, cfg.context_in_dim, device=device, generator=gen).to(dtype),
        pooled=torch.randn(1, cfg.vec_in_dim, device=device, generator=gen).to(dtype),
        guidance=torch.full((1,), 2.5, device=device) if cfg.guidance_embed else None, cos=cos, sin=sin)
    return torch.randn(1, target, cfg.in_channels, device=device, generator=gen), cond


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def loop_fn(model, ops, dtype, rung, stepper=None):
    """A function (x, sigmas, cond) -> x running the rung's sampling loop."""
    from kontext_rt.sampler import denoise

    if rung in ("eager", "triton"):
        def per_step(img, ctx, txt, pooled, t, g, cos, sin):
            return model(img, ctx, txt, pooled, t, g, cos, sin, ops)

        return lambda x, sigmas, cond: denoise(per_step, x, sigmas, cond, dtype)
    return lambda x, sigmas, cond: stepper.denoise(x, sigmas, cond)


def time_loop(run, x, cond, device, steps, repeats):
    """(median ms per step, host ms per step): whole loops of `steps` steps, timed with CUDA events."""
    from kontext_rt.sampler import schedule

    sigmas = schedule(steps, x.shape[1])
    run(x, sigmas, cond)  # warm-up: autotuning, graph capture, compilation
    sync(device)
    per_step, host = [], []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        run(x, sigmas, cond)
        host.append((time.perf_counter() - t0) * 1e3 / steps)
        if torch.device(device).type == "cuda":
            end.record()
            end.synchronize()
            per_step.append(start.elapsed_time(end) / steps)
        else:
            per_step.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(per_step), statistics.median(host)


def matmul_tflops(device, fp8: bool, n=8192, reps=20) -> float:
    sys.path.insert(0, str(HERE))
    import kernel_cases

    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    if fp8:
        qa, qb = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(qa, qb.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        fn = lambda: a @ b  # noqa: E731
    return 2 * n**3 / (kernel_cases.time_ms(fn, device, warmup=3, reps=reps) * 1e-3) / 1e12


def fp8_drift(model, ops, dtype, layouts_inputs, steps, convert):
    """Velocity relative error per step and final-latent relative error of FP8 against bf16 (same loop)."""
    from kontext_rt.sampler import schedule
    from kontext_rt.stepping import Stepper

    x, cond = layouts_inputs
    sigmas = schedule(steps, x.shape[1])

    def trace():
        velocities = []
        stepper = Stepper(model, ops, dtype)
        mods, dts = stepper.plan(x, sigmas, cond)
        state = x.float()
        for i in range(steps):
            nxt = stepper.step(state, mods[i], dts[i], cond.ctx, cond.txt, cond.cos, cond.sin)
            velocities.append((nxt - state) / dts[i])
            state = nxt
        return velocities, state

    ref_v, ref_x = trace()
    convert()
    v, out = trace()

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    return {"steps": steps, "velocity_rel_error_per_step": [rel(a, b) for a, b in zip(v, ref_v, strict=True)],
            "final_latent_rel_error": rel(out, ref_x)}


def diffusers_baseline(cfg, layout, device, dtype, steps, repeats):
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError as err:
        return {"error": f"diffusers not importable here ({err}): carry its wheel (pip install --no-deps)"}
    with torch.device("meta"):
        ref = FluxTransformer2DModel(
            num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
            pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=cfg.axes_dim)
    ref = init_random(ref.to_empty(device=device).to(dtype), device)
    text, target, context = layout
    x, cond = inputs(cfg, layout, device, dtype)
    from kontext_rt.rope import sequence_ids

    side = int(round(target**0.5))
    grids = [(side, target // side)] + ([(side, context // side)] if context else [])
    ids = sequence_ids(text, grids, device)

    def run(_x, sigmas, _cond):  # the same loop shape: one transformer call + Euler update per step
        state = x.float()
        for i in range(len(sigmas) - 1):
            t = sigmas[i].to(device).expand(1)
            v = ref(hidden_states=torch.cat([state.to(dtype)] + ([cond.ctx] if context else []), 1),
                    encoder_hidden_states=cond.txt, pooled_projections=cond.pooled, timestep=t,
                    img_ids=ids[text:], txt_ids=ids[:text], guidance=cond.guidance, return_dict=False)[0]
            state = state + (sigmas[i + 1] - sigmas[i]).to(device) * v[:, :target].float()
        return state

    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        ms, host = time_loop(run, x, cond, device, steps, repeats)
    return {"ms_per_step": ms, "host_ms_per_step": host, "peak_gib": peak_gib(device)}


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None


def end_to_end(model, vae, ops, dtype, rung, stepper, device, steps_list, layout):
    """Seconds for a whole edit: VAE encode of the context image, the loop, VAE decode (embeddings cached)."""
    from kontext_rt.image import pack, unpack
    from kontext_rt.sampler import schedule

    text, target, _ = layout
    side = int(round(target**0.5))
    image = torch.rand(1, 3, side * 16, side * 16, device=device).to(dtype) * 2 - 1
    x, cond = inputs(model.cfg, layout, device, dtype)
    run = loop_fn(model, ops, dtype, rung, stepper)
    out = {}
    for steps in steps_list:
        sigmas = schedule(steps, target)

        def edit(sigmas=sigmas):
            cond.ctx = pack(vae.encode(image))
            latents = run(x, sigmas, cond)
            return vae.decode(unpack(latents.to(dtype), side, side))

        edit()  # warm-up (graph capture for this bucket happened in the ladder)
        sync(device)
        t0 = time.perf_counter()
        edit()
        sync(device)
        out[str(steps)] = time.perf_counter() - t0
    return out


def write_png(path: Path, labels: list[str], values: list[float], baseline: float | None):
    """The ladder as a bar chart: matplotlib when present, else a plain PNG of bars (order = the JSON's ladder)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh(labels[::-1], values[::-1], color="#3b7dd8")
        if baseline:
            ax.axvline(baseline, color="#d83b3b", linestyle="--", label="diffusers eager bf16")
            ax.legend()
        ax.set_xlabel("ms per Kontext step (1024x1024 + 1024x1024 context)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return "matplotlib"
    except ImportError:
        pass
    width, bar, gap = 600, 30, 10
    height = len(values) * (bar + gap) + gap
    top = max(values + ([baseline] if baseline else [])) or 1.0
    rows = []
    for y in range(height):
        i, within = divmod(y - gap, bar + gap)
        row = bytearray([255] * width * 3)
        if y >= gap and within < bar and i < len(values):
            for px in range(int(values[i] / top * (width - 20))):
                row[px * 3 : px * 3 + 3] = b"\x3b\x7d\xd8"
        if baseline:
            px = int(baseline / top * (width - 20))
            row[px * 3 : px * 3 + 3] = b"\xd8\x3b\x3b"
        rows.append(b"\x00" + bytes(row))

    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
                     + chunk(b"IEND", b""))
    return "plain bars (labels in the JSON's ladder order, red line: diffusers)"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--steps-timed", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, times nothing")
    args = p.parse_args(argv)
    if args.smoke and args.out.resolve().is_relative_to((HERE / "results").resolve()):
        p.error("--smoke timings are not GPU timings: write them outside benchmarks/results")
    return args


@dataclass
class Suite:
    """What every phase of one run shares."""

    args: argparse.Namespace
    device: str
    cfg: object
    layouts: dict
    model: torch.nn.Module
    ops: dict  # "eager" (and "triton" on a GPU) op tables
    capture: object  # capture_cuda on a GPU, None in the smoke run
    data: dict  # layout -> (x, cond)
    result: dict
    t_start: float
    dtype: torch.dtype = torch.bfloat16

    @property
    def fast(self):
        return self.ops.get("triton", self.ops["eager"])

    def rung(self, name, ops, stepper, peak="bf16"):
        self.result["ladder"][name] = measure(self.model, ops, self.dtype, name, stepper, self.data, self.cfg,
                                              self.layouts, self.args, self.device, self.result["matmul_tflops"][peak])


def main(argv=None) -> int:
    args = parse(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    suite = setup(args)
    from kontext_rt.config import VAE_PRESETS
    from kontext_rt.vae import AutoEncoder

    vae = AutoEncoder(VAE_PRESETS["tiny" if args.smoke else "flux"])
    vae = vae.to(suite.device, suite.dtype).eval().requires_grad_(False)
    e2e = bf16_rungs(suite, vae)
    e2e.update(fp8_rungs(suite, vae))
    suite.result["end_to_end_s"] = e2e
    suite.result["goals_h100"] = goals(suite.result)
    suite.result["wall_s"] = time.perf_counter() - suite.t_start
    return write(suite.result, args, suite.result["device"])


def setup(args) -> Suite:
    """The matmul rates, the diffusers baseline (first: its 24 GB are freed before ours are drawn), the model."""
    from kontext_rt.backends import resolve
    from kontext_rt.config import PRESETS
    from kontext_rt.graphs import capture_cuda

    t_start = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    cfg = PRESETS["tiny" if args.smoke else "flux-kontext-dev"]
    layouts = SMOKE_LAYOUTS if args.smoke else LAYOUTS
    dtype = torch.bfloat16
    name = "cpu-smoke" if args.smoke else torch.cuda.get_device_name().replace(" ", "-")
    result = {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "python": platform.python_version(), "smoke": args.smoke, "layouts": layouts, "checks": {},
              "ladder": {}, "skipped": {}}
    n = 256 if args.smoke else 8192
    result["matmul_tflops"] = {"bf16": matmul_tflops(device, False, n), "fp8": matmul_tflops(device, True, n)}
    if not args.no_diffusers and not args.smoke:
        result["diffusers"] = {k: diffusers_baseline(cfg, lay, device, dtype, args.steps_timed, args.repeats)
                               for k, lay in layouts.items()}
        torch.cuda.empty_cache()
    ops = {"eager": resolve("eager", device)[1]}
    if args.smoke:
        result["skipped"]["triton"] = "the smoke run has no GPU (the interpreter is not timed)"
        result["skipped"]["graphs"] = "CUDA graphs need a GPU"
    else:
        ops["triton"] = resolve("triton", device)[1]
    data = {k: inputs(cfg, lay, device, dtype) for k, lay in layouts.items()}
    return Suite(args, device, cfg, layouts, random_transformer(cfg, device, dtype), ops,
                 None if args.smoke else capture_cuda, data, result, t_start)


def bf16_rungs(s: Suite, vae) -> dict:
    """eager -> triton -> hoisted -> graphs, the on-device exactness checks, and the bf16 end-to-end edits."""
    from kontext_rt.stepping import Stepper

    steppers = {"hoisted": Stepper(s.model, s.fast, s.dtype)}
    if s.capture is not None:
        steppers["graphs"] = Stepper(s.model, s.fast, s.dtype, cuda_graphs=True, capture=s.capture)
    s.result["checks"].update(exactness_checks(s.model, s.fast, s.dtype, s.data["kontext"], steppers, s.device))
    for name, ops in s.ops.items():
        s.rung(name, ops, None)
    for name, stepper in steppers.items():
        s.rung(name, s.fast, stepper)
    best = "graphs" if "graphs" in steppers else "hoisted"
    kontext = s.layouts["kontext"]
    return {"eager": end_to_end(s.model, vae, s.ops["eager"], s.dtype, "eager", None, s.device,
                                (4,) if s.args.smoke else (28, 8, 4), kontext),
            best: end_to_end(s.model, vae, s.fast, s.dtype, best, steppers[best], s.device, (28, 8, 4), kontext)}


def fp8_rungs(s: Suite, vae) -> dict:
    """The FP8 drift against bf16 (it converts the model in place), the fp8 rung, then compile if time allows."""
    from kontext_rt.fp8 import convert
    from kontext_rt.stepping import Stepper

    s.result["fp8_drift"] = fp8_drift(s.model, s.fast, s.dtype, s.data["kontext"], 4 if s.args.smoke else 8,
                                      lambda: convert(s.model, s.fast.quantize_rows))
    s.result["checks"]["fp8_quantizer_kernel"] = "skipped: no GPU" if s.args.smoke else quantizer_check(s.device)
    graphs = s.capture is not None
    stepper = Stepper(s.model, s.fast, s.dtype, cuda_graphs=graphs, capture=s.capture) if graphs else Stepper(
        s.model, s.fast, s.dtype)
    s.rung("fp8", s.fast, stepper, peak="fp8")
    e2e = {"fp8": end_to_end(s.model, vae, s.fast, s.dtype, "fp8", stepper, s.device, (28, 8, 4),
                             s.layouts["kontext"])}
    if s.args.no_compile or s.args.smoke:
        s.result["skipped"]["compile"] = "--no-compile" if s.args.no_compile else "inductor needs the GPU run"
    elif time.perf_counter() - s.t_start > BUDGET_S * 0.6:
        s.result["skipped"]["compile"] = "time budget spent before the compile rung"
    else:
        for block in (*s.model.double_blocks, *s.model.single_blocks):
            block.compile(fullgraph=True, dynamic=False)
        s.rung("compile", s.fast, Stepper(s.model, s.fast, s.dtype, cuda_graphs=True, capture=s.capture), "fp8")
    return e2e


def measure(model, ops, dtype, rung, stepper, data, cfg, layouts, args, device, peak_tflops):
    row = {}
    for key, (x, cond) in data.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run = loop_fn(model, ops, dtype, rung, stepper)
        with torch.inference_mode():
            ms, host = time_loop(run, x, cond, device, args.steps_timed, args.repeats)
        flops = step_flops(cfg, *layouts[key])
        row[key] = {"ms_per_step": ms, "host_ms_per_step": host, "tflops": flops / ms / 1e9,
                    "mfu": flops / ms / 1e9 / peak_tflops, "peak_gib": peak_gib(device)}
    return row


@torch.inference_mode()
def exactness_checks(model, ops, dtype, data, steppers, device):
    """Hoisted == per-step and graphs == no graphs, bit for bit, on this device (three steps, Kontext layout)."""
    from kontext_rt.sampler import denoise, schedule

    x, cond = data
    sigmas = schedule(3, x.shape[1])

    def per_step(img, ctx, txt, pooled, t, g, cos, sin):
        return model(img, ctx, txt, pooled, t, g, cos, sin, ops)

    want = denoise(per_step, x, sigmas, cond, dtype)
    out = {"hoisted_equals_per_step": bool(torch.equal(steppers["hoisted"].denoise(x, sigmas, cond), want)),
           "finite": bool(torch.isfinite(want).all())}
    if "graphs" in steppers:
        out["graphs_equal_no_graphs"] = bool(torch.equal(steppers["graphs"].denoise(x, sigmas, cond),
                                                         steppers["hoisted"].denoise(x, sigmas, cond)))
    return out


def quantizer_check(device):
    from kontext_rt.fp8 import quantize_rows
    from kontext_rt.kernels.fp8_quant import quantize_rows as kernel

    x = torch.randn(8704, 3072, device=device).to(torch.bfloat16) * 3
    q, s = kernel(x)
    q_ref, s_ref = quantize_rows(x)
    return bool(torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref))


def goals(result):
    lad, e2e = result["ladder"], result["end_to_end_s"]
    bf16 = min((lad[r]["kontext"]["ms_per_step"] for r in ("graphs", "hoisted", "triton") if r in lad), default=None)
    fp8 = min((lad[r]["kontext"]["ms_per_step"] for r in ("fp8", "compile") if r in lad), default=None)
    edit = min(v["28"] for k, v in e2e.items() if "28" in v) if any("28" in v for v in e2e.values()) else None
    base = result.get("diffusers", {}).get("kontext", {}).get("ms_per_step")
    faster = {r: lad[r]["kontext"]["ms_per_step"] < base for r in lad} if base else "no baseline"
    return {"targets": GOALS_H100, "kontext_bf16_ms_per_step": bf16, "kontext_fp8_ms_per_step": fp8,
            "edit_28_steps_s": edit, "faster_than_diffusers": faster,
            "note": "goals are for an H100; compare only on the device named above"}


def write(result, args, name) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{name}-{result['date']}")
    labels = list(result["ladder"])
    values = [result["ladder"][r]["kontext"]["ms_per_step"] for r in labels]
    base = result.get("diffusers", {}).get("kontext", {}).get("ms_per_step")
    result["chart"] = write_png(args.out / f"{stem}-ladder.png", labels, values, base)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({"ladder_ms_per_step": dict(zip(labels, values, strict=True)), "checks": result["checks"],
                      "goals": result["goals_h100"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
