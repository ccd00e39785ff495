"""The step cache (sampling/step_cache.py): off is today's loop bit for bit, its counts follow its rule (a batch
decides on its largest row), a skipped step is the first block's output plus the cached residual of the others,
against a float64 computation made here from the model's own modules called one by one (not the cached code path),
and its three CUDA graphs (with the capture stand-in) are the eager cache bit for bit."""

import copy

import pytest
import torch

from kontext_rt import Pipeline, Request, RunReport
from kontext_rt.errors import InputError
from kontext_rt.model.op_table import EAGER_OPS
from kontext_rt.sampling import step_cache
from kontext_rt.sampling.denoisers import Graphed, Hoisted, PerStep
from kontext_rt.sampling.graphs import capture_eager
from kontext_rt.sampling.loop import denoise
from kontext_rt.sampling.schedule import schedule
from kontext_rt.sampling.step_cache import FirstBlockCache
from kontext_rt.transformer_placement import OnePass
from kontext_rt.weights.formats import detect
from tests.float64_reference import rel_err
from tests.test_hoisting import conditioning

HUGE = 1e30  # every step after the first skips


@pytest.fixture(scope="module")
def model(kontext_dir):
    return detect(kontext_dir).load_transformer(torch.float32, "cpu")


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    return Pipeline.from_pretrained(kontext_dir, backend="eager")


@pytest.fixture
def picture_path(tmp_path):
    from PIL import Image

    path = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (200, 30, 30)).save(path)
    return path


def _inputs(cfg, batch=2, steps=5, grids=((3, 4), (2, 3)), seed=3):
    gen = torch.Generator().manual_seed(seed)
    cond = conditioning(cfg, batch, 7, list(grids), torch.float32, gen)
    n = grids[0][0] * grids[0][1]
    return torch.randn(batch, n, 64, generator=gen), schedule(steps, n, True), cond


# ---- off: today's pixels, bit for bit --------------------------------------------------------------------------


@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_off_is_the_run_without_the_option_bit_for_bit(pipe, off):
    kwargs = dict(steps=4, seed=11, output="latent")
    want = pipe.generate("a red square", width=48, height=32, **kwargs)
    report = RunReport()
    got = pipe.generate("a red square", width=48, height=32, step_cache=off, report=report, **kwargs)
    assert torch.equal(got, want)
    assert (report.model_calls, report.cached_steps) == (4, 0)


@pytest.mark.parametrize("hoist", [True, False])
def test_a_cache_that_never_skips_is_the_plain_loop_bit_for_bit(model, hoist):
    """Threshold 0 through the cached loop itself (the pipeline never builds it for 0): the split forward
    (first_block, remaining_blocks, output) is the model's velocity, op for op."""
    x, sigmas, cond = _inputs(model.cfg)
    plain = Hoisted(model, EAGER_OPS, torch.float32) if hoist else PerStep.of_model(model, EAGER_OPS, torch.float32)
    cached = FirstBlockCache(plain, 0.0)
    assert torch.equal(denoise(cached, x, sigmas, cond), denoise(plain, x, sigmas, cond))
    assert (cached.model_calls, cached.cached_steps) == (5, 0)


# ---- counts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold,calls", [(0, 6), (HUGE, 1)])
def test_model_calls_and_cached_steps(pipe, picture_path, threshold, calls):
    report = RunReport()
    pipe.edit(picture_path, "make it blue", steps=6, seed=1, step_cache=threshold, report=report, output="latent")
    assert (report.steps, report.model_calls, report.cached_steps) == (6, calls, 6 - calls)


def test_requests_of_other_thresholds_are_not_one_batch(pipe):
    """The decision is the batch's (every row skips or none): only requests of one threshold share a loop."""
    keys = [pipe.batch_key(Request("x", steps=2, width=32, height=32, step_cache=t)) for t in (None, 0, 0.1, 0.2)]
    assert keys[0] == keys[1] and len({keys[1], keys[2], keys[3]}) == 3


# ---- a skipped step against float64 ----------------------------------------------------------------------------


def _hidden64(m, img, cond, mod):
    """(first block's output, last hidden state) of the target tokens, the model's modules called one by one."""
    n, mods = img.shape[1], mod.split(m.mod_widths, -1)
    x, txt = m.img_in(torch.cat((img, cond.ctx), 1)), m.txt_in(cond.txt)
    x, txt = m.double_blocks[0](x, txt, mods[0], mods[1], cond.cos, cond.sin, EAGER_OPS)
    first = x[:, :n]
    for i in range(1, len(m.double_blocks)):
        x, txt = m.double_blocks[i](x, txt, mods[2 * i], mods[2 * i + 1], cond.cos, cond.sin, EAGER_OPS)
    t, depth = txt.shape[1], len(m.double_blocks)
    x = torch.cat((txt, x), 1)
    for i, block in enumerate(m.single_blocks):
        x = block(x, mods[2 * depth + i], cond.cos, cond.sin, EAGER_OPS)
    return first, x[:, t : t + n]


@pytest.mark.parametrize("k", [1, 3])
def test_a_skipped_step_is_the_first_block_plus_the_cached_residual(model, k):
    x, sigmas, cond = _inputs(model.cfg)
    m64 = copy.deepcopy(model).double()
    c64 = copy.copy(cond)
    c64.ctx, c64.txt, c64.pooled = cond.ctx.double(), cond.txt.double(), cond.pooled.double()
    cached = FirstBlockCache(Hoisted(model, EAGER_OPS, torch.float32), HUGE)
    states, velocities = [x], []
    with cached.prepare(sigmas, cond, x) as velocity:
        for i in range(k + 1):
            velocities.append(velocity(i, states[-1]))
            states.append(states[-1] + (sigmas[i + 1] - sigmas[i]) * velocities[-1])  # Euler, the default solver
    assert (cached.model_calls, cached.cached_steps) == (1, k)

    timesteps = sigmas[:-1, None].expand(-1, x.shape[0])
    mods64 = m64.modulation_table(timesteps, cond.guidance, c64.pooled)
    first0, hidden0 = _hidden64(m64, states[0].double(), c64, mods64[0])
    rest = hidden0 - first0  # the remaining blocks' residual at step 0, the last full step
    xk = states[k].double()  # step k's input, from the cached run
    firstk, hiddenk = _hidden64(m64, xk, c64, mods64[k])
    final = mods64[k].split(m64.mod_widths, -1)[-1]
    want = m64.final_layer(firstk + rest, final, EAGER_OPS)  # the skipped step's velocity

    # the tolerance: float32's own error on a full step's velocity from the same state, against its float64 one
    plain = Hoisted(model, EAGER_OPS, torch.float32)
    with plain.prepare(sigmas, cond, x) as full_velocity:
        full32 = full_velocity(k, states[k])
    full64 = m64.final_layer(hiddenk, final, EAGER_OPS)
    noise = rel_err(full32, full64)
    assert noise > 0
    assert rel_err(velocities[k], want) <= 2 * noise, (rel_err(velocities[k], want), noise)
    assert rel_err(full64, want) > 100 * noise  # the skip is a real approximation, far from the full step


# ---- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_a_bad_threshold_is_refused_before_any_work(pipe, bad):
    report = RunReport()
    with pytest.raises(InputError, match="step_cache must be a finite number >= 0"):
        pipe.generate("x", width=32, height=32, steps=2, step_cache=bad, report=report)
    assert report.timings == {}  # nothing encoded


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True])
def test_the_cache_itself_refuses_what_the_pipeline_refuses(model, bad):
    with pytest.raises(InputError, match="step_cache must be a finite number >= 0"):
        FirstBlockCache(Hoisted(model, EAGER_OPS, torch.float32), bad)


def test_engines_and_streamed_blocks_take_no_step_cache(model):
    engine = PerStep(lambda *args: None, torch.float32)  # what the TensorRT backend runs
    streamed = OnePass(Hoisted(model, EAGER_OPS, torch.float32), None)  # a placement that streams the blocks
    for denoiser, name in ((engine, "PerStep"), (streamed, "OnePass")):
        with pytest.raises(InputError, match=rf"runs {name}\): .*TensorRT engine .* streamed placement"):
            FirstBlockCache(denoiser, 0.1)
    FirstBlockCache(Graphed(model, EAGER_OPS, torch.float32, capture=capture_eager), 0.1)  # graphs take it


# ---- the batch decides on its largest row ---------------------------------------------------------------------


def _record_steps(pipe, monkeypatch) -> list[dict]:
    """One record per step of the pipeline's cached loop: its rows' deltas (none at step 0) and whether the blocks
    after the first ran, on how many rows."""
    steps, m = [], pipe.transformer
    first_block, remaining_blocks, relative_l1 = m.first_block, m.remaining_blocks, step_cache.relative_l1

    def first(*args, **kwargs):
        steps.append(dict(deltas=None, full_rows=None))
        return first_block(*args, **kwargs)

    def rest(block, *args, **kwargs):
        steps[-1]["full_rows"] = block.x.shape[0]
        return remaining_blocks(block, *args, **kwargs)

    def l1(now, last):
        steps[-1]["deltas"] = relative_l1(now, last)
        return steps[-1]["deltas"]

    monkeypatch.setattr(m, "first_block", first)
    monkeypatch.setattr(m, "remaining_blocks", rest)
    monkeypatch.setattr(step_cache, "relative_l1", l1)
    return steps


def test_a_batch_skips_a_step_together_iff_its_largest_delta_is_under_the_threshold(pipe, monkeypatch):
    def run(threshold):
        requests = [
            Request(prompt, width=48, height=32, steps=6, seed=seed, step_cache=threshold)
            for prompt, seed in (("a red square", 1), ("a blue circle on grass", 2))
        ]
        reports = [RunReport(), RunReport()]
        steps.clear()
        pipe.run_batch(requests, reports)
        return reports

    steps = _record_steps(pipe, monkeypatch)
    run(1e-9)  # every step in full: step 1's deltas do not depend on the threshold (step 0 always runs in full)
    lo, hi = sorted(steps[1]["deltas"].tolist())
    assert lo < hi, "the two requests' rows must change by different amounts"
    threshold = (lo + 3 * hi) / 4  # over the rows' mean and min, under their max: only the max runs step 1 in full
    reports = run(threshold)

    assert len(steps) == 6 and steps[0]["deltas"] is None and steps[0]["full_rows"] == 2
    cached = [s["deltas"].max().item() < threshold for s in steps[1:]]
    for s, skip in zip(steps[1:], cached, strict=True):
        assert s["full_rows"] == (None if skip else 2)  # every row skips, or every row runs all blocks
    assert not cached[0] and steps[1]["deltas"].min().item() < threshold  # decided by the max
    assert any(cached), "some step must skip for the test to see rows skip together"
    for report in reports:
        assert (report.model_calls, report.cached_steps) == (1 + cached.count(False), cached.count(True))


# ---- with CUDA graphs (the capture stand-in) -----------------------------------------------------------------


def _deltas(model, inputs, solver, monkeypatch) -> list[float]:
    """The batch's delta at every step after the first of the eager cache that never skips."""
    seen, delta = [], step_cache.delta
    monkeypatch.setattr(step_cache, "delta", lambda r, r_full, m=None: seen.append(delta(r, r_full, m)) or seen[-1])
    denoise(FirstBlockCache(Hoisted(model, EAGER_OPS, torch.float32), 0), *inputs, solver=solver)
    monkeypatch.undo()
    return [d.item() for d in seen]


@pytest.mark.parametrize("solver", ["euler", "dpm++2m"])
def test_the_graphed_cache_is_the_eager_cache_bit_for_bit(model, solver, monkeypatch):
    """Three thresholds (never, sometimes, always after the first step), two loops in a row over two shape buckets
    (the graphs and their cache buffers reused, each loop's first step in full), then new weights' graphs."""
    steps = 6
    buckets = [_inputs(model.cfg, 2, steps), _inputs(model.cfg, 1, steps, [(3, 3)], seed=4)]  # edit, text-to-image
    middle = torch.tensor([d for inputs in buckets for d in _deltas(model, inputs, solver, monkeypatch)]).median()
    thresholds = [0.0, middle.item(), HUGE]
    eager = Hoisted(model, EAGER_OPS, torch.float32)
    graphed = Graphed(model, EAGER_OPS, torch.float32, capture=capture_eager)
    for threshold, calls_per_bucket in zip(thresholds, ([steps] * 2, None, [1] * 2), strict=True):
        for _ in range(2):
            for b, (x, sigmas, cond) in enumerate(buckets):  # b: the bucket, for calls_per_bucket
                want, got = FirstBlockCache(eager, threshold), FirstBlockCache(graphed, threshold)
                ours = denoise(got, x, sigmas, cond, solver=solver)
                assert torch.equal(ours, denoise(want, x, sigmas, cond, solver=solver))
                assert (got.model_calls, got.cached_steps) == (want.model_calls, want.cached_steps)
                if calls_per_bucket is None:
                    assert 1 < got.model_calls < steps  # the middle threshold skips some steps, not all
                else:
                    assert got.model_calls == calls_per_bucket[b]
    assert (graphed.cache_graphs.captures, graphed.graphs.captures) == (2, 0)
    graphed.weights_changed()
    x, sigmas, cond = buckets[0]
    got = denoise(FirstBlockCache(graphed, HUGE), x, sigmas, cond, solver=solver)
    assert torch.equal(got, denoise(FirstBlockCache(eager, HUGE), x, sigmas, cond, solver=solver))
    assert graphed.cache_graphs.captures == 3  # the old weights' graphs dropped


def test_a_cached_loop_waits_for_the_plain_graphs_loop(model):
    """One loop at a time replays or captures a graphed denoiser's graphs, cached or not (as without the cache)."""
    import threading

    graphed = Graphed(model, EAGER_OPS, torch.float32, capture=capture_eager)
    x, sigmas, cond = _inputs(model.cfg, 1, 2, [(3, 3)])
    want = denoise(FirstBlockCache(Hoisted(model, EAGER_OPS, torch.float32), HUGE), x, sigmas, cond)
    result = {}
    cached = threading.Thread(
        target=lambda: result.setdefault("x", denoise(FirstBlockCache(graphed, HUGE), x, sigmas, cond))
    )
    with graphed.prepare(sigmas, cond, x):  # a plain loop holds the graphs
        cached.start()
        cached.join(1.0)
        assert cached.is_alive() and graphed.cache_graphs.captures == 0
    cached.join(30)
    assert torch.equal(result["x"], want)


def test_a_graphed_pipeline_runs_the_step_cache(kontext_dir, picture_path, pipe):
    graphed = Pipeline.from_pretrained(kontext_dir, backend="eager")
    graphed.denoiser = Graphed(graphed.transformer, EAGER_OPS, torch.float32, capture=capture_eager)
    args = dict(steps=5, seed=2, output="latent", step_cache=HUGE)
    reports = RunReport(), RunReport()
    got = graphed.edit(picture_path, "make it blue", report=reports[0], **args)
    assert torch.equal(got, pipe.edit(picture_path, "make it blue", report=reports[1], **args))
    assert [(r.model_calls, r.cached_steps) for r in reports] == [(1, 4)] * 2


# ---- the CLI and the server --------------------------------------------------------------------------------------


def test_the_cli_summary_says_how_many_full_calls_ran(kontext_dir, picture_path, tmp_path, capsys):
    from kontext_rt.cli import main

    argv = ["edit", picture_path, "x", "--checkpoint", kontext_dir, "-o", tmp_path / "o.png", "--steps", "4"]
    code = main([str(a) for a in argv + ["--step-cache", "1e30", "--seed", "1", "--cache-dir", tmp_path / "c"]])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "(4 steps, " in err and "1 full model calls, 3 steps from the cache" in err


def test_the_server_field_reaches_the_request():
    from kontext_rt.serve.schemas import GenerateFields, Settings, parse_fields, to_request

    fields = parse_fields(GenerateFields, {"prompt": "x", "step_cache": 0.25})
    assert to_request(fields, [], Settings()).step_cache == 0.25
    assert to_request(parse_fields(GenerateFields, {"prompt": "x"}), [], Settings()).step_cache is None


def test_the_cache_runs_over_fp8_linears(kontext_dir):
    """FP8 linears are the model's own modules: threshold 0 is the FP8 pipeline's uncached loop bit for bit, and a
    huge one runs one full call (its first step) and answers the rest from the cache, with finite latents."""
    from kontext_rt import Optimizations

    pipe = Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, optimize=Optimizations(fp8="dynamic"))
    kwargs = dict(width=48, height=32, steps=4, seed=2, output="latent")
    want = pipe.generate("a red square", **kwargs)
    assert torch.equal(pipe.generate("a red square", step_cache=0, **kwargs), want)
    report = RunReport()
    got = pipe.generate("a red square", step_cache=HUGE, report=report, **kwargs)
    assert (report.model_calls, report.cached_steps) == (1, 3)
    assert torch.isfinite(got).all() and not torch.equal(got, want)
