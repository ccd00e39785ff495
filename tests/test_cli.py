"""The CLI: real runs write images; bad input is one `error:` line, exit status 2, no output file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kontext_rt.cli import build_parser, main


def run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (80, 48), (200, 30, 30)).save(path)
    return path


def test_edit_writes_image_and_summary(kontext_dir, picture, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, err = run(
        [
            "edit",
            picture,
            "make it blue",
            "--checkpoint",
            kontext_dir,
            "-o",
            out,
            "--steps",
            "2",
            "--seed",
            "3",
            "--no-auto-resize",
            "--cache-dir",
            tmp_path / "c",
        ],
        capsys,
    )
    assert code == 0, err
    assert Image.open(out).size == (80, 48)
    assert "denoise" in err and "VAE decode" in err and "seed 3" in err
    assert not list(tmp_path.glob(".*partial*"))


def test_generate(kontext_dir, tmp_path, capsys):
    out = tmp_path / "g.jpg"
    code, err = run(
        [
            "generate",
            "a cat",
            "--checkpoint",
            kontext_dir,
            "-o",
            out,
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "48",
            "--no-text-cache",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert Image.open(out).size == (32, 48) and err == ""


def test_solver_and_sigmas_reach_the_pipeline(kontext_dir, picture, tmp_path, capsys):
    """--solver and --sigmas (with the --steps they imply) give the Python API's image."""
    import numpy as np

    from kontext_rt import Pipeline

    out = tmp_path / "out.png"
    flags = ["--solver", "dpm++2m", "--sigmas", "0.9,0.6,0.3,0", "--steps", "3", "--seed", "3", "--no-auto-resize"]
    code, err = run(["edit", picture, "make it blue", "--checkpoint", kontext_dir, "-o", out, "-q", *flags], capsys)
    assert code == 0, err
    pipe = Pipeline.from_pretrained(kontext_dir)
    kw = dict(seed=3, auto_resize=False, sigmas=[0.9, 0.6, 0.3])
    want = pipe.edit(Image.open(picture), "make it blue", solver="dpm++2m", **kw)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))
    assert not np.array_equal(np.asarray(want), np.asarray(pipe.edit(Image.open(picture), "make it blue", **kw)))


def test_demo_runs_from_nothing(tmp_path, capsys):
    """The shipped model, no checkpoint flag, nothing written but the picture (and the text cache)."""
    from kontext_toy.commands import EDITS, LABEL, SCALE

    code, err = run(["demo", "--cache-dir", tmp_path, "--steps", "2", "-q"], capsys)
    assert code == 0 and err == ""
    side = 64 * SCALE
    assert Image.open(tmp_path / "demo-output.png").size == (3 * side + 16, EDITS * (side + LABEL + 4) + 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-output.png", "text"]


def test_demo_says_what_each_edit_did_and_counts_truthfully(tmp_path, capsys):
    """One line per edit, and the counts printed are the edits its lines call done, out of the held-out draws."""
    from kontext_toy.commands import SESSION_KINDS, SINGLE_KINDS

    out = tmp_path / "d.png"
    code, err = run(["demo", "-o", out, "--steps", "2", "--no-text-cache"], capsys)
    assert code == 0, err
    lines = err.splitlines()
    singles = [line for line in lines if line.startswith("edit ")]
    turns = [line for line in lines if line.startswith("turn ")]
    assert len(singles) == len(SINGLE_KINDS) and len(turns) == len(SESSION_KINDS)
    assert all("denoise" in t and "seed" in t for t in singles + turns)
    done = sum('": done' in t for t in singles), sum('": done' in t for t in turns)
    summary = f"{done[0]} of {len(SINGLE_KINDS)} single edits and {done[1]} of {len(SESSION_KINDS)} session turns"
    assert f"{summary} carried out; wrote {out}" in err
    assert "heldout split" in err


def test_the_demo_counts_in_the_docs_are_what_it_prints(tmp_path, capsys):
    """README.md and docs/cli.md quote the demo's count line at its defaults: it must be what the demo prints."""
    root = Path(__file__).resolve().parents[1]
    code, err = run(["demo", "-o", tmp_path / "d.png", "--no-text-cache"], capsys)
    assert code == 0, err
    count = next(line for line in err.splitlines() if "single edits and" in line).partition(";")[0]
    for doc in ("README.md", "docs/cli.md"):
        assert f"`{count}`" in " ".join((root / doc).read_text().split()), (doc, count)


def test_the_demo_runs_at_the_steps_the_model_was_scored_at():
    """The demo's default steps are the bar's (its shown counts are comparable to the measured rates)."""
    from kontext_toy.bar import SETTINGS

    args = build_parser().parse_args(["demo"])
    assert args.steps == SETTINGS["steps"]
    assert build_parser().parse_args(["edit", "a.png", "x", "--checkpoint", "c"]).steps is None


def test_eval_refuses_a_bad_output_before_loading(tmp_path, capsys):
    code, err = run(["eval", "--checkpoint", tmp_path / "missing", "-o", tmp_path / "r.txt"], capsys)
    assert code == 2 and "a .json file" in err and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, a folder no one can create files in")
def test_eval_refuses_an_output_folder_it_cannot_write_before_loading(capsys):
    code, err = run(["eval", "--n", "1", "-o", "/proc/r.json"], capsys)
    assert code == 2 and err.startswith("error: output /proc/r.json") and "Traceback" not in err


def test_demo_checks_its_arguments_before_making_any_folder(tmp_path, capsys):
    for args in (["-o", tmp_path / "new" / "x.txt"], ["-o", tmp_path / "new" / "x.png", "--guidance", "500"]):
        code, err = run(["demo", "--cache-dir", tmp_path / "cache", *args], capsys)
        assert code == 2 and err.startswith("error:"), err
    code, err = run(["demo", "--cache-dir", tmp_path / "cache", "--seed", str(2**64 - 2)], capsys)
    assert code == 2 and "--seed" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_writes_the_harness_result(tmp_path, capsys):
    from kontext_toy.checkpoints import demo_checkpoint

    out = tmp_path / "r.json"
    ckpt = demo_checkpoint(tmp_path / "cache")
    code = main([str(a) for a in ["eval", "--checkpoint", ckpt, "--n", "6", "--steps", "1", "--turns", "1", "-o", out]])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    assert result["n_edit"] == 5 and result["n_generate"] == 1 and result["drift"]["turns"] == 1
    # the same edits' exact answers through the checkpoint's autoencoder, scored alike
    ceiling = result["autoencoder"]
    assert {k: v["n"] for k, v in ceiling["per_kind"].items()} == {k: v["n"] for k, v in result["per_kind"].items()}
    assert 0.0 <= ceiling["edit_success_rate"] <= 1.0 and ceiling["preservation_psnr"] > 0
    assert "autoencoder alone" in printed.out
    assert "eval: 100%" in printed.err and "6/6" in printed.err  # progress, one step per sample
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_demo_checkpoint_is_a_real_diffusers_folder(tmp_path):
    """diffusers loads what the runtime writes, and computes the same transformer output."""
    import torch
    from diffusers import FluxTransformer2DModel

    from kontext_rt import Pipeline
    from kontext_rt.model.rope import rope_table, sequence_ids
    from kontext_toy.checkpoints import demo_checkpoint

    ckpt = demo_checkpoint(tmp_path)
    ours = Pipeline.from_pretrained(ckpt).transformer
    ref = FluxTransformer2DModel.from_pretrained(ckpt / "transformer").eval()
    g = torch.Generator().manual_seed(0)
    img, txt, pooled = torch.randn(1, 6, 64, generator=g), torch.randn(1, 5, 48, generator=g), torch.randn(1, 32)
    ids = sequence_ids(5, [(2, 3)])
    cos, sin = rope_table(ids, ours.cfg.axes_dim, ours.cfg.theta)
    with torch.no_grad():
        a = ours(img, None, txt, pooled, torch.tensor([0.5]), torch.tensor([2.5]), cos, sin)
        b = ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=pooled,
            timestep=torch.tensor([0.5]),
            img_ids=ids[5:],
            txt_ids=ids[:5],
            guidance=torch.tensor([2.5]),
            return_dict=False,
        )[0]
    assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize(
    "args,match",
    [
        (["edit", "{missing}", "x", "--checkpoint", "{ckpt}"], "file not found"),
        (["edit", "{text}", "x", "--checkpoint", "{ckpt}"], "not a readable image"),
        (["edit", "{pic}", "", "--checkpoint", "{ckpt}"], "prompt must be a non-empty string"),
        (["edit", "{pic}", "x", "--checkpoint", "{tmp}/none"], "no such checkpoint"),
        (["edit", "{pic}", "x", "--checkpoint", "{ckpt}", "--steps", "0"], "--steps: 0 must be at least 1"),
        (["generate", "x", "--checkpoint", "{ckpt}", "--steps", "1001"], "--steps: 1001 is more than 1000 steps"),
        (["edit", "{pic}", "x", "--checkpoint", "{ckpt}", "--guidance", "nan"], "not a finite number"),
        (["edit", "{pic}", "x", "--checkpoint", "{ckpt}", "--seed", "-4"], "-4 must be at least 0"),
        (["edit", "{pic}", "x", "--checkpoint", "{ckpt}", "--step-cache", "-0.1"], "--step-cache: '-0.1' is negative"),
        (["generate", "x", "--checkpoint", "{ckpt}", "--step-cache", "inf"], "--step-cache: 'inf' is not a finite"),
        (["generate", "x", "--checkpoint", "{ckpt}", "--width", "100"], "width 100 is not a multiple of 16"),
        (["generate", "x", "--checkpoint", "{ckpt}", "--backend", "warp"], "unknown backend 'warp'"),
        (["generate", "x", "--checkpoint", "{ckpt}", "--device", "tpu:9"], "device"),
        (
            ["generate", "x", "--checkpoint", "{ckpt}", "--solver", "heun"],
            "--solver: solver must be one of euler, dpm++2m; got 'heun'",
        ),
        (["generate", "x", "--checkpoint", "{ckpt}", "--sigmas", "1,0.5,a"], "not a comma list of numbers"),
        (["generate", "x", "--checkpoint", "{ckpt}", "--sigmas", "0.5,0.7"], "--sigmas: sigmas must decrease"),
        (["edit", "{pic}", "x", "--checkpoint", "{ckpt}", "--sigmas", "1,.5,0", "--steps", "3"], "--steps 3 disagrees"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_file(args, match, kontext_dir, picture, tmp_path, capsys):
    (tmp_path / "t.png").write_text("not an image")
    subs = {"{missing}": tmp_path / "nope.png", "{text}": tmp_path / "t.png", "{pic}": picture, "{ckpt}": kontext_dir}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, str(v))
        argv.append(a.replace("{tmp}", str(tmp_path)))
    out = tmp_path / "out.png"
    code, err = run(argv + ["-o", out, "--cache-dir", tmp_path / "c"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_bad_output_path_fails_before_any_work(picture, tmp_path, capsys):
    code, err = run(["edit", picture, "x", "--checkpoint", tmp_path / "missing", "-o", tmp_path / "o.xyz"], capsys)
    assert code == 2 and "unknown image extension" in err


def test_console_script_has_no_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kontext_rt.cli",
            "edit",
            str(tmp_path / "a.png"),
            "x",
            "--checkpoint",
            str(tmp_path),
            "-o",
            str(tmp_path / "o.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")


def test_demo_checkpoint_leaves_the_global_rng_alone(tmp_path):
    import torch

    from kontext_toy.checkpoints import demo_checkpoint

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    demo_checkpoint(tmp_path)
    assert torch.equal(torch.rand(3), expected)


# ---- refused before anything loads ------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Pipeline.from_pretrained fails if called: a check that should come first did not."""
    import kontext_rt

    def loaded(*a, **k):
        raise AssertionError("the checkpoint was loaded before the check")

    monkeypatch.setattr(kontext_rt.Pipeline, "from_pretrained", loaded)


def _one_error_line(code, err, match):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err


@pytest.mark.parametrize(
    "args,match",
    [
        (["generate", "x", "--width", "4096"], "width 4096 is over the 2048 px limit"),
        (["generate", "x", "--height", "2064"], "height 2064 is over the 2048 px limit"),
        (["edit", "{pic}", "x", "--width", "4096"], "width 4096 is over the 2048 px limit"),
        (["edit", "{big}", "x", "--no-auto-resize"], "2064x32, over the 2048 px limit"),
        (["edit", "{pic}", "x", "--seed", str(2**70)], "seed must be a non-negative integer up to 2**64-1"),
        (["generate", "x", "--seed", str(2**64)], "seed must be a non-negative integer up to 2**64-1"),
        (["edit", "{pic}", "x", "--guidance", "1e308"], "guidance must be a number in [0, 100]"),
        (["generate", "x", "--guidance", "-0.5"], "guidance must be a number in [0, 100]"),
        (["edit", "{pic}", "x", "-o", "{pic}"], "is the input image"),
        (["edit", "{pic}", "x", "-o", "{link}"], "is the input image"),
        (["edit", "{pic}", "x", "--extra-image", "{other}", "-o", "{other}"], "is the input image"),
    ],
)
def test_refused_before_the_checkpoint_loads(args, match, no_loading, picture, tmp_path, capsys):
    Image.new("RGB", (2064, 32)).save(tmp_path / "big.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "other.png")
    (tmp_path / "link.png").symlink_to(picture)
    subs = {
        "{pic}": picture,
        "{big}": tmp_path / "big.png",
        "{other}": tmp_path / "other.png",
        "{link}": tmp_path / "link.png",
    }
    argv = [str(subs.get(a, a)) for a in args]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out.png")]
    before = {p: p.read_bytes() for p in subs.values()}
    code, err = run(argv + ["--checkpoint", tmp_path / "ckpt", "--cache-dir", tmp_path / "c"], capsys)
    _one_error_line(code, err, match)
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "c").exists()
    assert all(p.read_bytes() == data for p, data in before.items())


def _unwritable_folders():
    """Folders nobody may create files in: a chmod 555 one (not for root, who ignores modes) and sysfs."""
    import os

    cases = [pytest.param("chmod", marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere"))]
    return cases + [pytest.param("/sys", marks=pytest.mark.skipif(not os.path.isdir("/sys"), reason="no sysfs"))]


@pytest.mark.parametrize("folder", _unwritable_folders())
def test_unwritable_output_folder_is_refused_first(folder, no_loading, picture, tmp_path, capsys):
    from pathlib import Path

    if folder == "chmod":
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
    out = Path(folder) / "kontext-rt-out.png"
    code, err = run(["edit", picture, "x", "--checkpoint", tmp_path, "-o", out], capsys)
    _one_error_line(code, err, f"output {out}: cannot write in {folder}")


def test_a_failed_save_names_the_users_path(kontext_dir, picture, tmp_path, capsys, monkeypatch):
    import errno

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "out.png"
    code, err = run(
        [
            "edit",
            picture,
            "x",
            "--checkpoint",
            kontext_dir,
            "-o",
            out,
            "--steps",
            "1",
            "-q",
            "--no-auto-resize",
            "--no-text-cache",
        ],
        capsys,
    )
    _one_error_line(code, err, f"output {out}: cannot write it (No space left on device)")
    assert "partial" not in err and not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_missing_t5_tokenizer_file_is_refused(kontext_dir, picture, tmp_path, capsys, monkeypatch):
    import shutil

    from kontext_rt.weights.formats import CheckpointFormat

    def loaded(*a, **k):
        raise AssertionError("transformer weights read before the tokenizer check")

    monkeypatch.setattr(CheckpointFormat, "load_transformer", loaded)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(kontext_dir, ckpt)
    (ckpt / "tokenizer_2" / "tokenizer.json").unlink()
    code, err = run(["edit", picture, "x", "--checkpoint", ckpt, "-o", tmp_path / "o.png"], capsys)
    _one_error_line(code, err, "tokenizer_2: no tokenizer files (it needs tokenizer.json or spiece.model)")


# ---- after the run has started ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["input", "bug"])
def test_errors_during_the_run(kind, kontext_dir, picture, tmp_path, capsys, monkeypatch):
    """A KontextError is one `error:` line, exit 2; anything else is a bug: traceback, a line saying so, exit 1.
    Raised in VAE decode, after the progress bar started: the error begins a line of its own."""
    from kontext_rt import InputError
    from kontext_rt.cli import BUG_LINE
    from kontext_rt.model.vae import AutoEncoder

    def decode(self, z):
        raise InputError("refused in decode") if kind == "input" else ZeroDivisionError("a bug in decode")

    monkeypatch.setattr(AutoEncoder, "decode", decode)
    out = tmp_path / "out.png"
    code, err = run(
        [
            "edit",
            picture,
            "x",
            "--checkpoint",
            kontext_dir,
            "-o",
            out,
            "--steps",
            "2",
            "--no-auto-resize",
            "--no-text-cache",
        ],
        capsys,
    )
    lines = err.split("\n")  # the bar redraws with \r: only \n starts a line on a terminal
    assert "denoise" in err and not out.exists() and not list(tmp_path.glob(".*partial*"))
    if kind == "input":
        assert code == 2 and "Traceback" not in err
        assert [line for line in lines if "error" in line] == ["error: refused in decode"], err
    else:
        assert code == 1 and "Traceback (most recent call last)" in err and "ZeroDivisionError: a bug in decode" in err
        assert [line for line in lines if "error:" in line] == [BUG_LINE], err


def test_long_prompt_warns_with_the_token_counts(kontext_dir, picture, tmp_path, capsys):
    from transformers import CLIPTokenizer, T5TokenizerFast

    prompt = "make the disc a shiny red apple " * 30
    n_t5 = len(T5TokenizerFast.from_pretrained(kontext_dir / "tokenizer_2")(prompt).input_ids)
    n_clip = len(CLIPTokenizer.from_pretrained(kontext_dir / "tokenizer")(prompt).input_ids)
    assert n_t5 > 512 and n_clip > 77  # the kontext checkpoint's max_sequence_length, CLIP's context
    out = tmp_path / "out.png"
    code, err = run(
        [
            "edit",
            picture,
            prompt,
            "--checkpoint",
            kontext_dir,
            "-o",
            out,
            "--steps",
            "1",
            "-q",
            "--no-auto-resize",
            "--no-text-cache",
        ],
        capsys,
    )
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), err
    assert f"{n_t5} T5 tokens, max_sequence_length 512" in lines[0] and f"{n_clip} CLIP tokens" in lines[0]


def test_summary_names_the_context_resize(kontext_dir, tmp_path, capsys):
    src = tmp_path / "odd.png"
    Image.new("RGB", (88, 40)).save(src)
    out = tmp_path / "out.png"
    code, err = run(
        [
            "edit",
            src,
            "x",
            "--checkpoint",
            kontext_dir,
            "-o",
            out,
            "--steps",
            "1",
            "--no-auto-resize",
            "--no-text-cache",
        ],
        capsys,
    )
    assert code == 0, err
    floored = f"{88 // 16 * 16}x{40 // 16 * 16}"
    assert f"context 88x40 -> {floored} | {floored} -> {out}" in err
    assert Image.open(out).size == (88 // 16 * 16, 40 // 16 * 16)


def test_version_is_the_package_version(capsys):
    import re
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE).group(1)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kontext-rt {version}"


def test_advertised_export_flags_exist():
    """Every `kontext-rt export ...` in a message or doc (README.md and docs/*.md) names only flags the export command
    has."""
    import re
    from pathlib import Path

    from kontext_rt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["export"]
    root = Path(__file__).parents[1]
    texts = [p.read_text() for folder in ("runtime/kontext_rt", "export") for p in (root / folder).glob("*.py")]
    texts += [p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]]
    used = {
        flag
        for t in texts
        for cmd in re.findall(r"kontext-rt export([^`\"']*)", t)
        for flag in re.findall(r"(?<!\w)--[\w-]+", cmd)
    }
    assert used and used <= set(sub._option_string_actions), used - set(sub._option_string_actions)


def test_unwritable_text_cache_warns_and_runs_without_it(kontext_dir, tmp_path, capsys):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")  # its text/ subfolder cannot be created, whoever runs this
    out = tmp_path / "g.png"
    code, err = run(
        [
            "generate",
            "a cat",
            "--checkpoint",
            kontext_dir,
            "-o",
            out,
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "32",
            "--cache-dir",
            blocker,
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "without the on-disk text cache" in lines[0]
    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_a_device_this_runtime_does_not_run_on_is_a_usage_error(kontext_dir, picture, tmp_path, capsys, device):
    out = tmp_path / "o.png"
    code, err = run(["edit", picture, "x", "--checkpoint", kontext_dir, "-o", out, "--device", device], capsys)
    assert code == 2 and err.strip() == f"error: device {device}: kontext-rt runs on 'cpu' or 'cuda' devices"
    assert not out.exists()


def test_demo_on_a_device_this_runtime_does_not_run_on_writes_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    code, err = run(["demo", "--device", "mps", "--cache-dir", cache], capsys)
    assert code == 2 and err.strip() == "error: device mps: kontext-rt runs on 'cpu' or 'cuda' devices"
    assert not cache.exists()


# ---- the speed options: the same load options on every door --------------------------------------------------


SPEED = ["--dtype", "bf16", "--fp8", "dynamic", "--no-hoist", "--backend", "eager"]


def speed_pipe(kontext_dir, lora):
    """What the speed flags SPEED and --lora LORA:0.5 ask for, through the Python API."""
    import torch

    from kontext_rt import Optimizations, Pipeline

    opts = Optimizations(fp8="dynamic", hoist=False)
    return Pipeline.from_pretrained(
        kontext_dir, dtype=torch.bfloat16, backend="eager", optimize=opts, loras=[(lora, 0.5)]
    )


def test_speed_options_give_the_apis_pixels(kontext_dir, picture, lora_file, tmp_path, capsys, monkeypatch):
    """edit and generate with --fp8 dynamic --no-hoist --lora FILE:0.5 load what the API loads with the same
    options, and give its pixels (the FP8 stand-in on the CPU)."""
    import numpy as np

    from kontext_rt import Optimizations, Pipeline

    loads = []  # the LoadSpec of each CLI load
    real = Pipeline.load.__func__
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, spec: loads.append(spec) or real(cls, spec)))
    out = tmp_path / "out.png"
    common = ["--checkpoint", kontext_dir, "-o", out, "--steps", "2", "--seed", "3", "--no-text-cache", "-q", *SPEED]
    lora = ["--lora", f"{lora_file}:0.5"]
    pipe = speed_pipe(kontext_dir, lora_file)
    runs = {
        "edit": lambda: pipe.edit(str(picture), "make it blue", steps=2, seed=3, auto_resize=False),
        "generate": lambda: pipe.generate("a fox", width=32, height=32, steps=2, seed=3),
    }
    commands = {"edit": ["edit", picture, "make it blue", "--no-auto-resize"], "generate": ["generate", "a fox"]}
    commands["generate"] += ["--width", "32", "--height", "32"]
    for name, command in commands.items():
        want = runs[name]
        code, err = run([*command, *common, *lora], capsys)
        assert code == 0, err
        assert loads[-1].optimize == Optimizations(fp8="dynamic", hoist=False)
        assert list(loads[-1].loras) == [(str(lora_file), 0.5)]
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want()))
    plain = Image.open(out).copy()
    code, err = run(["generate", "a fox", "--width", "32", "--height", "32", *common], capsys)
    assert code == 0 and list(loads[-1].loras) == [], err
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(plain)), "--lora made no difference"


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--cuda-graphs"], "cuda_graphs needs a CUDA device"),
        (["--fp8", "dynamic"], "fp8 linears produce bfloat16"),
        (["--dtype", "bf16", "--fp8", "static"], "fp8_calibration"),
        (["--fp8", "fast"], "invalid choice"),
        (["--lora", "missing.safetensors"], "missing.safetensors"),
        (["--attention", "flash"], "invalid choice"),
        (["--attention", "fa3"], "attention='fa3' runs FA3 in bf16 or fp16"),
        (["--dtype", "bf16", "--attention", "fa3-fp8"], "only backend='triton' loads"),
        (["--dtype", "bf16", "--backend", "triton", "--attention", "fa3"], "FA3 is built for head dim 128"),
    ],
)
def test_bad_speed_options_are_one_error_line(kontext_dir, picture, tmp_path, capsys, flags, words):
    out = tmp_path / "out.png"
    code, err = run(["edit", picture, "x", "--checkpoint", kontext_dir, "-o", out, "--steps", "1", *flags], capsys)
    assert code == 2 and err.startswith("error: ") and words in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["edit", "generate", "demo", "serve"])
def test_attention_reaches_optimize_on_every_loading_command(command):
    """--attention is a load option: every command that loads a pipeline takes it into Optimizations, and the
    speed summary (the server's start line) names it when it is not auto."""
    from kontext_rt import Optimizations
    from kontext_rt.cli_args import optimize_kwargs, speed_summary

    rest = {"edit": ["in.png", "x", "--checkpoint", "c"], "generate": ["x", "--checkpoint", "c"], "demo": []}
    argv = [command, *rest.get(command, ["--checkpoint", "c"])]
    optimize = Optimizations(**optimize_kwargs(build_parser().parse_args([*argv, "--attention", "fa3-fp8"])))
    assert optimize.attention == "fa3-fp8" and speed_summary(optimize, []) == "attention fa3-fp8"
    default = Optimizations(**optimize_kwargs(build_parser().parse_args(argv)))
    assert default.attention == "auto" and speed_summary(default, []) == "no speed options"


def test_lora_spec_reads_an_optional_strength():
    from kontext_rt.cli_args import lora_spec

    assert lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert lora_spec("a.safetensors:0.25") == ("a.safetensors", 0.25)
    assert lora_spec("/x:y/a.safetensors") == ("/x:y/a.safetensors", 1.0)
