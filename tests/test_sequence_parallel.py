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

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from kontext_rt import LoadSpec, Parallel, Pipeline
from kontext_rt.config import PRESETS
from kontext_rt.errors import InputError
from kontext_rt.model.op_table import EAGER_OPS
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.ulysses import SequenceParallel, shard_sizes
from kontext_rt.sampling.denoisers import Hoisted
from kontext_rt.sampling.loop import Conditioning, denoise
from kontext_rt.sampling.schedule import schedule
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


def run_loop(model, cond, x, sigmas) -> torch.Tensor:
    return denoise(Hoisted(model, EAGER_OPS, torch.float32), x, sigmas, cond)


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


def _ranks(rank: int, world: int, init_file: str, out_dir: str, checkpoint: str) -> None:
    """One spawned process: every case on every group it belongs to; its latents saved as out_dir/{N}-{rank}.pt.
    Then the public API on the tiny checkpoint (2 heads): an edit with a random seed on ranks {0, 1}, and the
    refusal of 3 ranks."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model()
        groups = {n: dist.new_group(list(range(n))) for n in WORLDS}  # every rank creates every group, in order
        for n, group in groups.items():
            if rank >= n:
                continue
            sharded = SequenceParallel(model, group)
            out = {name: run_loop(sharded, *make_case(name)) for name in CASES}
            cond, x, sigmas = make_case(LEAK)
            out["leak"] = run_loop(sharded, leaky(cond, n), x, sigmas)
            if n == 2:
                pipe = Pipeline.from_pretrained(checkpoint, parallel=Parallel(2, group), text_cache_size=0)
                out["pipeline"] = pipe.edit(Image.new("RGB", (48, 32), (9, 90, 200)), "x", steps=1, output="latent")
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
    """name -> (single-process float32 latents, float64 latents)."""
    model = make_model()
    return {name: (run_loop(model, *make_case(name)), float64_loop(model, *make_case(name))) for name in CASES}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, kontext_dir) -> dict[int, list[dict]]:
    """N -> what each rank of the N-rank group computed, by case."""
    folder = tmp_path_factory.mktemp("ulysses")
    mp.spawn(_ranks, args=(max(WORLDS), str(folder / "init"), str(folder), str(kontext_dir)), nprocs=max(WORLDS))
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


def test_heads_and_cuda_graphs_are_refused():
    with pytest.raises(InputError, match=r"does not divide the model's 24 attention heads.*\[2, 3, 4, 6, 8, 12, 24\]"):
        Parallel(5).check_model(24)
    Parallel(8).check_model(24)
    with pytest.raises(InputError, match="cuda_graphs"):
        Parallel(2).check_backend("eager", engines=False, cuda_graphs=True)


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of one rank in this process, destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_the_world_size_must_be_the_rank_count(kontext_dir, one_rank):
    with pytest.raises(InputError, match="parallel=2 but the process group has 1 ranks"):
        LoadSpec(kontext_dir, parallel=2).check()


def test_the_step_cache_is_refused(one_rank):
    from kontext_rt.sampling.step_cache import cacheable

    with pytest.raises(InputError, match="step_cache with sequence parallelism"):
        cacheable(Hoisted(SequenceParallel(make_model(), one_rank), EAGER_OPS, torch.float32))
