"""This runtime vs diffusers' FluxKontextPipeline on the same weights, in the same process: one thread, fp32.

    python benchmarks/e2e/bench_pipeline.py --pairs 15     # -> benchmarks/results/cpu-<n>core-pipeline-<date>/
    python -m pytest benchmarks/e2e/bench_pipeline.py --benchmark-only --benchmark-group-by=group   # the same cases

Model: a tiny checkpoint in the diffusers layout (kontext_toy.checkpoints: the tiny VAE and text encoders) whose
transformer is 2 double + 4 single blocks, width 256 (4 heads of 64), random weights; 64 text + 256 target + 256
context tokens (a 256x256 image), 4 steps.
Cases, each as its pipeline runs it:
  edit       a whole edit: prompt encode (the text cache is off), context VAE encode, 4 steps, VAE decode, PIL out
  forward    one transformer call over the Kontext sequence (ours builds its RoPE table inside the timed call, as
             diffusers builds its rotary embedding)
  vae_encode PIL -> tensor -> VAE encode (posterior mean, scaled and shifted) -> packed tokens
  vae_decode packed tokens -> unpack -> VAE decode -> PIL

The script runs the two implementations alternately (pair i: ours then diffusers for even i, diffusers then ours
for odd i, so a drift in machine load hits both), records wall and CPU time (process_time: time this process spent
on a core, page faults included, waiting for a core excluded) of every run, and reports per case the medians and
the speed ratio diffusers/ours (above 1: this runtime is faster), as the median of the per-pair ratios with their
interquartile range and min/max. It records the CPU model, torch and diffusers versions, the thread count and the
load average at start and end: on a shared machine the wall figures carry other processes' load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_rt import Pipeline
from kontext_rt import image as im
from kontext_rt.config import PRESETS, VAE_PRESETS
from kontext_rt.model.rope import rope_table, sequence_ids
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_toy.checkpoints import write_diffusers_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the timer and the results' run folders, by plain name
import run_folder  # noqa: E402
from timing import quartiles, timed  # noqa: E402

TEXT, SIDE, STEPS, GUIDANCE = 64, 256, 4, 2.5  # 64 text tokens; 256x256 -> 16x16 = 256 target + 256 context tokens
PROMPT = "make it red"
CASES = ("edit", "forward", "vae_encode", "vae_decode")
TRANSFORMER = dict(  # as diffusers' FluxTransformer2DModel names it (the record's "setup")
    attention_head_dim=64, num_attention_heads=4, axes_dims_rope=(8, 28, 28), num_layers=2, num_single_layers=4
)
CONFIG = dataclasses.replace(  # the same transformer in this runtime's terms: the tiny preset, widened and deepened
    PRESETS["tiny"],
    hidden_size=TRANSFORMER["attention_head_dim"] * TRANSFORMER["num_attention_heads"],
    num_heads=TRANSFORMER["num_attention_heads"],
    axes_dim=TRANSFORMER["axes_dims_rope"],
    depth=TRANSFORMER["num_layers"],
    depth_single_blocks=TRANSFORMER["num_single_layers"],
)


def build_checkpoint(folder: Path) -> Path:
    """A diffusers folder (guidance-distilled, Kontext's scheduler) holding the width-256, 2+4 block transformer,
    the tiny VAE and the tiny text encoders, with random weights: the speed of a call does not depend on them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer, vae = FluxTransformer(CONFIG), AutoEncoder(VAE_PRESETS["tiny"])
    write_diffusers_checkpoint(folder, transformer, vae, seed=0)
    return folder


def make_cases(ckpt: Path) -> dict[str, dict]:
    """case -> {"kontext-rt": fn, "diffusers": fn}; every fn runs one timed call and returns its output."""
    from diffusers import FluxKontextPipeline

    pipe = Pipeline.from_pretrained(ckpt, text_cache_size=0, max_sequence_length=TEXT)
    ref = FluxKontextPipeline.from_pretrained(ckpt, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, (SIDE // 16) ** 2, 64, generator=g)
    return {
        "edit": _edit_case(pipe, ref, img, lat),
        "forward": _forward_case(pipe, ref, lat, g),
        **_vae_cases(pipe, ref, img, lat),
    }


def _inference(fn):
    def call():
        with torch.inference_mode():
            return fn()

    return call


def _edit_case(pipe, ref, img, lat) -> dict:
    """A whole edit through each pipeline, from the same initial latents."""

    def ours_edit():
        return pipe.edit(img, PROMPT, steps=STEPS, guidance=GUIDANCE, auto_resize=False, latents=lat)

    def ref_edit():
        return ref(
            image=img,
            prompt=PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=lat,
            max_area=SIDE * SIDE,
            _auto_resize=False,
            height=SIDE,
            width=SIDE,
            max_sequence_length=TEXT,
        ).images[0]

    return {"kontext-rt": ours_edit, "diffusers": ref_edit}


def _forward_case(pipe, ref, lat, g) -> dict:
    """One transformer call over the Kontext sequence; the context, text and pooled inputs drawn from `g`."""
    rows = cols = SIDE // 16
    n = rows * cols
    tr, rtr = pipe.transformer, ref.transformer
    ctx = torch.randn(1, n, 64, generator=g)
    txt = torch.randn(1, TEXT, tr.cfg.context_in_dim, generator=g)
    pooled = torch.randn(1, tr.cfg.vec_in_dim, generator=g)
    ids = sequence_ids(TEXT, [(rows, cols), (rows, cols)])
    t, gd = torch.tensor([0.5]), torch.tensor([GUIDANCE])

    def ours_forward():
        cos, sin = rope_table(ids, tr.cfg.axes_dim, tr.cfg.theta)
        return tr(lat, ctx, txt, pooled, t, gd, cos, sin)  # the eager op table; one step's modulation inside

    def ref_forward():
        out = rtr(
            hidden_states=torch.cat([lat, ctx], 1),
            encoder_hidden_states=txt,
            pooled_projections=pooled,
            timestep=t,
            img_ids=ids[TEXT:],
            txt_ids=ids[:TEXT],
            guidance=gd,
            return_dict=False,
        )[0]
        return out[:, :n]

    return {"kontext-rt": _inference(ours_forward), "diffusers": _inference(ref_forward)}


def _vae_cases(pipe, ref, img, lat) -> dict:
    """vae_encode (PIL -> packed tokens) and vae_decode (packed tokens -> PIL), each as its pipeline does it."""
    rows = cols = SIDE // 16
    vcfg = ref.vae.config

    def ours_encode():
        return im.pack(pipe.vae.encode(im.to_tensor(img, SIDE, SIDE)))

    def ref_encode():
        x = ref.image_processor.preprocess(img, SIDE, SIDE)
        z = (ref.vae.encode(x).latent_dist.mode() - vcfg.shift_factor) * vcfg.scaling_factor
        return ref._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])

    def ours_decode():
        return im.to_pil(pipe.vae.decode(im.unpack(lat, rows, cols)))[0]

    def ref_decode():
        z = ref._unpack_latents(lat, SIDE, SIDE, ref.vae_scale_factor)
        y = ref.vae.decode(z / vcfg.scaling_factor + vcfg.shift_factor, return_dict=False)[0]
        return ref.image_processor.postprocess(y, output_type="pil")[0]

    return {
        "vae_encode": {"kontext-rt": _inference(ours_encode), "diffusers": _inference(ref_encode)},
        "vae_decode": {"kontext-rt": _inference(ours_decode), "diffusers": _inference(ref_decode)},
    }


# ---- script: interleaved pairs -> JSON ----------------------------------------------------------------------------


def measure(fns: dict, pairs: int, warmup: int) -> dict:
    """Interleaved runs of the two implementations; per-pair ratios diffusers/ours of wall and CPU time."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs = {name: {"wall_s": [], "cpu_s": []} for name in fns}
    for i in range(pairs):
        order = ("kontext-rt", "diffusers") if i % 2 == 0 else ("diffusers", "kontext-rt")
        for name in order:
            sample = timed(fns[name])[1]
            runs[name]["wall_s"].append(sample.wall_ms / 1e3)
            runs[name]["cpu_s"].append(sample.cpu_ms / 1e3)
    out = {name: {k: {**quartiles(v), "runs": v} for k, v in r.items()} for name, r in runs.items()}
    for k in ("wall_s", "cpu_s"):
        ratios = [d / o for o, d in zip(runs["kontext-rt"][k], runs["diffusers"][k], strict=True)]
        out[f"speed_ratio_{k[:-2]}"] = quartiles(ratios)
    return out


def machine() -> dict:
    import diffusers

    return {
        "cpu_model": run_folder.host()["cpu"],
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        **run_folder.git_state(ROOT),  # commit, dirty
    }


BUSY_LOAD = 1.5  # this process keeps one core busy: a 1-minute load average above this means other work ran


def _load_note(start, end) -> str:
    """What the load averages say about the measurement (cpu_s excludes time waiting for a core, wall_s not)."""
    if max(start[0], end[0]) > BUSY_LOAD:
        return (
            f"busy machine: other processes ran during the measurement (1-minute load {start[0]:.1f} -> "
            f"{end[0]:.1f}); cpu_s excludes time spent waiting for a core, wall_s does not"
        )
    return f"quiet machine: 1-minute load {start[0]:.1f} -> {end[0]:.1f}, about this process alone"


def _summary(case: str, r: dict) -> str:
    """One line per case: both medians and the two speed ratios with their interquartile ranges."""
    return (
        f"{case:11s} ours {r['kontext-rt']['wall_s']['median'] * 1e3:8.1f} ms  diffusers "
        f"{r['diffusers']['wall_s']['median'] * 1e3:8.1f} ms  wall ratio "
        f"{r['speed_ratio_wall']['median']:.3f}x (IQR {r['speed_ratio_wall']['q1']:.3f}-"
        f"{r['speed_ratio_wall']['q3']:.3f})  cpu ratio {r['speed_ratio_cpu']['median']:.3f}x (IQR "
        f"{r['speed_ratio_cpu']['q1']:.3f}-{r['speed_ratio_cpu']['q3']:.3f})"
    )


def _setup(args) -> dict:
    """The record's "setup": what was measured, at which sizes, how often."""
    return {
        "dtype": "float32",
        "device": "cpu",
        "threads": 1,
        "text_tokens": TEXT,
        "image": [SIDE, SIDE],
        "target_tokens": (SIDE // 16) ** 2,
        "context_tokens": (SIDE // 16) ** 2,
        "steps": STEPS,
        "transformer": TRANSFORMER,
        "hidden_size": 256,
        "pairs": args.pairs,
        "warmup": args.warmup,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=15, help="interleaved (ours, diffusers) pairs per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each implementation first")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/cpu-<n>core-pipeline-<date>/)")
    args = p.parse_args(argv)
    args.out = run_folder.check_out(
        args.out or run_folder.default_path(f"cpu-{os.cpu_count()}core", "pipeline", "pipeline.json")
    )
    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        p.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    if args.pairs < 2:
        p.error("--pairs must be at least 2 (quartiles need two pairs)")
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory() as tmp:
        fns = make_cases(build_checkpoint(Path(tmp)))
        results = {}
        for case in cases:
            results[case] = measure(fns[case], args.pairs, args.warmup)
            print(_summary(case, results[case]), flush=True)
    record = {
        "what": "kontext-rt vs diffusers FluxKontextPipeline, same weights, same process; speed_ratio = "
        "diffusers time / kontext-rt time per interleaved pair (above 1: kontext-rt faster)",
        "setup": _setup(args),
        "machine": {
            **machine(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "note": _load_note(load_start, os.getloadavg()),
        },
        "started": started,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    host = run_folder.host(torch=torch.__version__, threads=1)
    run_folder.record(args.out, record["what"], host, started, __file__, argv)
    print(f"wrote {args.out} (load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f})")


# ---- pytest-benchmark: the same cases -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_cases(build_checkpoint(tmp_path_factory.mktemp("bench")))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["kontext-rt", "diffusers"])
@pytest.mark.parametrize("case", CASES)
def test_pipeline(benchmark, cases, case, impl):
    benchmark.group = case
    assert benchmark(cases[case][impl]) is not None


if __name__ == "__main__":
    main()
