"""The CLI: real runs write images; bad input is one `error:` line, exit status 2, no output file."""

import subprocess
import sys

import pytest
from kontext_rt.cli import main
from PIL import Image


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
    code, err = run(["edit", picture, "make it blue", "--checkpoint", kontext_dir, "-o", out, "--steps", "2",
                     "--seed", "3", "--no-auto-resize", "--cache-dir", tmp_path / "c"], capsys)
    assert code == 0, err
    assert Image.open(out).size == (80, 48)
    assert "denoise" in err and "VAE decode" in err and "seed 3" in err
    assert not list(tmp_path.glob(".*partial*"))


def test_generate(kontext_dir, tmp_path, capsys):
    out = tmp_path / "g.jpg"
    code, err = run(["generate", "a cat", "--checkpoint", kontext_dir, "-o", out, "--steps", "1", "--width", "32",
                     "--height", "48", "--no-text-cache", "-q"], capsys)
    assert code == 0, err
    assert Image.open(out).size == (32, 48) and err == ""


def test_demo_runs_from_nothing(tmp_path, capsys):
    code, err = run(["demo", "--cache-dir", tmp_path, "--steps", "2", "-q"], capsys)
    assert code == 0, err
    assert "RANDOM" in err
    assert Image.open(tmp_path / "demo-output.png").size == (96, 64)


def test_demo_checkpoint_is_a_real_diffusers_folder(tmp_path):
    """diffusers loads what the runtime writes, and computes the same transformer output."""
    import torch
    from diffusers import FluxTransformer2DModel
    from kontext_rt import Pipeline
    from kontext_rt.demo import demo_checkpoint
    from kontext_rt.rope import rope_table, sequence_ids

    ckpt = demo_checkpoint(tmp_path)
    ours = Pipeline.from_pretrained(ckpt).transformer
    ref = FluxTransformer2DModel.from_pretrained(ckpt / "transformer").eval()
    g = torch.Generator().manual_seed(0)
    img, txt, pooled = torch.randn(1, 6, 64, generator=g), torch.randn(1, 5, 48, generator=g), torch.randn(1, 32)
    ids = sequence_ids(5, [(2, 3)])
    cos, sin = rope_table(ids, ours.cfg.axes_dim, ours.cfg.theta)
    with torch.no_grad():
        a = ours(img, None, txt, pooled, torch.tensor([0.5]), torch.tensor([2.5]), cos, sin)
        b = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=torch.tensor([0.5]),
                img_ids=ids[5:], txt_ids=ids[:5], guidance=torch.tensor([2.5]), return_dict=False)[0]
    assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize(
    "args,match",
    [
        (["edit", "{missing}", "x", "--checkpoint", "{ckpt}"], "file not found"),
        (["edit", "{text}", "x", "--checkpoint", "{ckpt}"], "not a readable image"),
        (["edit", "{pic}", "", "--checkpoint", "{ckpt}"], "prompt must be a non-empty string"),
        (["edit", "{pic}", "x", "--checkpoint", "{tmp}/none"], "no such checkpoint"),
        (["edit", "{pic}", "x", "--checkpoint", "{ckpt}", "--steps", "0"], "--steps: 0 must be at least 1"),
        (["edit", "{pic}", "x", "--checkpoint", "{ckpt}", "--guidance", "nan"], "not a finite number"),
        (["edit", "{pic}", "x", "--checkpoint", "{ckpt}", "--seed", "-4"], "-4 must be at least 0"),
        (["generate", "x", "--checkpoint", "{ckpt}", "--width", "100"], "width 100 is not a multiple of 16"),
        (["generate", "x", "--checkpoint", "{ckpt}", "--backend", "warp"], "unknown backend 'warp'"),
        (["generate", "x", "--checkpoint", "{ckpt}", "--device", "tpu:9"], "device"),
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
    r = subprocess.run([sys.executable, "-m", "kontext_rt.cli", "edit", str(tmp_path / "a.png"), "x",
                        "--checkpoint", str(tmp_path), "-o", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")


def test_demo_checkpoint_leaves_the_global_rng_alone(tmp_path):
    import torch
    from kontext_rt.demo import demo_checkpoint

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    demo_checkpoint(tmp_path)
    assert torch.equal(torch.rand(3), expected)
