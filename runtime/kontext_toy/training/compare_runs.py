"""Score training runs side by side on larger draws than a run's own log, and write one comparison record.

Each checkpoint is scored with the samples, seeds and settings of `kontext-rt eval --checkpoint DIR --split SPLIT
--n N --seed SEED` (fp32, eager, `--steps` and `--turns` as the bar's), on one thread (eval gives the same numbers to
the last digit when it runs on one thread too): the same samples (shapes.dataset(SPLIT, N, seed=SEED + 1)), sample i
denoised with seed SEED + i, on both splits, with the autoencoder's ceiling (the exact answers through the
checkpoint's VAE alone). Then the same samples again with sample i denoised with OTHER_SEED + i instead: two noise
draws of one sample set say how much of a difference between runs is the noise. The record names each checkpoint's
weights by sha256 (the transformer's and the VAE's, as train_log.json's `written_sha256` does).

    python -m kontext_toy.training.compare_runs --why "run 4 against its rerun" \\
        --run run4 /work/runs/G "run 4 as shipped" --run run4-rerun /work/runs/G2 "its rerun" \\
        -o runtime/kontext_toy/records/small-kontext-run4-replicate-comparison.json

--jobs scores that many (checkpoint, split, noise) cells at once, one process and one thread each; a cell that fails
stops the rest. Nothing is written but the output, and only once every cell is scored. The weights are hashed
before scoring and again after it: a checkpoint rewritten meanwhile is refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import shlex
import sys
import time
from pathlib import Path

from kontext_rt.cli_args import UsageError, check_writable, nonneg_int, positive_int, write_atomically
from kontext_toy import bar, shapes

SUMMARY = ("n_edit", "edit_success_rate", "per_kind", "preservation_psnr", "preservation_ssim")
FULL = (*SUMMARY, "generation_success_rate", "drift")


def score(folder: str, split: str, n: int, sample_seed: int, seed: int, steps: int, turns: int, ceiling: bool):
    """One cell: harness.score_split on one thread, as eval scores (a worker process's whole job; importable by
    name)."""
    import torch

    from kontext_rt import Pipeline
    from kontext_toy import harness, metrics

    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, backend="eager")
    result = harness.score_split(
        pipe,
        split,
        n,
        sample_seed=sample_seed,
        seed=seed,
        steps=steps,
        drift_turns=turns,
        embed=metrics.scene_embedding,
        per_sample=False,
        ceiling=ceiling,
    )
    out = {k: result[k] for k in FULL}
    if ceiling:
        out["autoencoder"] = result["autoencoder"]
    return out


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "DIR", "WHAT"),
        help="a checkpoint (diffusers folder) to score, its name in the record and what it is; repeat",
    )
    p.add_argument("--why", required=True, help="what the comparison is for (the record says it)")
    p.add_argument("-o", "--output", required=True, help="the comparison record (.json)")
    p.add_argument(
        "--n", type=positive_int, default=150, help="samples per split, edit kinds and captions in turn (150)"
    )
    p.add_argument(
        "--seed", type=nonneg_int, default=10, help="sample i denoised with seed + i; samples: seed + 1 (10)"
    )
    p.add_argument("--other-seed", type=nonneg_int, default=0, help="the second noise draw: other-seed + i (0)")
    p.add_argument("--jobs", type=positive_int, default=1, help="cells scored at once, one process each (1)")
    args = p.parse_args(argv)
    names = [name for name, _, _ in args.run]
    if len(set(names)) != len(names):
        p.error(f"--run: each NAME once, got {', '.join(names)}")
    for name, folder, _ in args.run:
        if not (Path(folder) / "model_index.json").is_file():
            p.error(f"--run {name}: {folder} is not a diffusers folder (no model_index.json)")
    out = Path(args.output)
    if out.suffix.lower() != ".json" or not out.parent.is_dir() or out.is_dir():
        p.error(f"--output {out}: a .json file in a folder that exists")
    try:
        check_writable(out.parent, f"--output {out}")
    except UsageError as e:
        p.error(str(e))
    if args.other_seed == args.seed:
        p.error("--other-seed: a seed other than --seed (the point is a second noise draw)")
    if max(args.seed, args.other_seed) + args.n > 2**64 - 1:
        p.error("--seed, --other-seed: sample i runs with seed + i, at most 2**64-1-n")
    return args


def score_all(args, steps: int, turns: int) -> dict:
    """{(name, split, noise seed): score(...)} for every run, split and noise draw, args.jobs processes at once."""
    folders = {name: folder for name, folder, _ in args.run}
    cells = [
        (name, split, seed) for name in folders for seed in (args.seed, args.other_seed) for split in shapes.SPLITS
    ]
    t0, results = time.perf_counter(), {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for name, split, seed in cells:
            job = (folders[name], split, args.n, args.seed + 1, seed, steps, turns, seed == args.seed)
            futures[pool.submit(score, *job)] = (name, split, seed)
        try:
            for future in concurrent.futures.as_completed(futures):
                name, split, seed = futures[future]
                r = results[(name, split, seed)] = future.result()
                print(
                    f"{name} {split} noise {seed}: edits {r['edit_success_rate']}, kept {r['preservation_psnr']} "
                    f"dB ({len(results)} of {len(cells)}, {time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                )
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return results


def main(argv=None) -> int:
    args = parse(argv)
    from kontext_toy.training.train import weights_sha256  # beside this script

    steps, turns = bar.SETTINGS["steps"], bar.SETTINGS["drift_turns"]
    t0 = time.perf_counter()
    digests = {name: {p: weights_sha256(Path(f), p) for p in ("transformer", "vae")} for name, f, _ in args.run}
    results = score_all(args, steps, turns)
    for name, folder, _ in args.run:
        if {p: weights_sha256(Path(folder), p) for p in digests[name]} != digests[name]:
            raise SystemExit(f"--run {name}: {folder}'s weights changed while it was scored; nothing written")
    settings = {"n": args.n, "sample_seed": args.seed + 1, "seed": args.seed, "other_seed": args.other_seed}
    settings.update(steps=steps, drift_turns=turns, dtype="fp32", backend="eager", threads=1)
    record = {
        "command": "python -m kontext_toy.training.compare_runs " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": settings,
        "why": args.why,
        "runs": {
            name: {
                "what": what,
                "sha256": digests[name],
                **{split: results[(name, split, args.seed)] for split in shapes.SPLITS},
            }
            for name, folder, what in args.run
        },
        "same_samples_other_noise": {
            "note": f"the same {args.n} samples per split, sample i denoised with seed {args.other_seed} + i "
            f"instead of {args.seed} + i",
            "runs": {
                name: {
                    split: {k: results[(name, split, args.other_seed)][k] for k in SUMMARY} for split in shapes.SPLITS
                }
                for name, _, _ in args.run
            },
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(record, indent=1, allow_nan=False)
    write_atomically(Path(args.output), lambda tmp: tmp.write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
