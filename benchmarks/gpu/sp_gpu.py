"""Ulysses sequence parallelism timed on the GPUs of one machine: gpu_run's `parallel` phase. Prints one JSON line.

    python benchmarks/gpu/sp_gpu.py                 # every GPU here: ms per Kontext step on 2, 4 and 8 of them
    python benchmarks/gpu/sp_gpu.py --rehearse      # 2 gloo ranks on the CPU, the tiny model: the control flow

With one GPU (today's machines) it records that and returns: there is nothing to split. With more, for each N in
(2, 4, 8) that the GPUs allow, N processes (NCCL, one GPU each) build the same full-size random transformer (bf16,
the triton ops, the hoisted loop: the `hoisted` rung's setting), shard the Kontext layout's image tokens over N
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


def _loop(model, ops, dtype):
    from kontext_rt.sampling.denoisers import Hoisted
    from kontext_rt.sampling.loop import denoise

    denoiser = Hoisted(model, ops, dtype)
    return lambda x, sigmas, cond: denoise(denoiser, x, sigmas, cond)


def _rank(rank: int, world: int, init_file: str, out: str, rehearse: bool) -> None:
    import torch.distributed as dist

    from kontext_rt.backends import resolve
    from kontext_rt.config import PRESETS
    from kontext_rt.model.ulysses import SequenceParallel

    import suite_parts as parts

    device = "cpu" if rehearse else f"cuda:{rank}"
    if not rehearse:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if rehearse else "nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        cfg = PRESETS["tiny" if rehearse else "flux-kontext-dev"]
        dtype = torch.float32 if rehearse else torch.bfloat16
        ops = resolve("eager" if rehearse else "triton", device).ops
        model = parts.random_transformer(cfg, device, dtype)  # the same seed on every rank: the same weights
        data = parts.inputs(cfg, REHEARSE_LAYOUT if rehearse else LAYOUT, device, dtype)
        run = _loop(SequenceParallel(model, dist.group.WORLD), ops, dtype)
        ms, host = parts.time_loop(run, *data, device, 2 if rehearse else STEPS, 1 if rehearse else 3, WARMUP)
        if rank == 0:
            Path(out).write_text(json.dumps({"ms_per_step": ms, "host_ms_per_step": host}))
    finally:
        dist.destroy_process_group()


def _single(rehearse: bool) -> float:
    """The unsharded loop on GPU 0 (the baseline, in the same run)."""
    from kontext_rt.backends import resolve
    from kontext_rt.config import PRESETS

    import suite_parts as parts

    device = "cpu" if rehearse else "cuda:0"
    cfg = PRESETS["tiny" if rehearse else "flux-kontext-dev"]
    dtype = torch.float32 if rehearse else torch.bfloat16
    model = parts.random_transformer(cfg, device, dtype)
    data = parts.inputs(cfg, REHEARSE_LAYOUT if rehearse else LAYOUT, device, dtype)
    run = _loop(model, resolve("eager" if rehearse else "triton", device).ops, dtype)
    ms, _ = parts.time_loop(run, *data, device, 2 if rehearse else STEPS, 1 if rehearse else 3, WARMUP)
    del model, run, data
    parts.free_memory(device)
    return ms


def measure(rehearse: bool) -> dict:
    import torch.multiprocessing as mp

    gpus = 0 if rehearse else torch.cuda.device_count()
    found = {"gpus": gpus, "rehearse": rehearse, "layout": REHEARSE_LAYOUT if rehearse else LAYOUT}
    worlds = (2,) if rehearse else tuple(n for n in WORLDS if n <= gpus)
    if not worlds:
        return found | {"ran": False, "why": f"{gpus} GPU(s) here: sequence parallelism needs at least 2"}
    found["single_ms_per_step"] = _single(rehearse)
    found["ran"], found["worlds"] = True, {}
    for n in worlds:
        with tempfile.TemporaryDirectory(prefix="kontext-rt-sp-") as tmp:
            out = os.path.join(tmp, "rank0.json")
            mp.spawn(_rank, args=(n, os.path.join(tmp, "init"), out, rehearse), nprocs=n)
            row = json.loads(Path(out).read_text())
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
