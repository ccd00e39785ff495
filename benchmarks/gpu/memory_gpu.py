"""Peak device memory and ms/step of the denoising loop for each placement x precision, beside the memory plan.

    python benchmarks/gpu/memory_gpu.py --out memory.json               # a GPU: full-size Kontext, a 1024x1024 edit
    python benchmarks/gpu/memory_gpu.py --smoke --out /tmp/memory.json  # the CPU: the tiny preset; measures nothing

The GPU machine has no checkpoint, so the transformer is built at full size with random weights (memory and time
do not depend on the values) and only the denoising loop runs: no VAE, no text encoders. Its measured peak
(torch.cuda.max_memory_allocated above what was allocated before the model) is set beside the plan's highest
transformer stage (modulation table, denoising step) for the same placement with the VAE and text encoders off the
device, without the plan's margin: the ratio says how much of the margin the allocator and workspaces used.
Each case is written as soon as it ends (a kill keeps the cases before it), most wanted first; --budget-s skips
the cases that would not end in time. Every placement of a precision must give the first one's output bit for bit
(the streams, events and copies of the CUDA path, which the CPU tests cannot run); a difference fails the script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/gpu/
BENCH = HERE.parent
sys.path.insert(0, str(BENCH))  # the timer and the results' run folders, by plain name
import run_folder  # noqa: E402
from timing import Stopwatch  # noqa: E402

CASES = [  # (precision, placement): the cards people have first (FP8 and bf16 lean), then offload, then resident
    ("fp8", "lean"),
    ("bf16", "lean"),
    ("fp8", "offload"),
    ("bf16", "offload"),
    ("bf16", "resident"),
    ("fp8", "resident"),
]


def random_host_model(cfg, device):
    """The transformer in bf16 in host memory, each tensor drawn on `device` (fast) and copied over."""
    import torch

    from kontext_rt.model.transformer import FluxTransformer

    with torch.device("meta"):
        model = FluxTransformer(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    model = model.to_empty(device="cpu")
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.copy_((torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(t.dtype))
    return model


def fresh_model(cfg, host_model):
    """A new transformer holding host_model's host tensors (nothing copied: placing it replaces its own tensors,
    never the shared ones), so every case starts from the same weights without a copy of the whole model."""
    import torch

    from kontext_rt.model.transformer import FluxTransformer

    with torch.device("meta"):
        model = FluxTransformer(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    model.load_state_dict(host_model.state_dict(), assign=True)
    return model


def inputs(cfg, device, size: int, text_tokens: int):
    import torch

    from kontext_rt.model.rope import rope_table, sequence_ids
    from kontext_rt.sampling.loop import Conditioning

    rows = cols = size // 16
    gen = torch.Generator(device).manual_seed(1)
    bf16 = torch.bfloat16

    def randn(*shape, dtype=bf16):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    cos, sin = rope_table(sequence_ids(text_tokens, [(rows, cols), (rows, cols)], device), cfg.axes_dim, cfg.theta)
    cond = Conditioning(
        randn(1, rows * cols, cfg.in_channels),
        randn(1, text_tokens, cfg.context_in_dim),
        randn(1, cfg.vec_in_dim),
        torch.full((1,), 2.5, device=device),
        cos,
        sin,
    )
    return randn(1, rows * cols, cfg.in_channels, dtype=torch.float32), cond


def placement_of(name: str):
    """The placement preset's transformer and modulation; the text encoders on the CPU, the VAE staged."""
    from kontext_rt.placement import PRESETS, Placement

    preset = PRESETS[name]
    return Placement(text_encoders="cpu", transformer=preset.transformer, modulation=preset.modulation, vae="staged")


def place(host_model, cfg, fp8: bool, placement, device):
    """(model, ops, residency, load_s): a fresh model on the device as a pipeline loads it, with the ops `auto`
    picks, and the seconds that took (not synced: the load as the host sees it)."""
    import torch

    from kontext_rt.backends import resolve
    from kontext_rt.model import fp8_linear
    from kontext_rt.transformer_placement import place_transformer

    load = Stopwatch()
    model = fresh_model(cfg, host_model)
    ops = resolve("auto", device).ops  # what a pipeline runs here: the triton kernels on a GPU, eager on a CPU
    if fp8:  # as the backends do: one linear at a time on the device, offloaded blocks parked back in host memory
        park = torch.device("cpu") if placement.offloads_blocks else None
        fp8_linear.convert(model, ops.quantize_rows, None, fp8_linear.matmul_for(device), device=device, park=park)
    residency = place_transformer(model, placement, device)
    return model, ops, residency, load.elapsed_s()


def planned(cfg, vae_cfg, fp8: bool, placement, size, steps, text_tokens):
    """(the plan, its highest transformer stage in bytes) for the case, without the plan's margin."""
    import torch

    from kontext_rt import memory

    tokens = (size // 16) ** 2
    p = memory.plan(
        cfg, vae_cfg, torch.bfloat16, fp8, text_tokens, tokens, tokens, size, size, placement=placement, steps=steps
    )
    return p, max(p.stages["modulation table"], p.stages["denoising step"])


def run_case(host_model, cfg, vae_cfg, precision, placement_name, device, size, steps, text_tokens) -> tuple:
    """(the case's row, its output on the CPU): one precision x placement, loaded, run and set beside its plan."""
    import torch

    from kontext_rt import memory
    from kontext_rt.sampling.denoisers import Hoisted
    from kontext_rt.sampling.loop import denoise
    from kontext_rt.sampling.schedule import schedule

    cuda = device.type == "cuda"
    placement = placement_of(placement_name)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    fp8 = precision == "fp8"
    model, ops, residency, load_s = place(host_model, cfg, fp8, placement, device)
    loaded = (torch.cuda.memory_allocated(device) - base) if cuda else None
    load_peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
    base_reserved = torch.cuda.memory_reserved(device) if cuda else 0
    denoiser = Hoisted(model, ops, torch.bfloat16)
    if residency is not None:
        denoiser = residency.denoiser(denoiser)
    x, cond = inputs(cfg, device, size, text_tokens)
    sigmas = schedule(steps, (size // 16) ** 2, True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    steps_watch = Stopwatch(device)  # a lap per step, each after a device sync (the loop's progress callback)
    out = denoise(denoiser, x, sigmas, cond, steps_watch.lap)
    times = steps_watch.laps_s
    run_peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
    reserved_peak = (torch.cuda.max_memory_reserved(device) - base_reserved + loaded) if cuda else None
    p, predicted = planned(cfg, vae_cfg, fp8, placement, size, steps, text_tokens)
    row = {
        "precision": precision,
        "placement": placement.describe(),
        "steps": steps,
        "finite": bool(torch.isfinite(out).all()),
        "load_s": load_s,
        "ms_per_step": 1e3 * statistics.median(times[1:] or times),
        "step_ms": [1e3 * t for t in times],
        "planned_on_device_bytes": p.resident,
        "planned_peak_bytes": predicted,
        "planned_total_bytes": int(predicted * (1 + memory.MARGIN)),
        "measured_on_device_bytes": loaded,
        "measured_load_peak_bytes": load_peak,
        "measured_peak_bytes": run_peak,
        "measured_reserved_peak_bytes": reserved_peak,  # what the caching allocator held: rounding, fragmentation
    }
    if run_peak is not None:
        row["measured_over_planned"] = run_peak / predicted
    if residency is not None and residency.blocks is not None:
        row["streamed_block_bytes_per_step"] = sum(u.nbytes for u in residency.blocks.units)
    del model, denoiser, residency
    return row, out.cpu()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="the CPU, the tiny preset: checks the script, times nothing")
    ap.add_argument("--steps", type=int, help="denoising steps per case (default 4; --smoke: 2)")
    ap.add_argument("--budget-s", type=float, help="skip the cases that would end past this many seconds")
    args = ap.parse_args(argv)
    if args.smoke and run_folder.in_results(args.out):
        ap.error("--smoke measures nothing: write it outside benchmarks/results")
    run_folder.check_out(args.out)
    started = run_folder.now_utc()
    import torch

    from kontext_rt.backends import resolve
    from kontext_rt.config import PRESETS, VAE_PRESETS

    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: run with --smoke on a CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    cfg = PRESETS["tiny" if args.smoke else "flux-kontext-dev"]
    vae_cfg = VAE_PRESETS["tiny" if args.smoke else "flux"]
    size, text_tokens = (64, 8) if args.smoke else (1024, 512)
    steps = args.steps or (2 if args.smoke else 4)
    data = {
        "what": "denoising loop only (random full-size weights, the auto backend's ops, hoisted), peak above the "
        "pre-model baseline",
        "backend": resolve("auto", device).name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke: measures nothing)",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "size": f"{size}x{size} + one context image, {text_tokens} text tokens",
        "cases": [],
    }
    run = Stopwatch()
    host = random_host_model(cfg, device)
    data["build_s"] = run.elapsed_s()
    firsts = {}  # precision -> the first case's output: every placement must give it bit for bit
    times = []
    for precision, placement in CASES:
        elapsed = run.elapsed_s()
        if args.budget_s and times and elapsed + max(times) > args.budget_s:
            row = {"precision": precision, "placement": placement, "skipped": f"budget ({elapsed:.0f} s used)"}
        else:
            case = Stopwatch()
            try:
                row, out = run_case(host, cfg, vae_cfg, precision, placement, device, size, steps, text_tokens)
                first = firsts.setdefault(precision, (placement, out))
                row["equals"] = {"placement": first[0], "bit_for_bit": bool(torch.equal(out, first[1]))}
            except Exception as err:  # one case failing (e.g. out of memory) must not lose the others
                row = {"precision": precision, "placement": placement, "error": f"{type(err).__name__}: {err}"[:400]}
            times.append(case.elapsed_s())
        data["cases"].append(row)
        print(json.dumps(row), flush=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, args.out)
    ok = all("error" not in r and r.get("equals", {}).get("bit_for_bit", True) for r in data["cases"])
    machine = run_folder.host(device=data["device"], torch=torch.__version__)
    run_folder.record(args.out, data["what"], machine, started, __file__, argv)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
