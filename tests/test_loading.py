"""Checkpoint layouts: BFL single files load to the same outputs as the diffusers folder; bad files get errors
that name the file and the key."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from kontext_rt import CheckpointError, Pipeline
from kontext_rt.weights.formats import detect
from tests.builders import bfl_checkpoint

H, W = 48, 80


def _edit_latent(pipe, seed=7):
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8))
    noise = torch.randn(1, (H // 16) * (W // 16), 64, generator=torch.Generator().manual_seed(seed))
    return pipe.edit(img, "make it red", steps=3, auto_resize=False, latents=noise, output="latent")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file_matches_diffusers_folder(kontext_dir, tmp_path, prefix):
    files = bfl_checkpoint(tmp_path, kontext_dir, prefix=prefix)
    bfl = Pipeline.from_pretrained(
        files["flux"],
        text_encoders=files["text_encoders"],  # ae: found beside it
        variant="flux-kontext-dev",
    )
    ref = Pipeline.from_pretrained(kontext_dir)
    assert bfl.transformer.cfg == ref.transformer.cfg
    assert bfl.variant.name == "flux-kontext-dev"
    torch.testing.assert_close(_edit_latent(bfl), _edit_latent(ref), rtol=0, atol=0)


def test_prefixed_ae_file_loads(kontext_dir, tmp_path):
    files = bfl_checkpoint(tmp_path, kontext_dir)
    from safetensors.torch import load_file

    save_file({"first_stage_model." + k: v for k, v in load_file(files["ae"]).items()}, tmp_path / "ae2.safetensors")
    vae = detect(files["flux"], ae=tmp_path / "ae2.safetensors").load_vae(torch.float32, "cpu")
    ref = detect(kontext_dir).load_vae(torch.float32, "cpu")
    for (k, a), (_, b) in zip(vae.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_sharded_diffusers_transformer(kontext_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    ckpt = tmp_path / "sharded"
    shutil.copytree(kontext_dir, ckpt)
    shutil.rmtree(ckpt / "transformer")
    FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer").save_pretrained(
        ckpt / "transformer", max_shard_size="40KB"
    )
    assert (ckpt / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    a = detect(ckpt).load_transformer(torch.float32, "cpu").state_dict()
    b = detect(kontext_dir).load_transformer(torch.float32, "cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- errors ---------------------------------------------------------------------------------------------------


@pytest.fixture
def bfl(kontext_dir, tmp_path):
    return bfl_checkpoint(tmp_path, kontext_dir)


def _rewrite(path, edit):
    from safetensors.torch import load_file

    state = load_file(path)
    edit(state)
    save_file(state, path)


def _load(files):
    return detect(files["flux"]).load_transformer(torch.float32, "cpu")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        detect(tmp_path / "nope.safetensors")


def test_folder_that_is_neither_layout(tmp_path):
    with pytest.raises(CheckpointError, match="neither checkpoint layout"):
        detect(tmp_path)


def test_pickle_is_refused(tmp_path, kontext_dir):
    (tmp_path / "flux1-dev.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        detect(tmp_path / "flux1-dev.ckpt")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(kontext_dir, ckpt)
    (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (ckpt / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        detect(ckpt).load_transformer(torch.float32, "cpu")


def test_missing_ae(bfl):
    bfl["ae"].unlink()
    with pytest.raises(CheckpointError, match="ae.safetensors: the autoencoder file is missing"):
        detect(bfl["flux"])


def test_missing_key_is_named(bfl):
    _rewrite(bfl["flux"], lambda s: s.pop("double_blocks.1.img_attn.qkv.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing: double_blocks\.1\.img_attn\.qkv\.bias") as e:
        _load(bfl)
    assert str(bfl["flux"]) in str(e.value)


def test_unexpected_key_is_named(bfl):
    _rewrite(bfl["flux"], lambda s: s.update({"lora_unet_extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="1 unexpected: lora_unet_extra.weight"):
        _load(bfl)


def test_wrong_shape_is_named(bfl):
    _rewrite(bfl["flux"], lambda s: s.update({"double_blocks.1.txt_mlp.2.weight": torch.zeros(64, 255)}))
    expected = r"'double_blocks.1.txt_mlp.2.weight' has shape \[64, 255\], the model expects \[64, 256\]"
    with pytest.raises(CheckpointError, match=expected):
        detect(bfl["flux"]).load_transformer(torch.float32, "cpu")


def test_wrong_shape_in_diffusers_folder(kontext_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(kontext_dir, ckpt)
    _rewrite(
        ckpt / "transformer" / "diffusion_pytorch_model.safetensors",
        lambda s: s.update({"transformer_blocks.0.attn.to_k.weight": torch.zeros(64, 63)}),
    )
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn\.to_k\.weight' has shape \[64, 63\]"):
        detect(ckpt).load_transformer(torch.float32, "cpu")


def test_truncated_file(bfl):
    data = bfl["flux"].read_bytes()
    bfl["flux"].write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        _load(bfl)


def test_corrupt_header(bfl):
    data = bytearray(bfl["flux"].read_bytes())
    data[8:20] = b"not json!!!!"
    bfl["flux"].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        _load(bfl)


def test_not_a_safetensors_file(bfl):
    bfl["flux"].write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        _load(bfl)


def test_shard_index_pointing_at_wrong_file(kontext_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(kontext_dir, ckpt)
    single = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    single.rename(ckpt / "transformer" / "shard-a.safetensors")
    save_file({"unused": torch.zeros(1)}, ckpt / "transformer" / "shard-b.safetensors")
    from safetensors import safe_open

    with safe_open(ckpt / "transformer" / "shard-a.safetensors", "pt") as f:
        keys = list(f.keys())
    wm = {k: "shard-a.safetensors" for k in keys} | {keys[0]: "shard-b.safetensors", "unused": "shard-b.safetensors"}
    (ckpt / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match=f"puts '{keys[0]}' in shard-b.safetensors"):
        detect(ckpt).load_transformer(torch.float32, "cpu")


def test_bfl_without_text_encoders(bfl):
    with pytest.raises(CheckpointError, match="text_encoders=FOLDER"):
        Pipeline.from_pretrained(bfl["flux"])
