"""Ulysses sequence parallelism timed on the GPUs of one machine: gpu_run's `parallel` phase. Prints one JSON line.

    python benchmarks/gpu/sp_gpu.py                 # every GPU here: ms per Kontext step on 2, 4 and 8 of them
    python benchmarks/gpu/sp_gpu.py --rehearse      # 2 gloo ranks on the CPU, the tiny model: the control flow

First, on any machine, what one GPU can show ("one_rank"): a process group of ONE rank (NCCL on the GPU, gloo on
the CPU) runs the CUDA-graphed loop and the graphed step cache through SequenceParallel, so NCCL's all-to-alls,
all-gathers and the cache's all-reduce are captured in the graphs, against the same graphed loops without
parallelism on the same weights: ms per step of each (the cost of the sequence-parallel plumbing with nothing to
split) and the relative difference of the latents. Then with one GPU it records that there is nothing to split
and returns. With more, for each N in (2, 4, 8) that the GPUs allow, N processes (NCCL, one GPU each) build the
same full-size random transformer (bf16, the triton ops, the hoisted loop: the `hoisted` rung's setting; then
the same graphed, captured per rank), shard the Kontext layout's image tokens over N
(kontext_rt.model.ulysses.SequenceParallel) and time STEPS steps after a warm-up loop; rank 0 also times the
unsharded loop on its own GPU before the group starts, in the same run, as the baseline. Against
benchmarks/gpu/sp_scaling.py's model (docs/python-api.md), which is what this measurement checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # suite_parts, the timer

LAYOUT = (512, 4096, 4096)  # the suite's Kontext layout
REHEARSE_LAYOUT = (4, 4, 4)  # as the suite rehearses (2x2-token images)
WORLDS = (2, 4, 8)  # divisors of FLUX's 24 heads
STEPS, WARMUP = 6, 2
ONE_RANK_STEPS = 4  # the one-rank check: two loops of 4 steps each way, about half a minute on an H100


def _loop(model, ops, dtype, graphed=False, rehearse=False):
    """The hoisted loop over model (a FluxTransformer or a SequenceParallel of one), or its CUDA-graphed one."""
    from kontext_rt.sampling.denoisers import Graphed, Hoisted
    from kontext_rt.sampling.graphs import capture_cuda, capture_eager
    from kontext_rt.sampling.loop import denoise

    denoiser = Hoisted(model, ops, dtype)
    if graphed:
        denoiser = Graphed(model, ops, dtype, capture=capture_eager if rehearse else capture_cuda)
    return lambda x, sigmas, cond: denoise(denoiser, x, sigmas, cond)


def _rank(rank: int, world: int, init_file: str, out: str, rehearse: bool) -> None:
    """One of N ranks: ms per step of the hoisted and the graphed sharded loops (graphs captured per rank)."""
    import torch.distributed as dist

    from kontext_rt.model.ulysses import SequenceParallel

    import suite_parts as parts

    device, cfg, dtype, ops = _setting(rehearse, rank)
    dist.init_process_group("gloo" if rehearse else "nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        model = parts.random_transformer(cfg, device, dtype)  # the same seed on every rank: the same weights
        data = parts.inputs(cfg, REHEARSE_LAYOUT if rehearse else LAYOUT, device, dtype)
        row = {}
        for graphed, key in ((False, ""), (True, "graphed_")):
            run = _loop(SequenceParallel(model, dist.group.WORLD), ops, dtype, graphed, rehearse)
            ms, host = parts.time_loop(run, *data, device, 2 if rehearse else STEPS, 1 if rehearse else 3, WARMUP)
            row |= {f"{key}ms_per_step": ms, f"{key}host_ms_per_step": host}
            del run
            parts.free_memory(device)
        if rank == 0:
            Path(out).write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def _one_rank(rank: int, world: int, init_file: str, out: str, rehearse: bool) -> None:
    """The one-rank check (module docstring), in a process of its own like the ranks of N."""
    import torch.distributed as dist

    from kontext_rt.model.ulysses import SequenceParallel
    from kontext_rt.sampling.denoisers import Graphed
    from kontext_rt.sampling.graphs import capture_cuda, capture_eager
    from kontext_rt.sampling.loop import denoise
    from kontext_rt.sampling.schedule import schedule
    from kontext_rt.sampling.step_cache import FirstBlockCache

    import suite_parts as parts

    device, cfg, dtype, ops = _setting(rehearse)
    dist.init_process_group("gloo" if rehearse else "nccl", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        model = parts.random_transformer(cfg, device, dtype)
        x, cond = parts.inputs(cfg, REHEARSE_LAYOUT if rehearse else LAYOUT, device, dtype)
        sigmas = schedule(ONE_RANK_STEPS, x.shape[1])
        found, latents = {}, {}
        for name, m in (("single", model), ("sequence_parallel", SequenceParallel(model, dist.group.WORLD))):
            graphed = Graphed(m, ops, dtype, capture=capture_eager if rehearse else capture_cuda)
            cache = FirstBlockCache(graphed, 1e30)  # every step after the first skips: all three graphs replay
            latents[name] = denoise(graphed, x, sigmas, cond), denoise(cache, x, sigmas, cond)
            run = lambda x, sigmas, cond, g=graphed: denoise(g, x, sigmas, cond)  # noqa: E731
            ms, host = parts.time_loop(run, x, cond, device, ONE_RANK_STEPS, 1 if rehearse else 2, WARMUP)
            captures = graphed.graphs.captures + graphed.cache_graphs.captures
            found[name] = {"graphed_ms_per_step": ms, "host_ms_per_step": host, "captures": captures}
            del graphed, cache, run
            parts.free_memory(device)
        for i, what in enumerate(("graphed", "step_cache")):
            a, b = latents["sequence_parallel"][i], latents["single"][i]
            found[f"{what}_rel_diff"] = ((a - b).norm() / b.norm()).item()
        found["plumbing_x"] = found["sequence_parallel"]["graphed_ms_per_step"] / found["single"]["graphed_ms_per_step"]
        Path(out).write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def _setting(rehearse: bool, rank: int = 0):
    """(device, config, dtype, op table) of a rank's process: the tiny model on the CPU when rehearsing."""
    from kontext_rt.backends import resolve
    from kontext_rt.config import PRESETS

    device = "cpu" if rehearse else f"cuda:{rank}"
    if not rehearse:
        torch.cuda.set_device(rank)
    dtype = torch.float32 if rehearse else torch.bfloat16
    cfg = PRESETS["tiny" if rehearse else "flux-kontext-dev"]
    return device, cfg, dtype, resolve("eager" if rehearse else "triton", device).ops


def _spawned(fn, n: int, rehearse: bool) -> dict:
    """fn run as n spawned ranks; what rank 0 wrote."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="kontext-rt-sp-") as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(fn, args=(n, os.path.join(tmp, "init"), out, rehearse), nprocs=n)
        return json.loads(Path(out).read_text())


def _single(rehearse: bool) -> float:
    """The unsharded loop on GPU 0 (the baseline, in the same run)."""
    import suite_parts as parts

    device, cfg, dtype, ops = _setting(rehearse)
    model = parts.random_transformer(cfg, device, dtype)
    data = parts.inputs(cfg, REHEARSE_LAYOUT if rehearse else LAYOUT, device, dtype)
    run = _loop(model, ops, dtype)
    ms, _ = parts.time_loop(run, *data, device, 2 if rehearse else STEPS, 1 if rehearse else 3, WARMUP)
    del model, run, data
    parts.free_memory(device)
    return ms


def measure(rehearse: bool) -> dict:
    gpus = 0 if rehearse else torch.cuda.device_count()
    found = {"gpus": gpus, "rehearse": rehearse, "layout": REHEARSE_LAYOUT if rehearse else LAYOUT}
    found["one_rank"] = _spawned(_one_rank, 1, rehearse)
    worlds = (2,) if rehearse else tuple(n for n in WORLDS if n <= gpus)
    if not worlds:
        return found | {"ran": False, "why": f"{gpus} GPU(s) here: sequence parallelism needs at least 2"}
    found["single_ms_per_step"] = _single(rehearse)
    found["ran"], found["worlds"] = True, {}
    for n in worlds:
        row = _spawned(_rank, n, rehearse)
        row["speedup"] = found["single_ms_per_step"] / row["ms_per_step"]
        found["worlds"][str(n)] = row
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rehearse", action="store_true", help="2 gloo ranks on the CPU (times nothing of a GPU)")
    args = ap.parse_args(argv)
    if not args.rehearse and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --rehearse checks the control flow on the CPU", file=sys.stderr)
        return 2
    print(json.dumps(measure(args.rehearse)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
