"""The step cache (sampling/step_cache.py): off is today's loop bit for bit, its counts follow its rule, and a
skipped step is the first block's output plus the cached residual of the others, against a float64 computation
made here from the model's own modules called one by one (not the cached code path)."""

import copy

import pytest
import torch

from kontext_rt import Pipeline, Request, RunReport
from kontext_rt.errors import InputError
from kontext_rt.model.op_table import EAGER_OPS
from kontext_rt.sampling.denoisers import Graphed, Hoisted, PerStep
from kontext_rt.sampling.loop import denoise
from kontext_rt.sampling.schedule import schedule
from kontext_rt.sampling.step_cache import FirstBlockCache
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


def _inputs(cfg, batch=2, steps=5):
    gen = torch.Generator().manual_seed(3)
    cond = conditioning(cfg, batch, 7, [(3, 4), (2, 3)], torch.float32, gen)
    return torch.randn(batch, 12, 64, generator=gen), schedule(steps, 12, True), cond


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


def test_graphs_and_engines_take_no_step_cache(model):
    graphed = Graphed(model, EAGER_OPS, torch.float32, capture=lambda *a: None)
    engine = PerStep(lambda *args: None, torch.float32)  # what the TensorRT backend runs
    for denoiser in (graphed, engine):
        with pytest.raises(InputError, match="CUDA graph or a TensorRT engine"):
            FirstBlockCache(denoiser, 0.1)


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
