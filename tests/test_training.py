"""kontext_toy.training (train, and its two modules data and phases): the loss weights on constructed cases, the
sample stream, the argument checks and a seconds-long run (the script itself runs for hours: CI does not train)."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kontext_toy import shapes


@pytest.fixture(scope="module")
def train():
    return importlib.import_module("kontext_toy.training.train")


@pytest.fixture(scope="module")
def data():
    return importlib.import_module("kontext_toy.training.data")


@pytest.fixture(scope="module")
def phases():
    return importlib.import_module("kontext_toy.training.phases")


def test_changed_tokens_are_the_cells_the_edit_touches(data):
    """A token is one 16 px cell of the 4x4 grid, row-major: the changed ones are the cells named by the edit."""
    for kind in shapes.EDIT_KINDS:
        samples = [shapes.edit_sample("train", kind, seed=2, index=i) for i in range(12)]
        changed = data.changed_tokens(samples).numpy()
        for s, row in zip(samples, changed, strict=True):
            if kind == "background":
                expected = set(range(16))
            else:
                cells = [shapes.Shape.from_dict(s.meta["shape"]).cell]
                if kind == "move":
                    cells.append(shapes.Shape.from_dict(s.meta["new_shape"]).cell)
                expected = {r * shapes.GRID + c for r, c in cells}
            assert set(np.flatnonzero(row)) == expected, s.instruction


def test_edit_loss_by_hand(phases):
    err = torch.rand(3, 16, dtype=torch.float64)
    changed = torch.zeros(3, 16, dtype=torch.bool)
    changed[0, 5] = True  # a recolour
    changed[1, [2, 3]] = True  # a move
    changed[2] = True  # a background edit
    assert phases.edit_loss(err, changed, 0.0).item() == pytest.approx(err.mean().item(), rel=1e-15)
    e = err.numpy()
    expected = [
        (e[0].sum() + 4 * e[0, 5]) / 20,  # weights 1 + 4 on one token of 16: 20 in all
        (e[1].sum() + 4 * (e[1, 2] + e[1, 3])) / 24,
        e[2].mean(),  # every token weighted 5: the plain mean
    ]
    assert phases.edit_loss(err, changed, 4.0).item() == pytest.approx(np.mean(expected), rel=1e-12)


def test_shape_weights_weigh_the_grown_shapes(data):
    samples = [shapes.edit_sample("train", kind, seed=4, index=0) for kind in shapes.EDIT_KINDS]
    w = data.shape_weights(samples, 10.0).numpy()
    assert w.shape == (2 * len(samples), 1, 64, 64)
    scenes = [s.meta["source"] for s in samples] + [s.meta["target"] for s in samples]
    for plane, scene in zip(w[:, 0], scenes, strict=True):
        rendered = np.asarray(shapes.Scene.from_dict(scene).render()).astype(int)
        background = np.array(shapes.PALETTE[shapes.Scene.from_dict(scene).background])
        drawn = np.any(rendered != background, axis=-1)  # the shapes' pixels, from the picture itself
        padded = np.pad(drawn, 1)
        grown = np.zeros_like(drawn)
        for dy in (0, 1, 2):  # the drawn pixels dilated by a 3x3 square
            for dx in (0, 1, 2):
                grown |= padded[dy : dy + 64, dx : dx + 64]
        np.testing.assert_array_equal(plane, np.where(grown, 11.0, 1.0))


def test_the_pool_knows_each_edits_kind(data, phases):
    """build_pool's kinds follow the stream's order (edit i is EDIT_KINDS[i % 5]), from --skip on."""
    from kontext_rt.model.vae import AutoEncoder
    from kontext_toy.checkpoints import small_kontext

    torch.manual_seed(0)
    vae = AutoEncoder(phases.VAE_CONFIG).eval()
    pool = data.build_pool(data.Stream(0, skip=3), vae, data.TextTable(small_kontext()), 12, 2, chunk=5)
    assert pool["kind"].tolist() == [(3 + j) % 5 for j in range(12)] and len(pool["kind"]) == len(pool["eid"])


def test_a_kind_mix_draws_kinds_in_its_proportions(phases):
    """draw_edits: each edit in proportion to its kind's weight (an unnamed kind 1), against the expected shares of
    an uneven pool (binomial, 5 sigma); without a mix, torch.randint's draw as before the option existed."""
    counts = [400, 100, 100, 200, 200]  # recolour, move, remove, background, add
    pool = {"eid": torch.zeros(sum(counts), dtype=torch.long)}
    pool["kind"] = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    mix, n = {"move": 6.0, "add": 0.5}, 40_000
    torch.manual_seed(1)
    drawn = torch.bincount(pool["kind"][phases.draw_edits(pool, n, mix)], minlength=5).double() / n
    weights = [mix.get(k, 1.0) for k in shapes.EDIT_KINDS]
    expected = torch.tensor([w * c for w, c in zip(weights, counts, strict=True)], dtype=torch.float64)
    expected /= expected.sum()
    assert torch.all((drawn - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt()), (drawn, expected)
    torch.manual_seed(2)
    plain = phases.draw_edits(pool, 64)
    torch.manual_seed(2)
    assert torch.equal(plain, torch.randint(sum(counts), (64,)))


def test_workers_draw_the_same_samples_in_the_same_order(data):
    """The pool drawn in two processes is the one process's, sample for sample (images, instructions), and the
    stream goes on from the same index."""
    one, two = data.Stream(3, workers=1), data.Stream(3, workers=2)
    a = [s for chunk in one.take(data.edit_samples, 11, 4) for s in chunk]
    b = [s for chunk in two.take(data.edit_samples, 11, 4) for s in chunk]
    assert [s.instruction for s in a] == [s.instruction for s in b] and len(a) == 11
    assert all(np.array_equal(np.array(x.target), np.array(y.target)) for x, y in zip(a, b, strict=True))
    assert (
        one.edit_batch(1)[0].instruction
        == two.edit_batch(1)[0].instruction
        == data.edit_samples(3, 11, 1)[0].instruction
    )
    assert [s.instruction for s in a] == [s.instruction for s in data.edit_samples(3, 0, 11)]


def test_skip_starts_the_stream_further_on(data):
    """--skip N: the stream's first edit is train edit N and its first caption train caption N // 4, the samples
    a stream from 0 would reach only after them."""
    later = data.Stream(3, skip=9)
    first = [s.instruction for s in later.edit_batch(3)]
    assert first == [s.instruction for s in data.edit_samples(3, 9, 3)]
    assert first != [s.instruction for s in data.edit_samples(3, 0, 3)]
    (caption,) = next(later.take(data.gen_samples, 1, 1))
    assert caption.caption == data.gen_samples(3, 2, 1)[0].caption != data.gen_samples(3, 0, 1)[0].caption


def test_init_from_refuses_a_seed_whose_text_encoders_differ(train, tmp_path, capsys):
    """The script rewrites the text encoders for --seed: continuing the shipped model (trained with seed 0's) with
    another seed would pair it with other encoders. Refused before anything is written; seed 0 is accepted."""
    from kontext_toy.checkpoints import small_kontext

    out = tmp_path / "run"
    argv = ["--init-from", str(small_kontext()), "--out", str(out)]
    with pytest.raises(SystemExit) as refused:
        train.check(train.parser(), train.parser().parse_args([*argv, "--seed", "1"]))
    assert refused.value.code == 2 and "other text encoders than --seed 1" in capsys.readouterr().err
    assert not out.exists()
    train.check(train.parser(), train.parser().parse_args([*argv, "--seed", "0"]))
    with pytest.raises(SystemExit):  # a folder without text encoders: named, not a traceback
        train.check(train.parser(), train.parser().parse_args(["--init-from", str(tmp_path), "--out", str(out)]))
    assert "has no text_encoder/model.safetensors" in capsys.readouterr().err


def test_a_short_run_from_the_shipped_model_writes_a_loadable_checkpoint(train, tmp_path):
    """The whole script on the CPU, from the shipped model, two pool workers, seconds of training: the checkpoint
    loads and its log records the device and the steps."""
    from kontext_rt import Pipeline
    from kontext_toy.checkpoints import small_kontext

    out = tmp_path / "run"
    argv = ["--init-from", str(small_kontext()), "--flux-minutes", "0.03", "--pool", "24", "--batch", "4"]
    argv += ["--workers", "2", "--eval-n", "0", "--out", str(out)]
    run = subprocess.run([sys.executable, "-m", train.__name__, *argv], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]  # its own process: it sets torch's globals
    record = json.loads((out / "train_log.json").read_text())
    assert record["device"] == "cpu" and record["flux_steps"] > 0
    assert record["stream"] == {"edits": [0, 24], "captions": [0, 6]}  # the pool, no VAE phase
    assert Pipeline.from_pretrained(out, max_sequence_length=train.MAX_SEQUENCE_LENGTH).transformer is not None


def test_a_budget_in_steps_or_minutes(phases):
    """The phase's length and the progress its learning-rate cosine follows: steps done of steps, or wall time
    spent of the minutes; the other measure is ignored."""
    steps, minutes = phases.Budget(steps=10), phases.Budget(minutes=2.0)
    assert steps.progress(5, 1e9) == 0.5 and steps.left(9, 1e9) and not steps.left(10, 0.0)
    assert minutes.progress(10**6, 60.0) == 0.5 and minutes.left(10**6, 119.0) and not minutes.left(0, 120.0)
    assert not phases.Budget() and steps and minutes


def test_a_step_budget_trains_the_transformer(train, phases, tmp_path):
    """--flux-steps is a transformer phase: what --flux-minutes 0 refuses (moving the latents under a kept
    transformer, an edit weight with nothing to train) is accepted with it."""
    from kontext_toy.checkpoints import small_kontext

    p, base = train.parser(), ["--init-from", str(small_kontext()), "--out", str(tmp_path / "run")]
    for extra in (["--vae-tune-minutes", "1"], ["--edit-weight", "4"]):
        args = p.parse_args([*base, "--flux-steps", "5", *extra])
        train.check(p, args)
        assert args.flux == phases.Budget(steps=5)
        with pytest.raises(SystemExit):
            train.check(p, p.parse_args([*base, "--flux-minutes", "0", *extra]))


def test_a_step_budget_gives_the_same_weights_twice(train, tmp_path):
    """--flux-steps: two runs from the shipped model, one drawing the pool in one process and one in two, write the
    same transformer byte for byte (sha256 of the files), one that moved from the shipped one, in exactly that
    many steps."""
    from kontext_toy.checkpoints import small_kontext

    shipped = next((small_kontext() / "transformer").glob("*.safetensors"))
    digests = []
    for workers in ("1", "2"):
        out = tmp_path / f"run{workers}"
        argv = ["--init-from", str(small_kontext()), "--flux-steps", "3", "--pool", "24", "--batch", "4"]
        argv += ["--workers", workers, "--eval-n", "0", "--out", str(out)]
        run = subprocess.run([sys.executable, "-m", train.__name__, *argv], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert json.loads((out / "train_log.json").read_text())["flux_steps"] == 3
        digests.append(hashlib.sha256(next((out / "transformer").glob("*.safetensors")).read_bytes()).hexdigest())
    assert digests[0] == digests[1] != hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_decoder_phase_trains_the_decoder_alone(phases, data):
    """decoder_only: the encoder (and so the latents a transformer learnt) bit for bit as it was, the decoder
    moved; without it both move."""
    from kontext_rt.model.vae import AutoEncoder

    torch.manual_seed(0)
    vae = AutoEncoder(phases.VAE_CONFIG)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    for decoder_only in (True, False):
        out = phases.train_vae(0.003, data.Stream(5), 1e-3, [], vae, 10.0, decoder_only=decoder_only)
        moved = {k.split(".")[0] for k, v in out.state_dict().items() if not torch.equal(v, before[k])}
        assert moved == ({"decoder"} if decoder_only else {"encoder", "decoder"}), decoder_only


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--flux-minutes", "0"], "--flux-minutes 0 keeps a loaded transformer as it is: give --init-from"),
        (["--flux-minutes", "-1"], "--flux-minutes must not be negative"),
        (["--vae-minutes", "0"], "--vae-minutes must be positive"),
        (["--init-from", "ck", "--flux-minutes", "0", "--vae-tune-minutes", "1"], "would not read the latents"),
        (["--init-from", "ck", "--flux-minutes", "0", "--edit-weight", "4"], "--flux-minutes 0 trains no transformer"),
        (["--decoder-minutes", "-1"], "--decoder-minutes must not be negative"),
        (["--flux-minutes", "5", "--flux-steps", "100"], "two budgets for the one phase: give one"),
        (["--flux-steps", "0"], "--flux-steps must be positive"),
        (["--vae-from", "ck", "--flux-steps", "3", "--vae-tune-minutes", "-1"], "must not be negative"),
        (["--init-from", "ck", "--flux-minutes", "0", "--kind-mix", "move=2"], "--kind-mix draws the transformer's"),
        (["--kind-mix", "recolor=2"], "'recolor': each of recolour, move, remove, background, add at most once"),
        (["--kind-mix", "move=2,move=3"], "'move': each of"),
        (["--kind-mix", "move=2,"], "'': each of"),
        (["--kind-mix", "move"], "'' is not a number"),
        (["--kind-mix", "move=0"], "'move=0': the weight must be positive"),
        (["--kind-mix", "move=-1"], "'move=-1': the weight must be positive"),
        (["--kind-mix", "move=inf"], "'inf' is not a finite number"),
        (["--kind-mix", "move=nan"], "'nan' is not a finite number"),
    ],
)
def test_refused_arguments_are_named(train, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "missing") if a == "ck" else a for a in argv]  # refused before the folder is read
    with pytest.raises(SystemExit) as refused:
        train.check(train.parser(), train.parser().parse_args([*argv, "--out", str(tmp_path / "run")]))
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_a_decoder_run_keeps_the_transformer_and_the_latent_space(train, tmp_path):
    """--init-from the shipped model, --decoder-minutes, --flux-minutes 0 (shape weight accepted: a VAE phase
    runs): the written transformer, text encoders, VAE encoder and latent calibration are the shipped ones, bit for
    bit; the decoder is not."""
    from safetensors.torch import load_file

    from kontext_toy.checkpoints import small_kontext

    out, ck = tmp_path / "run", small_kontext()
    argv = ["--init-from", str(ck), "--decoder-minutes", "0.02", "--shape-weight", "10"]
    argv += ["--flux-minutes", "0", "--skip", "100", "--eval-n", "0", "--out", str(out)]
    run = subprocess.run([sys.executable, "-m", train.__name__, *argv], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    record = json.loads((out / "train_log.json").read_text())
    assert record["flux_steps"] == 0 and record["decoder_seconds"] > 0 and record["stream"]["edits"][0] == 100
    assert record["stream"]["edits"][1] - 100 == 16 * record["decoder_steps"] > 0  # 16 edits (32 images) a step
    files = {d: {part: next((d / part).glob("*.safetensors")) for part in ("transformer", "vae")} for d in (out, ck)}
    sha = {
        d: {part: hashlib.sha256(f.read_bytes()).hexdigest() for part, f in parts.items()} for d, parts in files.items()
    }
    # the record names the weights it started from and wrote, as sha256sum would: the transformer passes unchanged
    assert record["init_from_sha256"] == sha[ck]["transformer"] == record["written_sha256"]["transformer"]
    assert record["vae_from_sha256"] == sha[ck]["vae"] != sha[out]["vae"] == record["written_sha256"]["vae"]
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        (mine,), (shipped,) = ((d / part).glob("*.safetensors") for d in (out, ck))
        mine, shipped = load_file(mine), load_file(shipped)
        assert mine.keys() == shipped.keys()
        changed = {k for k in mine if not torch.equal(mine[k], shipped[k])}
        if part == "vae":
            assert changed and all(k.startswith("decoder.") for k in changed)
            configs = (json.loads((d / "vae" / "config.json").read_text()) for d in (out, ck))
            assert len({(c["scaling_factor"], c["shift_factor"]) for c in configs}) == 1
        else:
            assert not changed, part


def test_a_kept_transformer_refuses_a_vae_with_other_latents(train, tmp_path):
    """--flux-minutes 0 with --vae-from another folder: accepted only if that VAE encodes the same latents (same
    encoder and scale) as --init-from's own; a VAE with another encoder is refused by name, before --out is
    written."""
    from kontext_rt.pipeline import Pipeline
    from kontext_toy.checkpoints import small_kontext, write_diffusers_checkpoint

    pipe = Pipeline.from_pretrained(small_kontext(), backend="eager")
    other = tmp_path / "other"
    with torch.no_grad():
        pipe.vae.encoder.conv_in.weight.add_(1e-3)
    write_diffusers_checkpoint(other, pipe.transformer, pipe.vae, 0, train.MAX_SEQUENCE_LENGTH)
    out = tmp_path / "run"
    argv = ["--init-from", str(small_kontext()), "--vae-from", str(other), "--flux-minutes", "0"]
    argv += ["--eval-n", "0", "--out", str(out)]
    run = subprocess.run([sys.executable, "-m", train.__name__, *argv], capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "encodes other latents than its VAE" in run.stderr, run.stderr[-2000:]
    assert not out.exists()


@pytest.fixture(scope="module")
def compare():
    return importlib.import_module("kontext_toy.training.compare_runs")


@pytest.fixture
def one_thread():
    """torch on one thread, as compare_runs' workers run: another thread count sums in another order (1e-4 dB)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compare_runs_scores_as_kontext_rt_eval_does(compare, tmp_path, one_thread):
    """Each run's main cell is what `kontext-rt eval` reports for the same checkpoint, split, n and seed; the second
    noise draw is harness.evaluate on the same samples with the other seed (its definition)."""
    from kontext_rt.cli import main as cli
    from kontext_toy import harness, metrics
    from kontext_toy.checkpoints import small_kontext

    folder = small_kontext()
    assert cli(["eval", "--checkpoint", str(folder), "--split", "heldout", "--n", "5", "--seed", "7",
                "-o", str(tmp_path / "eval.json")]) == 0  # fmt: skip
    out = tmp_path / "cmp.json"
    argv = ["--run", "a", str(folder), "shipped", "--why", "test", "--n", "5", "--seed", "7", "--other-seed", "3"]
    assert compare.main([*argv, "-o", str(out)]) == 0
    record = json.loads(out.read_text())
    by_cli = json.loads((tmp_path / "eval.json").read_text())
    run = record["runs"]["a"]
    for key in (*compare.FULL, "autoencoder"):
        assert run["heldout"][key] == by_cli[key], key
    assert (
        run["sha256"]["transformer"]
        == hashlib.sha256((folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    )
    from kontext_rt import Pipeline

    samples = list(shapes.dataset("heldout", 5, seed=8, size=64))
    other = harness.evaluate(
        Pipeline.from_pretrained(folder), samples, steps=8, seed=3, drift_turns=1, embed=metrics.scene_embedding
    )
    got = record["same_samples_other_noise"]["runs"]["a"]["heldout"]
    assert {k: got[k] for k in compare.SUMMARY} == {k: other[k] for k in compare.SUMMARY}
    assert got["preservation_psnr"] != run["heldout"]["preservation_psnr"]  # another noise draw, not the same one
    assert set(record["runs"]["a"]) == {"what", "sha256", "train", "heldout"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--run", "a", "{folder}", "again"], "each NAME once"),
        (["--other-seed", "10"], "a seed other than --seed"),
        (["--n", "0"], "0 must be at least 1"),
        (["-o", "{tmp}/missing/c.json"], "a .json file in a folder that exists"),
        (["--run", "b", "{tmp}", "not a checkpoint"], "is not a diffusers folder"),
    ],
)
def test_compare_runs_refuses_before_scoring(compare, tmp_path, capsys, extra, message):
    from kontext_toy.checkpoints import small_kontext

    extra = [x.format(folder=small_kontext(), tmp=tmp_path) for x in extra]
    argv = ["--run", "a", str(small_kontext()), "shipped", "--why", "test", "-o", str(tmp_path / "c.json"), *extra]
    with pytest.raises(SystemExit):
        compare.main(argv)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()
