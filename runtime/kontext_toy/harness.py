"""Score a pipeline on the shapes task, and compare several pipelines (speed options) on the same seeds.

A pipeline is anything with Pipeline's `edit(image, prompt, steps=, seed=, guidance=, auto_resize=)` and
`generate(prompt, width=, height=, steps=, seed=, guidance=)`. Sample i runs with seed `seed + i`, every turn of
its drift session too, so two runs with the same arguments see the same noise and give the same numbers. Results
are plain dicts of numbers, strings, lists and None: json.dumps(result, allow_nan=False) works. An identical image
has infinite PSNR; results cap every PSNR at PSNR_CAP (100 dB). At the task's 64 x 64 px, one value off by one gives
10 log10(255^2 * 64 * 64 * 3) = 88 dB, so there the cap changes only identical images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from kontext_rt.errors import InputError
from kontext_toy import metrics, shapes
from kontext_toy.shapes import EDIT_KINDS, EditSample, GenSample

PSNR_CAP = 100.0  # dB, what an identical image counts as in means


def _finite(x: float) -> float | None:
    """A JSON-safe number: PSNR inf -> PSNR_CAP, nan -> None."""
    if x is None or math.isnan(x):
        return None
    return min(float(x), PSNR_CAP)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _kwargs(steps, seed, guidance) -> dict:
    kw = {"steps": steps, "seed": seed}
    if guidance is not None:
        kw["guidance"] = guidance
    return kw


def _edit(pipe, image, instruction, steps, seed, guidance):
    return pipe.edit(image, instruction, auto_resize=False, **_kwargs(steps, seed, guidance))


def _drift_session(pipe, sample: EditSample, turns, steps, seed, guidance, embed) -> dict:
    """`turns` pairs of (recolour, recolour back to the original colour), chained: each edit takes the previous
    output as its context. Drift of the image after each undo against the source."""
    shape = sample.meta["shape"]
    there = sample.instruction
    back = f"make the {shape['kind']} {shape['colour']}"
    images, current = [sample.source], sample.source
    for _ in range(turns):
        current = _edit(pipe, current, there, steps, seed, guidance)
        current = _edit(pipe, current, back, steps, seed, guidance)
        images.append(current)
    return metrics.drift(images, embed)


def _check(samples, steps, seed, drift_turns):
    samples = list(samples)
    if not samples or any(not isinstance(s, (EditSample, GenSample)) for s in samples):
        raise InputError("samples must be a non-empty list of shapes.EditSample / GenSample")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(drift_turns, int) or isinstance(drift_turns, bool) or drift_turns < 0:
        raise InputError(f"drift_turns must be a non-negative integer, got {drift_turns!r}")
    return samples


def _edit_record(s: EditSample, out, perceptual: Callable | None = None) -> dict:
    """One edit's score: its kind and prompt, whether out carries it out, and what out keeps of the rest (with
    perceptual, its distance too, on metrics.kept_only)."""
    kept = metrics.preservation(s, out)
    return {
        "kind": s.kind,
        "prompt": s.instruction,
        "success": metrics.edit_success(s, out),
        "psnr": _finite(kept["psnr"]),
        "ssim": _finite(kept["ssim"]),
        "perceptual": None if perceptual is None else _distance(perceptual(metrics.kept_only(s, out), s.target)),
    }


def _distance(x) -> float | None:
    """A JSON-safe distance: None (no score: metrics.lpips without its package), nan and inf -> None."""
    return None if x is None or not math.isfinite(x) else float(x)


def _run(pipe, samples, steps, seed, guidance, drift_turns, embed, perceptual=None, progress=None):
    """Per-sample records and outputs, then drift sessions over the recolour samples; progress(done, total) after
    each sample."""
    records, outputs, sessions = [], [], []
    for i, s in enumerate(samples):
        if isinstance(s, EditSample):
            out = _edit(pipe, s.source, s.instruction, steps, seed + i, guidance)
            rec = _edit_record(s, out, perceptual)
            if drift_turns and s.kind == "recolour":
                sessions.append(_drift_session(pipe, s, drift_turns, steps, seed + i, guidance, embed))
        else:
            width, height = s.target.size
            out = pipe.generate(s.caption, width=width, height=height, **_kwargs(steps, seed + i, guidance))
            rec = {"kind": s.kind, "prompt": s.caption, "success": metrics.generation_success(s, out)}
        records.append(rec)
        outputs.append(out)
        if progress is not None:
            progress(i + 1, len(samples))
    return records, outputs, sessions


def _aggregate(records, sessions, drift_turns) -> dict:
    edits = [r for r in records if r["kind"] in EDIT_KINDS]
    gens = [r for r in records if r["kind"] not in EDIT_KINDS]
    per_kind = {}
    for kind in EDIT_KINDS:
        rs = [r for r in edits if r["kind"] == kind]
        if rs:
            per_kind[kind] = {"n": len(rs), "success_rate": float(np.mean([r["success"] for r in rs]))}
    drift = None
    if sessions:
        drift = {
            "turns": drift_turns,
            "sessions": len(sessions),
            # mean over sessions of the PSNR to turn 0 after each undo (turn k = 1..turns)
            "psnr": [_mean([_finite(s["psnr"][k]) for s in sessions]) for k in range(drift_turns)],
            "cosine": None
            if sessions[0]["cosine"] is None
            else [_mean([s["cosine"][k] for s in sessions]) for k in range(drift_turns)],
        }
    return {
        "n_edit": len(edits),
        "n_generate": len(gens),
        "edit_success_rate": _mean([float(r["success"]) for r in edits]),
        "per_kind": per_kind,
        "preservation_psnr": _mean([r["psnr"] for r in edits]),
        "preservation_ssim": _mean([r["ssim"] for r in edits]),
        "preservation_perceptual": _mean([r["perceptual"] for r in edits]),
        "generation_success_rate": _mean([float(r["success"]) for r in gens]),
        "drift": drift,
    }


def evaluate(
    pipe,
    samples: Sequence[EditSample | GenSample],
    steps: int = 8,
    seed: int = 0,
    guidance: float | None = None,
    drift_turns: int = 2,
    embed: Callable | None = None,
    per_sample: bool = True,
    perceptual: Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run every sample through pipe and aggregate (progress(done, total): called after each sample):

    edit_success_rate (all edits) and per_kind {kind: {n, success_rate}} (metrics.edit_success);
    preservation_psnr / preservation_ssim: means over the edits of metrics.preservation (outside the edit mask,
    against the target); preservation_perceptual: with perceptual (images (a, b) -> distance; LPIPS is
    functools.partial(metrics.lpips, model=lpips.LPIPS(net="alex")) where the lpips package and its weights are
    installed), the mean distance of metrics.kept_only(sample, output) to the target, else None;
    generation_success_rate (metrics.generation_success, colours only); drift: for each
    recolour sample, `drift_turns` chained (edit, undo) pairs, the mean PSNR to the source after each undo and,
    with embed, the mean cosine similarity of the embeddings (metrics.drift); None without recolour samples or with
    drift_turns=0. guidance None: the pipeline's defaults. per_sample adds each sample's record.
    """
    samples = _check(samples, steps, seed, drift_turns)
    records, _, sessions = _run(pipe, samples, steps, seed, guidance, drift_turns, embed, perceptual, progress)
    result = {"steps": steps, "seed": seed, "guidance": guidance, **_aggregate(records, sessions, drift_turns)}
    if per_sample:
        result["samples"] = records
    return result


def score_split(
    pipe,
    split: str,
    n: int,
    sample_seed: int,
    seed: int,
    steps: int = 8,
    guidance: float | None = None,
    drift_turns: int = 2,
    embed: Callable | None = None,
    per_sample: bool = True,
    ceiling: bool = True,
    size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """A checkpoint's score on one split, as `kontext-rt eval` gives it: the first n samples of
    shapes.dataset(split, n, seed=sample_seed, size=size) through evaluate(...), with the pipeline's autoencoder
    ceiling (autoencoder_ceiling of pipe.vae on pipe.device) under "autoencoder" when there are edits and ceiling."""
    samples = list(shapes.dataset(split, n, seed=sample_seed, size=size))
    result = evaluate(
        pipe,
        samples,
        steps=steps,
        seed=seed,
        guidance=guidance,
        drift_turns=drift_turns,
        embed=embed,
        per_sample=per_sample,
        progress=progress,
    )
    if ceiling and result["n_edit"]:
        result["autoencoder"] = autoencoder_ceiling(pipe.vae, samples, pipe.device)
    return result


def autoencoder_ceiling(vae, samples: Sequence[EditSample | GenSample], device="cpu") -> dict:
    """What an exact prediction of each edit's target latent scores: the exact target through
    vae.decode(vae.encode(.)), scored like an output. A kind the round trip fails is one the transformer would have
    to beat its own autoencoder at. vae: encode / decode of (B, 3, H, W) images in [-1, 1] on `device` (the model's
    AutoEncoder, Pipeline.vae with pipe.device). Returns edit_success_rate, per_kind {kind: {n, success_rate}} and
    preservation_psnr / preservation_ssim, as evaluate's."""
    import torch

    from kontext_rt import image as im

    if not (callable(getattr(vae, "encode", None)) and callable(getattr(vae, "decode", None))):
        raise InputError(f"vae must have encode and decode methods, got {type(vae).__name__}")
    edits = [s for s in _check(samples, 1, 0, 0) if isinstance(s, EditSample)]
    if not edits:
        raise InputError("autoencoder_ceiling needs edit samples")
    records = []
    with torch.no_grad():
        for s in edits:
            width, height = s.target.size
            out = im.to_pil(vae.decode(vae.encode(im.to_tensor(s.target, width, height).to(device))))[0]
            records.append(_edit_record(s, out))
    agg = _aggregate(records, [], 0)
    return {k: agg[k] for k in ("edit_success_rate", "per_kind", "preservation_psnr", "preservation_ssim")}


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a result, flattened to dotted keys (lists by index)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, key + "."))
        elif isinstance(v, list) and all(isinstance(x, (int, float)) or x is None for x in v):
            out.update({f"{key}.{i}": x for i, x in enumerate(v) if x is not None})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def compare(
    configs: Mapping[str, object],
    samples: Sequence[EditSample | GenSample],
    steps: int = 8,
    seed: int = 0,
    guidance: float | None = None,
    drift_turns: int = 2,
    embed: Callable | None = None,
    perceptual: Callable | None = None,
) -> dict:
    """Evaluate several pipelines on the same samples and seeds (embed and perceptual as evaluate's). The first is
    the reference:

    results {name: evaluate's aggregates}; delta {name: {metric: value - reference's value}} over the numeric
    metrics both have (dotted keys, e.g. "per_kind.move.success_rate"; preservation_perceptual is a distance, so
    there a positive delta is worse); output_psnr {name: mean PSNR (dB, capped)
    of each output against the reference's output for the same sample and seed}: how much a speed option changes
    the pixels, whether or not the task is solved.
    """
    if not isinstance(configs, Mapping) or not configs:
        raise InputError("configs must be a non-empty mapping of name -> pipeline")
    samples = _check(samples, steps, seed, drift_turns)
    results, outputs = {}, {}
    for name, pipe in configs.items():
        records, outs, sessions = _run(pipe, samples, steps, seed, guidance, drift_turns, embed, perceptual)
        results[name] = {
            "steps": steps,
            "seed": seed,
            "guidance": guidance,
            **_aggregate(records, sessions, drift_turns),
        }
        outputs[name] = outs
    ref = next(iter(configs))
    ref_numbers = _numbers(results[ref])
    delta, output_psnr = {}, {}
    for name in configs:
        mine = _numbers(results[name])
        delta[name] = {k: mine[k] - ref_numbers[k] for k in ref_numbers if k in mine}
        output_psnr[name] = _mean(
            [_finite(metrics.psnr(a, b)) for a, b in zip(outputs[name], outputs[ref], strict=True)]
        )
    return {"reference": ref, "results": results, "delta": delta, "output_psnr": output_psnr}
