"""A checkpoint trained at other sizes than FLUX.1's says so in model_index.json, and every door honours it.

The shipped small Kontext was trained on 64x64 scenes. At FLUX.1 Kontext's defaults a 64x64 input was snapped to
1024x1024 (its preferred resolutions, about 1 MP) and the model drew stripes for minutes. Now model_index.json's
"_kontext_rt": {"preferred_resolutions": [[64, 64]]} (a key diffusers ignores) makes auto-resize snap to 64x64 and
generate default to it, on the API, the CLI and the server; a size far from it warns before the run.
"""

import json
import shutil
import warnings

import pytest
from PIL import Image

from kontext_rt import Pipeline
from kontext_rt.cli import main
from kontext_rt.errors import CheckpointError, OutsideTrainedSize
from kontext_rt.image import PREFERRED_KONTEXT_RESOLUTIONS
from kontext_rt.weights.formats import detect
from kontext_toy.checkpoints import small_kontext


@pytest.fixture(scope="module")
def small():
    return Pipeline.from_pretrained(small_kontext())


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (256, 192), (30, 120, 200)).save(path)
    return path


def test_the_shipped_model_says_it_was_trained_at_64_px():
    assert detect(small_kontext()).preferred_resolutions() == ((64, 64),)


def test_the_api_snaps_and_generates_at_the_trained_size(small, photo):
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideTrainedSize)  # the defaults never warn
        assert small.edit(photo, "make the circle red", steps=2, seed=0).size == (64, 64)
        assert small.generate("a red circle", steps=2, seed=0).size == (64, 64)
    assert small.edit(photo, "x", steps=1, seed=0, auto_resize=False, width=64, height=64).size == (64, 64)


def test_a_size_far_from_the_trained_one_warns(small):
    with pytest.warns(OutsideTrainedSize, match=r"512x512 is far from the size this checkpoint was trained at \(64x64"):
        small.generate("a red circle", width=512, height=512, steps=1, seed=0, output="latent")


def test_flux_checkpoints_keep_the_kontext_resolutions(kontext_dir):
    pipe = Pipeline.from_pretrained(kontext_dir)
    assert pipe.resolutions == tuple(PREFERRED_KONTEXT_RESOLUTIONS) and pipe.default_size == (1024, 1024)
    assert pipe.trained_sizes is None


@pytest.mark.parametrize("bad", [[[64, 60]], [], "64x64", [[64, 64, 64]], [[0, 64]], [[4096, 64]]])
def test_a_bad_declaration_is_refused_before_the_weights(kontext_dir, tmp_path, bad, monkeypatch):
    from kontext_rt.weights.formats import CheckpointFormat

    monkeypatch.setattr(CheckpointFormat, "load_transformer", lambda *a: pytest.fail("weights were read"))
    folder = tmp_path / "ckpt"
    shutil.copytree(kontext_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_kontext_rt"] = {"preferred_resolutions": bad}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="preferred_resolutions must be a list of"):
        Pipeline.from_pretrained(folder)


def test_the_cli_edits_and_generates_at_the_trained_size(photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    args = ["--checkpoint", small_kontext(), "-o", out, "--steps", "2", "--seed", "0", "--no-text-cache"]
    assert main([str(a) for a in ["edit", photo, "make the circle red", *args]]) == 0
    err = capsys.readouterr().err
    assert Image.open(out).size == (64, 64) and "context 256x192 -> 64x64" in err and "warning" not in err, err
    assert main([str(a) for a in ["generate", "a red circle", *args]]) == 0
    assert Image.open(out).size == (64, 64) and "warning" not in capsys.readouterr().err
    assert main([str(a) for a in ["generate", "a red circle", *args, "--width", "512", "--height", "512"]]) == 0
    assert "warning: 512x512 is far from the size this checkpoint was trained at" in capsys.readouterr().err


def test_the_server_edits_and_generates_at_the_trained_size(small, photo):
    import base64
    import io

    from kontext_rt.serve import Settings, create_app
    from kontext_rt.serve.background import serving
    from tests.test_serve import post_form, post_json

    with serving(create_app(small, Settings())) as port:
        status, _, body = post_form(
            port, "/v1/images/edits", {"prompt": "x", "steps": "2"}, [("image", "p.png", photo.read_bytes())]
        )
        assert status == 200, body
        assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (64, 64)
        status, _, body = post_json(port, "/v1/images/generations", {"prompt": "x", "steps": 2})
        assert status == 200, body
        assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (64, 64)
