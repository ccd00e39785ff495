"""The variant comes from configuration or tensor shapes, never from a file name: a BFL file of FLUX.1 [dev]
shapes (which FLUX.1 Kontext [dev] shares) needs the caller's word, refused without it before any weights are read;
a stated variant the checkpoint contradicts is refused."""

import pytest
import torch
from PIL import Image

from kontext_rt import CheckpointError, InputError, Pipeline
from kontext_rt.cli import main
from kontext_rt.weights.formats import detect
from kontext_rt.weights.safetensors_io import TensorFiles
from tests.builders import bfl_checkpoint


@pytest.fixture(scope="module")
def plain(tmp_path_factory, kontext_dir):
    """Kontext weights in a BFL file whose name says nothing."""
    return bfl_checkpoint(tmp_path_factory.mktemp("plain"), kontext_dir, name="model.safetensors")


@pytest.fixture
def no_weight_reads(monkeypatch):
    def refuse(self, key):
        raise AssertionError(f"tensor {key!r} was read")

    monkeypatch.setattr(TensorFiles, "get", refuse)


def test_stated_kontext_loads_a_plainly_named_file(plain, kontext_dir):
    pipe = Pipeline.from_pretrained(plain["flux"], text_encoders=plain["text_encoders"], variant="flux-kontext-dev")
    assert pipe.variant.name == "flux-kontext-dev"
    ref = Pipeline.from_pretrained(kontext_dir)
    for k, v in ref.transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[k], v), k


def test_unstated_variant_is_refused_before_any_weights(plain, no_weight_reads):
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: .*guidance embedding.*any of flux-kontext-dev, "
        r"flux-dev; say which with variant=NAME \(CLI: --variant NAME\)",
    ):
        Pipeline.from_pretrained(plain["flux"], text_encoders=plain["text_encoders"])
    # the guard itself works: a stated variant goes on to read the weights, which the patch refuses
    with pytest.raises(AssertionError, match="was read"):
        Pipeline.from_pretrained(plain["flux"], text_encoders=plain["text_encoders"], variant="flux-dev")


@pytest.mark.parametrize("name", ["flux1-kontext-dev.safetensors", "flux1-schnell.safetensors"])
def test_file_name_never_decides(tmp_path, kontext_dir, schnell_dir, name):
    """Dev-shaped weights under a Kontext (or any) name stay ambiguous; schnell-shaped weights are schnell
    whatever the name; each takes only the variants its shapes allow."""
    dev = detect(bfl_checkpoint(tmp_path / "dev", kontext_dir, name=name)["flux"])
    assert dev.variants() == ("flux-kontext-dev", "flux-dev")
    with pytest.raises(CheckpointError, match="say which with variant=NAME"):
        dev.variant()
    assert dev.variant("flux-dev").name == "flux-dev"
    assert dev.variant("flux-kontext-dev").name == "flux-kontext-dev"
    with pytest.raises(
        CheckpointError,
        match=r"variant 'flux-schnell' does not fit this checkpoint: its tensors "
        r"include a guidance embedding",
    ):
        dev.variant("flux-schnell")

    files = bfl_checkpoint(tmp_path / "schnell", schnell_dir, name=name, vae=False)
    files["ae"].write_bytes(b"")  # its tiny VAE has no BFL form; only the transformer's shapes matter here
    schnell = detect(files["flux"])
    assert schnell.variant().name == "flux-schnell"
    assert schnell.variant(if_ambiguous="flux-kontext-dev").name == "flux-schnell"
    with pytest.raises(CheckpointError, match="'flux-kontext-dev' does not fit this checkpoint: its tensors lack"):
        schnell.variant("flux-kontext-dev")


def test_stated_variant_the_shapes_contradict_is_refused_before_weights(plain, no_weight_reads):
    with pytest.raises(CheckpointError, match="'flux-schnell' does not fit this checkpoint"):
        Pipeline.from_pretrained(plain["flux"], text_encoders=plain["text_encoders"], variant="flux-schnell")


def test_diffusers_folder_says_its_own_variant(kontext_dir, schnell_dir):
    assert detect(kontext_dir).variant().name == "flux-kontext-dev"
    assert detect(schnell_dir).variant().name == "flux-schnell"
    with pytest.raises(
        CheckpointError, match="model_index.json names the pipeline FluxKontextPipeline, so it is flux-kontext-dev"
    ):
        detect(kontext_dir).variant("flux-dev")
    with pytest.raises(InputError, match="variant 'flux-pro' is not one of flux-kontext-dev, flux-dev, flux-schnell"):
        detect(kontext_dir).variant("flux-pro")


def test_ae_is_refused_for_a_diffusers_folder(kontext_dir, plain):
    with pytest.raises(InputError, match="a diffusers folder has its own vae/"):
        detect(kontext_dir, ae=plain["ae"])


# ---- CLI: edit takes flux-kontext-dev for an ambiguous file, generate needs --variant ---------------------------


def _cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_generate_needs_variant_and_edit_takes_kontext(plain, tmp_path, capsys):
    common = [
        "--checkpoint",
        plain["flux"],
        "--text-encoders",
        plain["text_encoders"],
        "--steps",
        "1",
        "--no-text-cache",
        "-q",
    ]
    out = tmp_path / "g.png"
    code, err = _cli(["generate", "a cat", "-o", out, "--width", "32", "--height", "32", *common], capsys)
    assert code == 2 and "--variant NAME" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, err = _cli(
        ["generate", "a cat", "-o", out, "--width", "32", "--height", "32", "--variant", "flux-dev", *common], capsys
    )
    assert code == 0, err
    picture = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(picture)
    code, err = _cli(["edit", picture, "make it blue", "-o", tmp_path / "e.png", *common], capsys)
    assert code == 0, err
    code, err = _cli(
        ["edit", picture, "make it blue", "-o", tmp_path / "e.png", "--variant", "flux-schnell", *common], capsys
    )
    assert code == 2 and "'flux-schnell' does not fit this checkpoint" in err
