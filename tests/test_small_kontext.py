"""The small Kontext shipped in the package: it loads like any checkpoint, passes its quality bar on the held-out
shapes (which the random-weight demo checkpoint fails), and drives `kontext-rt demo`."""

from __future__ import annotations

import json

import pytest
import torch

from kontext_rt import Pipeline
from kontext_rt.config import PRESETS, VAE_PRESETS
from kontext_rt.demo import write_diffusers_checkpoint
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder

# ---- the T5 tokenizer's limit is the default sequence length where it is under the variant's --------------------


@pytest.fixture(scope="module")
def tiny_modules():
    torch.manual_seed(0)
    return FluxTransformer(PRESETS["tiny"]), AutoEncoder(VAE_PRESETS["tiny"])


@pytest.mark.parametrize("stated, expected", [(None, 512), (40, 40), (512, 512), (4096, 512)])
def test_default_sequence_length_is_the_tokenizers_limit_under_the_variants(tmp_path, tiny_modules, stated, expected):
    """512 is FLUX.1 Kontext [dev]'s own default (diffusers' max_sequence_length); the tokenizer's
    model_max_length, read from the file transformers writes, lowers it, never raises it."""
    write_diffusers_checkpoint(tmp_path, *tiny_modules, text_tokens=stated)
    config = json.loads((tmp_path / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert stated is None or config["model_max_length"] == stated
    assert Pipeline.from_pretrained(tmp_path).max_sequence_length == expected
    assert Pipeline.from_pretrained(tmp_path, max_sequence_length=77).max_sequence_length == 77


def test_the_lowered_default_reaches_the_encoders(tmp_path, tiny_modules):
    write_diffusers_checkpoint(tmp_path, *tiny_modules, text_tokens=24)
    txt, _ = Pipeline.from_pretrained(tmp_path).encode_prompt("make the circle red")
    assert txt.shape[1] == 24
