"""The small Kontext shipped in the package: it loads like any checkpoint, passes its quality bar on the held-out
shapes (which the random-weight demo checkpoint fails), and drives `kontext-rt demo`."""

from __future__ import annotations

import json

import pytest
import torch

from kontext_rt import Pipeline
from kontext_rt.config import PRESETS, VAE_PRESETS
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_toy.checkpoints import write_diffusers_checkpoint

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


# ---- the shipped model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    from kontext_toy.checkpoints import small_kontext

    return Pipeline.from_pretrained(small_kontext())


def test_shipped_model_loads_like_any_checkpoint(shipped):
    """A diffusers folder read by the same loader as any other: Kontext's variant, the trained text length."""
    from kontext_rt.weights.formats import detect
    from kontext_toy.checkpoints import small_kontext

    assert detect(small_kontext()).variant().name == "flux-kontext-dev"
    assert shipped.max_sequence_length == 64  # what its trainer wrote to the tokenizer's config


def test_shipped_model_passes_its_bar(shipped):
    from kontext_toy import bar

    result = bar.evaluate(shipped)
    assert bar.failures(result) == [], result


def test_random_weights_fail_every_line_of_the_bar(tmp_path):
    """The same harness on the random-weight demo checkpoint: the bar is not one any model clears."""
    from kontext_toy import bar
    from kontext_toy.checkpoints import demo_checkpoint

    result = bar.evaluate(Pipeline.from_pretrained(demo_checkpoint(tmp_path), max_sequence_length=64))
    assert len(bar.failures(result)) == len(bar.BAR), result


def _nested(flat: dict) -> dict:
    """{"per_kind.move.success_rate": x, "drift.psnr.0": y} -> {"per_kind": {"move": {"success_rate": x}},
    "drift": {"psnr": [y]}} (a numeric last part is a list index; only index 0 here)"""
    out = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if leaf.isdigit():
            assert leaf == "0"
            parent = out
            for part in parents[:-1]:
                parent = parent[part]
            parent[parents[-1]] = [value]
        else:
            node[leaf] = value
    return out


def test_bar_names_each_aggregate_under_it():
    from kontext_toy import bar

    assert {"edit_success_rate", "preservation_psnr"} <= set(bar.BAR)
    assert bar.failures(_nested(dict(bar.BAR))) == []  # at the threshold is on the bar
    for key, least in bar.BAR.items():
        under = bar.failures(_nested({**bar.BAR, key: least - 0.01}))
        assert len(under) == 1 and under[0].startswith(f"{key} ") and under[0].endswith(f"< {least}")
    assert len(bar.failures({})) == len(bar.BAR)  # a missing aggregate is under
