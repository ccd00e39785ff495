"""The pieces of the GPU suite (gpu_suite.py): random full-size models, inputs, timed loops, exactness checks, the
FP8 drift, end-to-end edits and the ladder chart. Every function takes its device, so the CPU rehearsal runs the
very same code on a tiny model.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the timer, by plain name
import timing  # noqa: E402


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


def _on_device(make, device, dtype, seed):
    """Build on the meta device, cast there (free), allocate on `device` in `dtype`: no float32 copy of 12B
    parameters is ever made, on the host or the GPU."""
    with torch.device("meta"):
        model = make().to(dtype)
    return init_random(model.to_empty(device=device), device, seed)


def random_transformer(cfg, device, dtype, seed=0):
    """The runtime's FluxTransformer at `cfg`'s size with random weights drawn on the device."""
    from kontext_rt.model.transformer import FluxTransformer

    return _on_device(lambda: FluxTransformer(cfg), device, dtype, seed)


def random_diffusers(cfg, device, dtype, seed=0):
    """diffusers' FluxTransformer2DModel at the same size, initialised by the same rule (the baseline)."""
    from diffusers import FluxTransformer2DModel

    from kontext_rt.weights.configs import transformer_config_json  # the one FluxConfig -> diffusers mapping

    config = transformer_config_json(cfg)
    return _on_device(lambda: FluxTransformer2DModel.from_config(config), device, dtype, seed)


@torch.no_grad()
def init_random(model, device, seed=0):
    """Matrices ~ N(0, (0.5 / sqrt(fan_in))^2) (activations stay finite through 57 blocks), norm scales 1, biases 0."""
    if any(True for _ in model.buffers()):
        raise ValueError(f"{type(model).__name__} has buffers, which to_empty leaves uninitialised")
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            p.normal_(0, 0.5 / p.shape[1] ** 0.5, generator=gen)
        elif name.endswith(("scale", "norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            p.fill_(1.0)
        else:
            p.zero_()
    return model.eval().requires_grad_(False)


def grids_of(layout) -> list[tuple[int, int]]:
    text, target, context = layout
    side = int(round(target**0.5))
    return [(side, target // side)] + ([(side, context // side)] if context else [])


def inputs(cfg, layout, device, dtype, seed=1):
    """(x (1, N, 64) float32 noise, Conditioning) for a (text, target, context) token layout."""
    from kontext_rt.model.rope import rope_table, sequence_ids
    from kontext_rt.sampling.loop import Conditioning

    text, target, context = layout
    gen = torch.Generator(device).manual_seed(seed)
    cos, sin = rope_table(sequence_ids(text, grids_of(layout), device), cfg.axes_dim, cfg.theta)
    cond = Conditioning(
        ctx=torch.randn(1, context, cfg.in_channels, device=device, generator=gen).to(dtype) if context else None,
        txt=torch.randn(1, text, cfg.context_in_dim, device=device, generator=gen).to(dtype),
        pooled=torch.randn(1, cfg.vec_in_dim, device=device, generator=gen).to(dtype),
        guidance=torch.full((1,), 2.5, device=device) if cfg.guidance_embed else None,
        cos=cos,
        sin=sin,
    )
    return torch.randn(1, target, cfg.in_channels, device=device, generator=gen), cond


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None


def free_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def loop_fn(model, ops, dtype, denoiser=None):
    """A function (x, sigmas, cond) -> x: the one sampling loop over `denoiser` (default: the per-step one)."""
    from kontext_rt.sampling.denoisers import PerStep
    from kontext_rt.sampling.loop import denoise

    denoiser = denoiser or PerStep.of_model(model, ops, dtype)
    return lambda x, sigmas, cond: denoise(denoiser, x, sigmas, cond)


@torch.inference_mode()
def time_loop(run, x, cond, device, steps, repeats, warmup_steps=2):
    """(median ms per step, host ms per step) over `repeats` loops of `steps` steps, after one short warm-up loop
    (autotuning, graph capture, compilation: a 2-step loop has the same shapes as a 28-step one). ms per step is
    the device's time on a GPU (timing.Sample.ms), host ms the time to issue the loop."""
    from kontext_rt.sampling.schedule import schedule

    run(x, schedule(warmup_steps, x.shape[1]), cond)
    sigmas = schedule(steps, x.shape[1])
    samples = timing.repeat(lambda: run(x, sigmas, cond), device, repeats)
    return statistics.median(s.ms / steps for s in samples), statistics.median(s.host_ms / steps for s in samples)


@torch.inference_mode()
def profile_steps(run, x, cond, device, steps=2, top=25) -> dict:
    """Where a step's time goes: torch.profiler over a `steps`-step loop (its hoisted table included; after a
    warm-up loop), per step. "ops": the torch ops (custom kontext_rt ops included) by the time of the kernels each
    launched itself, on the device (on a CPU rehearsal: CPU time, which says nothing about a GPU); on a GPU also
    "kernels": the kernels by name. Each list's shares are of its own total."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from kontext_rt.sampling.schedule import schedule

    cuda = timing.is_cuda(device)
    run(x, schedule(2, x.shape[1]), cond)
    timing.sync(device)
    sigmas = schedule(steps, x.shape[1])
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        run(x, sigmas, cond)
        timing.sync(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()

    def table(kind):
        events = [
            e
            for e in averages
            if e.device_type == kind and getattr(e, attr) > 0 and not getattr(e, "is_user_annotation", False)
        ]  # a record_function range on the GPU timeline spans kernels already counted
        total = sum(getattr(e, attr) for e in events)
        events.sort(key=lambda e: getattr(e, attr), reverse=True)
        rows = [
            {
                "name": e.key[:160],
                "calls_per_step": e.count / steps,
                "ms_per_step": getattr(e, attr) / 1e3 / steps,
                "share": getattr(e, attr) / total,
            }
            for e in events[:top]
        ]
        return total / 1e3 / steps, rows

    total, ops = table(DeviceType.CPU)
    found = {"clock": "device" if cuda else "cpu (a rehearsal: not GPU figures)", "steps": steps}
    found |= {"total_ms_per_step": total, "ops": ops}
    if cuda:
        found["kernels_total_ms_per_step"], found["kernels"] = table(DeviceType.CUDA)
    return found


def matmul_tflops(device, fp8: bool, n=8192, reps=20) -> float:
    """The dense matmul rate this device reaches in bf16 (or FP8 e4m3 through _scaled_mm): the MFU denominator."""
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    if fp8:
        qa, qb = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(qa, qb.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        fn = lambda: a @ b  # noqa: E731
    return 2 * n**3 / (timing.time_ms(fn, device, warmup=3, reps=reps) * 1e-3) / 1e12


def diffusers_loop(ref, cfg, layout, data, device, dtype):
    """The same loop shape around diffusers' transformer: one call + Euler update per step, context appended."""
    from kontext_rt.model.rope import sequence_ids

    text, target, context = layout
    x, cond = data
    ids = sequence_ids(text, grids_of(layout), device)

    def run(_x, sigmas, _cond):
        state = x.float()
        sigmas = sigmas.to(device)
        for i in range(len(sigmas) - 1):
            hidden = torch.cat([state.to(dtype)] + ([cond.ctx] if context else []), 1)
            v = ref(
                hidden_states=hidden,
                encoder_hidden_states=cond.txt,
                pooled_projections=cond.pooled,
                timestep=sigmas[i].expand(1),
                img_ids=ids[text:],
                txt_ids=ids[:text],
                guidance=cond.guidance,
                return_dict=False,
            )[0]
            state = state + (sigmas[i + 1] - sigmas[i]) * v[:, :target].float()
        return state

    return run


@torch.inference_mode()
def exactness(model, ops, dtype, data, hoisted, graphs, steps) -> dict:
    """Hoisted == per-step and graphs == no graphs, bit for bit, on this device (Kontext layout)."""
    from kontext_rt.sampling.loop import denoise
    from kontext_rt.sampling.schedule import schedule

    x, cond = data
    sigmas = schedule(steps, x.shape[1])
    want = loop_fn(model, ops, dtype)(x, sigmas, cond)
    out = {
        "hoisted_equals_per_step": bool(torch.equal(denoise(hoisted, x, sigmas, cond), want)),
        "finite": bool(torch.isfinite(want).all()),
    }
    if graphs is not None:
        out["graphs_equal_no_graphs"] = bool(
            torch.equal(denoise(graphs, x, sigmas, cond), denoise(hoisted, x, sigmas, cond))
        )
    return out


@torch.inference_mode()
def reference_bits(device, heads=24, tokens=8704, split=512, d=128) -> dict:
    """Whether the eager table's QK norm + RoPE on bf16 q (kernels/reference.py: F.rms_norm on bf16, RoPE's products
    by type promotion, its sum rounded by the add) gives the bits of upcasting q to float32 first (as the reference
    did before issue 31's traffic count), on this device at one block's Kontext size: the CPU gives the same bits;
    CUDA's fused rms_norm is expected to, unverified until this runs."""
    import torch.nn.functional as F

    from kontext_rt.kernels import reference

    gen = torch.Generator(device).manual_seed(5)
    q = torch.randn(1, heads, tokens, d, device=device, generator=gen).to(torch.bfloat16)
    scales = tuple(1 + 0.1 * torch.randn(d, device=device, generator=gen) for _ in range(2))
    angles = torch.rand(tokens, d // 2, device=device, generator=gen) * 6.3
    cos, sin = angles.cos(), angles.sin()
    got, _ = reference.qk_norm_rope(q, q, scales, scales, split, cos, sin)
    y = F.rms_norm(q.float(), (d,), eps=reference.EPS).to(q.dtype)
    y = torch.cat((y[..., :split, :] * scales[0].to(q.dtype), y[..., split:, :] * scales[1].to(q.dtype)), -2)
    x0, x1 = y.float().unflatten(-1, (-1, 2)).unbind(-1)
    want = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(q.dtype)
    return {"equal": bool(torch.equal(got, want)), "max_abs_diff": (got.float() - want.float()).abs().max().item()}


@torch.inference_mode()
def trace(hoisted, data, steps) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(velocity per step, final state) of a hoisted loop without graphs: what the FP8 drift compares."""
    from kontext_rt.sampling import solvers
    from kontext_rt.sampling.schedule import schedule

    x, cond = data
    sigmas = schedule(steps, x.shape[1])
    mods, euler = hoisted.plan(sigmas, cond, x), solvers.Euler(sigmas, x.device)
    state, velocities = x.float(), []
    for i in range(steps):
        velocities.append(hoisted.velocity(state, mods[i], cond.ctx, cond.txt, cond.cos, cond.sin))
        state = euler.step(i, state, velocities[-1])
    return velocities, state


def drift(reference, fp8) -> dict:
    """Relative error of the FP8 loop's velocities and final latents against the bf16 loop's (same inputs)."""

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    (ref_v, ref_x), (v, out) = reference, fp8
    return {
        "steps": len(ref_v),
        "velocity_rel_error_per_step": [rel(a, b) for a, b in zip(v, ref_v, strict=True)],
        "final_latent_rel_error": rel(out, ref_x),
    }


def quantizer_check(device, rows=8704, cols=3072) -> dict:
    """The Triton FP8 quantizer equals torch's quantize_rows bit for bit on this device (values and scales)."""
    from kontext_rt.kernels.fp8_quant import quantize_rows as kernel
    from kontext_rt.model.fp8_linear import quantize_rows

    gen = torch.Generator(device).manual_seed(2)
    x = (torch.randn(rows, cols, device=device, generator=gen) * 3).to(torch.bfloat16)
    x[0] = 0  # an all-zero row takes the scale floor
    q, s = kernel(x)
    q_ref, s_ref = quantize_rows(x)
    differ = (q.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()
    ties = e4m3_tie_rows(device)  # compiled rounding (FMA, flush-to-zero) on the values where it could differ
    q_ties, s_ties = kernel(ties)
    ties_differ = (q_ties.view(torch.uint8) != ties.to(torch.float8_e4m3fn).view(torch.uint8)).sum().item()
    return {
        "values_equal": differ == 0,
        "values_differing": differ,
        "scales_equal": bool(torch.equal(s, s_ref)),
        "ties_equal_torch_cast": ties_differ == 0 and bool((s_ties == 1).all()),
        "ties_differing": ties_differ,
    }


def e4m3_tie_rows(device) -> torch.Tensor:
    """float32 rows of 64 whose amax is 448 (so the scale is 1): every e4m3 value, every midpoint between
    neighbours and the float32 values one ulp either side, of both signs."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9))])
    values = torch.cat([values, -values])
    rows = torch.nn.functional.pad(values, (0, -values.numel() % 63)).view(-1, 63)
    return torch.cat([torch.full((rows.shape[0], 1), 448.0), rows], dim=1).to(device)


@torch.inference_mode()
def end_to_end(vae, run, layout, data, device, dtype, steps_list) -> dict:
    """Seconds for whole edits: VAE encode of the context image, the loop, VAE decode (embeddings as a cache hit),
    until the device has finished (timing.Sample.wall_ms). One 1-step edit warms up first (VAE kernels; the loop's
    graphs and autotuning were warmed by the ladder)."""
    from kontext_rt.image import pack, unpack
    from kontext_rt.sampling.schedule import schedule

    text, target, _ = layout
    (rows, cols), *_ = grids_of(layout)
    x, cond = data
    gen = torch.Generator(device).manual_seed(3)
    image = torch.rand(1, 3, rows * 16, cols * 16, device=device, generator=gen).to(dtype) * 2 - 1

    def edit(steps):
        latents = run(x, schedule(steps, target), dataclasses.replace(cond, ctx=pack(vae.encode(image))))
        return vae.decode(unpack(latents.to(dtype), rows, cols))

    edit(1)
    out = {}
    for steps in steps_list:
        timing.sync(device)
        out[str(steps)] = timing.timed(lambda steps=steps: edit(steps), device)[1].wall_ms / 1e3
    return out


CACHE_NEVER, CACHE_ALWAYS = 0.0, 1e30  # step-cache thresholds: every step in full (with the cache's first-block
# path and host read), and every step after the first answered from the cache


def fewer_calls(model, ops, dtype, denoisers: dict, data, device, steps, repeats, warmup) -> dict:
    """What the fewer-calls options cost per step at this size, each beside plain Euler in the same phase: the
    DPM-Solver++ 2M step (one model call plus its update after the call) over every denoiser given (hoisted and,
    where the rung has them, CUDA graphs: the solver's eager update after each replay); the step cache (first-block
    residual, sampling/step_cache.py) never skipping (its first-block split and one host read per step) and always
    skipping after the first step. A cached step's time is taken from the always-skipping loop of n steps, one of
    them full: (n * ms - full) / (n - 1). Random weights: the cache's decisions here are forced by the threshold,
    never by the data, and say nothing of how many steps a real edit would skip."""
    from kontext_rt.sampling.loop import denoise
    from kontext_rt.sampling.step_cache import FirstBlockCache, cacheable

    def loop(denoiser, solver="euler"):
        return lambda x, sigmas, cond: denoise(denoiser, x, sigmas, cond, solver=solver)

    out = {}
    for name, denoiser in denoisers.items():
        for solver in ("euler", "dpm++2m"):
            ms, host = time_loop(loop(denoiser, solver), *data, device, steps, repeats, warmup)
            out[f"{name} {solver}"] = {"ms_per_step": ms, "host_ms_per_step": host}
    for name, denoiser in denoisers.items():
        try:
            cacheable(denoiser)
        except Exception as err:  # the denoisers the cache refuses: recorded, not timed
            out[f"{name} step cache"] = {"refused": str(err)[:300]}
            continue
        full = out[f"{name} euler"]["ms_per_step"]
        ms_never, _ = time_loop(loop(FirstBlockCache(denoiser, CACHE_NEVER)), *data, device, steps, repeats, warmup)
        ms_always, _ = time_loop(loop(FirstBlockCache(denoiser, CACHE_ALWAYS)), *data, device, steps, repeats, warmup)
        cached = (steps * ms_always - ms_never) / (steps - 1)
        out[f"{name} step cache"] = {
            "full_step_ms": ms_never,
            "cached_step_ms": cached,
            "cached_over_full": cached / full,
            "overhead_of_the_check": ms_never / full - 1,
            # an edit's loop at 28 steps with 10 full calls, from the two measured step times (a model, not a run)
            "loop_28_steps_10_calls_s": (10 * ms_never + 18 * cached) / 1e3,
        }
    return out


def write_png(path: Path, labels: list[str], values: list[float], baseline: float | None) -> None:
    """The ladder as a bar chart (matplotlib), written under a temporary name and renamed: a kill never leaves half
    a file."""
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
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
