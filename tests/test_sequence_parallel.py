"""Ulysses sequence parallelism (kontext_rt.model.ulysses) on the CPU: 2, 3 and 4 gloo ranks against one process.

One spawn of 4 processes runs every case on three process groups: ranks {0, 1}, {0, 1, 2} and all four (so the
groups are passed in, not only the default one). The cases: an edit with one context image, with two, and
text-to-image (batch 2), two Euler steps each, through the runtime's own loop (denoise over Hoisted), with token
counts that no N divides evenly and shards that hold no target token at all.

Bound (habit 7, tests/float64_reference.py's rule): the parallel float32 latents within twice the single-process
float32 error of the same loop run in float64 (float64 weights, inputs and state), hence within three times of the
single-process float32 latents. Not bit for bit: a rank's linears run over fewer rows and its attention over fewer
heads, which a BLAS may block and round differently. Every rank of a group ends with the same latents bit for bit.
A padding leak (image tokens padded to a multiple of N and attended to) must break that bound: checked below.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from kontext_rt import LoadSpec, Parallel, Pipeline, RunReport
from kontext_rt.config import PRESETS
from kontext_rt.errors import InputError
from kontext_rt.model.op_table import EAGER_OPS
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.ulysses import SequenceParallel, shard_sizes
from kontext_rt.sampling import step_cache
from kontext_rt.sampling.denoisers import Graphed, Hoisted
from kontext_rt.sampling.graphs import capture_eager
from kontext_rt.sampling.loop import Conditioning, denoise
from kontext_rt.sampling.schedule import schedule
from kontext_rt.sampling.step_cache import FirstBlockCache
from tests.float64_reference import rel_err
from tests.test_hoisting import conditioning

# 12 heads: divisible by 2, 3 and 4 (FLUX's 24 by 2, 3, 4, 6, 8); head dim 16 with RoPE axes (4, 6, 6)
CFG = dataclasses.replace(PRESETS["tiny"], hidden_size=192, num_heads=12, axes_dim=(4, 6, 6))
TEXT = 7
CASES = {  # name -> (batch, grids: the target's (rows, cols), then each context image's)
    "edit": (1, [(3, 4), (4, 5)]),  # 32 image tokens: 3 and 4 ranks leave shards without a target token
    "edit2": (1, [(3, 4), (4, 5), (3, 3)]),  # 41: no N divides it
    "t2i": (2, [(3, 5)]),  # 15
}
LEAK = "edit2"  # the case run again with its image tokens padded to a multiple of N, the pads attended to
WORLDS = (2, 3, 4)
STEPS = 2
HUGE = 1e30  # a step cache threshold under which every step after the first skips


def make_model() -> FluxTransformer:
    torch.manual_seed(0)
    model = FluxTransformer(CFG).eval()
    with torch.no_grad():  # norm scales start at exactly 1: perturb them so a text/image scale swap shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    return model


def make_case(name: str):
    batch, grids = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    cond = conditioning(CFG, batch, TEXT, grids, torch.float32, gen)
    x = torch.randn(batch, grids[0][0] * grids[0][1], 64, generator=gen)
    return cond, x, schedule(STEPS, x.shape[1], True)


def run_loop(model, cond, x, sigmas, graphed=False) -> torch.Tensor:
    """The hoisted loop, or with graphed=True the CUDA-graphed one with the capture stand-in (graphs.capture_eager:
    its replays recompute the captured function from the static buffers, collectives included)."""
    if graphed:
        return denoise(Graphed(model, EAGER_OPS, torch.float32, capture=capture_eager), x, sigmas, cond)
    return denoise(Hoisted(model, EAGER_OPS, torch.float32), x, sigmas, cond)


# 12 target tokens of 32: on 3 ranks (11, 1, 0 targets) one shard holds no target token, on 4 (8, 4, 0, 0) two
CACHE_CASE, CACHE_STEPS = "edit", 6
BATCH_CASE = "t2i"  # batch 2: the cache's buffers, its decision and the gather over two rows (at HUGE)


def cache_case(name: str = CACHE_CASE):
    cond, x, _ = make_case(name)
    return cond, x, schedule(CACHE_STEPS, x.shape[1], True)


def run_cached(model, threshold: float, graphed=False, name: str = CACHE_CASE) -> tuple[torch.Tensor, int]:
    """The step cache's loop over a case (hoisted or graphed), CACHE_STEPS steps: (latents, full model calls)."""
    cond, x, sigmas = cache_case(name)
    base = Hoisted(model, EAGER_OPS, torch.float32)
    if graphed:
        base = Graphed(model, EAGER_OPS, torch.float32, capture=capture_eager)
    cache = FirstBlockCache(base, threshold)
    return denoise(cache, x, sigmas, cond), cache.model_calls


def delta_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A first-block residual and the cached one, (B, N, C) = (2, 12, 8): each rank takes its target rows."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 12, 8, generator=gen), torch.randn(2, 12, 8, generator=gen)


def cached_deltas(model, threshold: float) -> tuple[list[float], int]:
    """One process's step cache over CACHE_CASE at `threshold`: (every step's delta after the first, full calls)."""
    seen, delta = [], step_cache.delta
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_cache, "delta", lambda r, r_full, m=None: seen.append(delta(r, r_full, m)) or seen[-1])
        calls = run_cached(model, threshold)[1]
    return [d.item() for d in seen], calls


def cache_threshold(model) -> float:
    """A threshold that skips some of CACHE_CASE's steps and not others, as far (relatively) from every delta its
    loop meets as the candidates allow: a parallel run, whose deltas differ from one process's by float32 rounding,
    must take the same decisions. Candidates: the midpoints between the deltas of the loop that never skips (a
    skipping loop compares with an older full step, so its deltas differ: each candidate's own loop is checked)."""
    deltas = sorted(cached_deltas(model, 0.0)[0])
    best = (0.0, None)
    for t in ((a + b) / 2 for a, b in zip(deltas, deltas[1:], strict=False)):
        seen, calls = cached_deltas(model, t)
        if 1 < calls < CACHE_STEPS:
            best = max(best, (min(abs(d - t) / t for d in seen), t))
    assert best[0] > 1e-3, f"no threshold stays clear of the deltas {deltas}: {best}"
    return best[1]


def float64_loop(model, cond: Conditioning, x, sigmas) -> torch.Tensor:
    """The same Euler loop with float64 weights, inputs and state (the cos/sin tables stay float32, as rope_table
    makes them for both sides)."""
    m = copy.deepcopy(model).double()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ts = sigmas[:-1, None].expand(-1, x.shape[0])
    mods = m.modulation_table(ts, cond.guidance, d(cond.pooled))
    x = x.double()
    with torch.inference_mode():
        for i in range(len(sigmas) - 1):
            v = m.velocity(x, d(cond.ctx), d(cond.txt), mods[i], cond.cos, cond.sin)
            x = x + (sigmas[i + 1].double() - sigmas[i].double()) * v
    return x


def assert_within_rounding(got, want32, want64, what: str) -> None:
    """got within twice the single-process float32 error of the float64 loop (tests/float64_reference.py's rule),
    hence within three times of the single-process float32 result."""
    noise = rel_err(want32, want64)
    assert noise > 0, f"{what}: the float64 loop equals the float32 one: it is not a float64 run"
    err64, err32 = rel_err(got, want64), rel_err(got, want32)
    assert err64 <= 2 * noise, f"{what}: {err64:.3g} from float64 > 2 x the single-process float32 error {noise:.3g}"
    assert err32 <= 3 * noise, f"{what}: {err32:.3g} from one process's float32 > 3 x its float32 error {noise:.3g}"


def leaky(cond: Conditioning, world: int) -> Conditioning:
    """cond with zero context tokens appended up to a multiple of world image tokens, RoPE angle 0 for them: what
    an implementation that pads to equal shards and forgets to mask the pads would compute."""
    n_ctx = 0 if cond.ctx is None else cond.ctx.shape[1]
    image = cond.cos.shape[0] - cond.txt.shape[1]
    pad = -image % world or world  # at least one pad token, so the leak exists for every N
    b = cond.txt.shape[0]
    ctx = (
        torch.zeros(b, n_ctx + pad, 64)
        if cond.ctx is None
        else torch.cat((cond.ctx, cond.ctx.new_zeros(b, pad, 64)), 1)
    )
    cos = torch.cat((cond.cos, torch.ones(pad, cond.cos.shape[1])))
    sin = torch.cat((cond.sin, torch.zeros(pad, cond.sin.shape[1])))
    return dataclasses.replace(cond, ctx=ctx, cos=cos, sin=sin)


def _ranks(rank: int, world: int, init_file: str, out_dir: str, checkpoint: str, threshold: float) -> None:
    """One spawned process: every case on every group it belongs to, hoisted and graphed, and the step cache at
    `threshold` and at HUGE (hoisted and graphed); its results saved as out_dir/{N}-{rank}.pt. Then the public API
    on the tiny checkpoint (2 heads): an edit with a random seed on ranks {0, 1}, the same with a step cache, and
    the refusal of 3 ranks."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model()
        groups = {n: dist.new_group(list(range(n))) for n in WORLDS}  # every rank creates every group, in order
        for n, group in groups.items():
            if rank >= n:
                continue
            sharded = SequenceParallel(model, group)
            out = {name: run_loop(sharded, *make_case(name)) for name in CASES}
            out["graphed"] = {name: run_loop(sharded, *make_case(name), graphed=True) for name in CASES}
            out["cached"] = {
                (t, graphed): run_cached(sharded, t, graphed) for t in (threshold, HUGE) for graphed in (False, True)
            }
            r, r_full = delta_inputs()
            start = sum(shard_sizes(32, n)[:rank])  # 12 target tokens of 32 (CACHE_CASE): this rank's, if any
            rows = slice(min(start, 12), min(start + shard_sizes(32, n)[rank], 12))
            out["delta"] = step_cache.delta(r[:, rows], r_full[:, rows], sharded)
            out["cached_batch"] = {g: run_cached(sharded, HUGE, g, BATCH_CASE) for g in (False, True)}
            cond, x, sigmas = make_case(LEAK)
            out["leak"] = run_loop(sharded, leaky(cond, n), x, sigmas)
            if n == 2:
                pipe = Pipeline.from_pretrained(checkpoint, parallel=Parallel(2, group), text_cache_size=0)
                picture = Image.new("RGB", (48, 32), (9, 90, 200))
                out["pipeline"] = pipe.edit(picture, "x", steps=1, output="latent")
                report = RunReport()
                latents = pipe.edit(picture, "x", steps=3, seed=5, step_cache=HUGE, output="latent", report=report)
                out["pipeline_cached"] = latents, report.model_calls, report.cached_steps
            if n == 3:
                try:
                    LoadSpec(checkpoint, parallel=Parallel(3, group)).check()
                except InputError as err:
                    out["refused"] = str(err)
            torch.save(out, f"{out_dir}/{n}-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def references():
    """name -> (single-process float32 latents, float64 latents); CACHE_CASE + "-long": its CACHE_STEPS loop."""
    model = make_model()
    found = {name: (run_loop(model, *make_case(name)), float64_loop(model, *make_case(name))) for name in CASES}
    for name in (CACHE_CASE, BATCH_CASE):
        found[name + "-long"] = run_loop(model, *cache_case(name)), float64_loop(model, *cache_case(name))
    return found


@pytest.fixture(scope="module")
def threshold() -> float:
    return cache_threshold(make_model())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, kontext_dir, threshold) -> dict[int, list[dict]]:
    """N -> what each rank of the N-rank group computed, by case."""
    folder = tmp_path_factory.mktemp("ulysses")
    args = (max(WORLDS), str(folder / "init"), str(folder), str(kontext_dir), threshold)
    spawned, deadline = mp.spawn(_ranks, args=args, nprocs=max(WORLDS), join=False), time.monotonic() + 300
    while not spawned.join(timeout=2):  # ranks stuck in a collective that another rank skipped: fail, do not hang
        if time.monotonic() > deadline:
            for process in spawned.processes:
                process.kill()
                process.join()
            pytest.fail("the ranks did not finish in 300 s: a collective that not every rank joined?")
    return {n: [torch.load(folder / f"{n}-{r}.pt") for r in range(n)] for n in WORLDS}


def test_shards_cover_the_sequence_in_order():
    for length in range(0, 20):
        for world in (1, 2, 3, 4):
            sizes = shard_sizes(length, world)
            assert sum(sizes) == length and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_latents_within_float32_rounding(ranks, references, world, case):
    got = ranks[world][0][case]
    want32, want64 = references[case]
    assert got.shape == want32.shape and got.dtype == torch.float32
    assert_within_rounding(got, want32, want64, f"{case} on {world} ranks")


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_ends_with_the_same_latents(ranks, world):
    for other in ranks[world][1:]:
        for case in CASES:
            assert torch.equal(other[case], ranks[world][0][case]), case


@pytest.mark.parametrize("world", WORLDS)
def test_a_padding_leak_is_caught(ranks, references, world):
    """The bound above is tight enough to see a few pad tokens in the softmax: the leak is far outside it."""
    want32, want64 = references[LEAK]
    leaked = ranks[world][0]["leak"]
    with pytest.raises(AssertionError, match="from float64"):
        assert_within_rounding(leaked, want32, want64, "padded")
    assert rel_err(leaked, want64) > 100 * rel_err(want32, want64)


@pytest.mark.parametrize("world", WORLDS)
def test_cuda_graphs_under_parallel_are_the_hoisted_loop_bit_for_bit(ranks, world):
    """Graphed over SequenceParallel, with the capture stand-in: the static buffers feed the all-to-alls, and a
    replay gives the hoisted parallel loop's latents, on every rank."""
    for r in range(world):
        for case in CASES:
            assert torch.equal(ranks[world][r]["graphed"][case], ranks[world][r][case]), (case, r)


@pytest.mark.parametrize("world", WORLDS)
def test_the_step_cache_delta_is_summed_over_the_ranks(ranks, world):
    """Each rank holds some target rows (or none): the decision number is the whole batch's, the same bits on every
    rank, within float32 summation error of the float64 one (two sums of 96 terms per row: 2 x 96 x eps)."""
    r, r_full = delta_inputs()
    want = step_cache.relative_l1(r.double(), r_full.double()).max().item()
    for rank in range(world):
        got = ranks[world][rank]["delta"]
        assert torch.equal(got, ranks[world][0]["delta"]), rank
        assert abs(got.item() - want) <= 2 * 96 * torch.finfo(torch.float32).eps * want, (got.item(), want)


@pytest.mark.parametrize("world", WORLDS)
def test_the_step_cache_under_parallel_decides_as_one_process(ranks, references, threshold, world):
    """At a threshold that skips some steps: every rank takes one process's decisions (the delta's sums are added
    over the ranks, so shards without a target token decide too), hoisted and graphed give the same bits, and the
    latents are one process's cached latents within the rule above (the noise of the uncached loop, whose steps run
    every block the cached ones run). At HUGE every step after the first skips."""
    model = make_model()
    noise = rel_err(*references[CACHE_CASE + "-long"])
    for t in (threshold, HUGE):
        want, calls = run_cached(model, t)
        assert (1 < calls < CACHE_STEPS) if t == threshold else calls == 1
        for r in range(world):
            got, got_calls = ranks[world][r]["cached"][(t, False)]
            graphed, graphed_calls = ranks[world][r]["cached"][(t, True)]
            assert got_calls == graphed_calls == calls, (t, r)
            assert torch.equal(graphed, got), (t, r)
            assert torch.equal(got, ranks[world][0]["cached"][(t, False)][0])
            assert rel_err(got, want) <= 3 * noise, f"{rel_err(got, want):.3g} > 3 x {noise:.3g} at {t}"


@pytest.mark.parametrize("world", WORLDS)
def test_a_batch_of_two_skips_under_parallel_as_in_one_process(ranks, references, world):
    want, calls = run_cached(make_model(), HUGE, name=BATCH_CASE)
    noise = rel_err(*references[BATCH_CASE + "-long"])
    for r in range(world):
        (got, got_calls), (graphed, graphed_calls) = (ranks[world][r]["cached_batch"][g] for g in (False, True))
        assert got_calls == graphed_calls == calls == 1 and torch.equal(graphed, got)
        assert got.shape == want.shape == (2, 15, 64)
        assert rel_err(got, want) <= 3 * noise, f"{rel_err(got, want):.3g} > 3 x {noise:.3g}"


def test_the_pipeline_runs_the_step_cache_under_parallel(ranks):
    (a, calls, cached), (b, *_) = ranks[2][0]["pipeline_cached"], ranks[2][1]["pipeline_cached"]
    assert torch.equal(a, b) and (calls, cached) == (1, 2)


def test_the_pipeline_draws_one_random_seed_for_every_rank(ranks):
    """seed=None: rank 0 draws and broadcasts it; ranks drawing their own would start from different noise."""
    assert torch.equal(ranks[2][0]["pipeline"], ranks[2][1]["pipeline"])


def test_ranks_that_do_not_divide_the_heads_are_refused_before_the_weights(ranks):
    for r in range(3):
        assert "parallel=3 does not divide the model's 2 attention heads" in ranks[3][r]["refused"]


# ---- the CLI under torchrun, and the refusals ---------------------------------------------------------------------


def cli_edit(checkpoint, picture, out, cache, *extra) -> list[str]:
    return [
        "edit", str(picture), "make it blue", "--checkpoint", str(checkpoint), "-o", str(out), "--steps", "2",
        "--seed", "3", "--no-auto-resize", "--cache-dir", str(cache), *extra,
    ]  # fmt: skip


def test_torchrun_writes_the_single_process_png(kontext_dir, tmp_path, capsys):
    """2 ranks under torchrun against one process, on the tiny checkpoint (2 heads). The latents agree within float32
    rounding (the bound above); the decoder then rounds to 8 bits, where a value within that noise of a rounding
    boundary may land on either side: the PNGs agree to one level (a missing all-to-all here moves pixels by 3)."""
    from kontext_rt.cli import main

    picture = tmp_path / "in.png"
    Image.new("RGB", (80, 48), (200, 30, 30)).save(picture)
    assert main(cli_edit(kontext_dir, picture, tmp_path / "one.png", tmp_path / "c1")) == 0, capsys.readouterr().err
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    args = cli_edit(kontext_dir, picture, tmp_path / "two.png", tmp_path / "c2", "--sequence-parallel", "2")
    r = subprocess.run([*cmd, "kontext_rt.cli", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("VAE decode") == 1, r.stderr  # rank 1 stays quiet
    one, two = (np.asarray(Image.open(tmp_path / f), dtype=np.int16) for f in ("one.png", "two.png"))
    assert one.shape == two.shape and np.abs(one - two).max() <= 1


def test_the_cli_needs_torchrun(kontext_dir, tmp_path, capsys, monkeypatch):
    from kontext_rt.cli import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    picture = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(picture)
    code = main(cli_edit(kontext_dir, picture, tmp_path / "o.png", tmp_path / "c", "--sequence-parallel", "2"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --sequence-parallel 2 runs under torchrun") and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_a_named_gpu_is_refused_with_sequence_parallel(kontext_dir, tmp_path, capsys, monkeypatch):
    """--device cuda:0 would put every rank on one GPU: refused before the process group, one line, exit 2."""
    from kontext_rt import cli

    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(cli, "_device_dtype", lambda args: ("cuda:0", torch.bfloat16))  # no GPU here
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("the group was started"))
    picture = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(picture)
    args = cli_edit(kontext_dir, picture, tmp_path / "o.png", tmp_path / "c", "--sequence-parallel", "2")
    code = cli.main([*args, "--device", "cuda:0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --device cuda:0 with --sequence-parallel 2") and err.count("\n") == 1


def test_a_second_thread_is_refused_under_parallel(kontext_dir):
    """Under parallel every rank must issue the same collectives in the same order: a call while another thread's
    is running is refused at once, before it issues any (a stand-in marks the pipeline parallel; the guard comes
    first)."""
    pipe = Pipeline.from_pretrained(kontext_dir)
    pipe.parallel = object()
    assert pipe._one_at_a_time.acquire(blocking=False)  # another thread's run, in progress
    try:
        for seed in (1, None):  # the run's all-to-alls; the seed's broadcast
            with pytest.raises(InputError, match="running a call on another thread"):
                pipe.generate("x", width=32, height=32, steps=1, seed=seed)
    finally:
        pipe._one_at_a_time.release()


@pytest.mark.parametrize("value", [0, -2, "2", True, 2.0])
def test_parallel_values_are_checked(kontext_dir, value):
    with pytest.raises(InputError, match="parallel must be"):
        LoadSpec(kontext_dir, parallel=value).check()


def test_parallel_needs_an_initialized_process_group(kontext_dir):
    assert not dist.is_initialized()
    with pytest.raises(InputError, match=r"parallel=2 needs an initialized torch.distributed process group"):
        LoadSpec(kontext_dir, parallel=2).check()


def test_tensorrt_is_refused_with_the_reason(kontext_dir, tmp_path):
    for spec in (dict(backend="tensorrt"), dict(engines=tmp_path)):
        with pytest.raises(InputError, match="no place for the all-to-alls"):
            LoadSpec(kontext_dir, parallel=2, **spec).check()


def test_heads_that_do_not_divide_are_refused():
    with pytest.raises(InputError, match=r"does not divide the model's 24 attention heads.*\[2, 3, 4, 6, 8, 12, 24\]"):
        Parallel(5).check_model(24)
    Parallel(8).check_model(24)


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of one rank in this process, destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_the_world_size_must_be_the_rank_count(kontext_dir, one_rank):
    with pytest.raises(InputError, match="parallel=2 but the process group has 1 ranks"):
        LoadSpec(kontext_dir, parallel=2).check()
