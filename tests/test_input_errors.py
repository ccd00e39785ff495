"""The public API refuses bad run arguments with an InputError (or CheckpointError) before any work."""

import math
import shutil
import warnings

import pytest
import torch
from PIL import Image

from kontext_rt import CheckpointError, InputError, KontextError, Pipeline


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    return Pipeline.from_pretrained(kontext_dir)


@pytest.fixture
def no_work(pipe, monkeypatch):
    """Text encoding and VAE encoding fail if reached: the check must come first."""

    def worked(*a, **k):
        raise AssertionError("work started before the check")

    monkeypatch.setattr(pipe, "encode_prompt", worked)
    monkeypatch.setattr(pipe.vae, "encode", worked)
    return pipe


BAD_RUNS = [
    (dict(width=4096), "width 4096 is over the 2048 px limit"),
    (dict(height=2064), "height 2064 is over the 2048 px limit"),
    (dict(seed=2**64), r"seed must be a non-negative integer up to 2\*\*64-1"),
    (dict(seed=-1), r"seed must be a non-negative integer up to 2\*\*64-1"),
    (dict(seed=True), "seed"),
    (dict(guidance=math.inf), r"guidance must be a number in \[0, 100\]"),
    (dict(guidance=math.nan), "guidance"),
    (dict(guidance=1e308), "guidance"),
    (dict(guidance=-1.0), "guidance"),
    (dict(guidance=100.5), "guidance"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(solver="heun"), r"solver must be one of euler, dpm\+\+2m; got 'heun'"),
    (dict(solver=None), "solver must be one of"),
]


@pytest.mark.parametrize("kwargs,match", BAD_RUNS)
def test_generate_refuses_before_work(no_work, kwargs, match):
    with pytest.raises(InputError, match=match):
        no_work.generate("x", **{"width": 32, "height": 32, **kwargs})


@pytest.mark.parametrize("kwargs,match", BAD_RUNS)
def test_edit_refuses_before_work(no_work, kwargs, match):
    with pytest.raises(InputError, match=match):
        no_work.edit(Image.new("RGB", (32, 32)), "x", **kwargs)


# checked once the output size is known: after the images are read and sized, before any of them is encoded
BAD_PLANS = [
    (dict(output="numpy"), "output must be one of"),
    (dict(latents=torch.zeros(1, 5, 64)), r"latents must be packed noise of shape \[B, 4, 64\]"),
    (dict(sigmas=[0.5, 0.7]), "sigmas must decrease strictly"),
    (dict(sigmas=[1.0, 0.5, 0.0], steps=3), r"steps=3 disagrees with the 2 steps of sigmas"),
]


@pytest.mark.parametrize("kwargs,match", BAD_PLANS)
def test_edit_checks_the_whole_run_before_encoding(no_work, kwargs, match):
    with pytest.raises(InputError, match=match):
        no_work.edit(Image.new("RGB", (32, 32)), "x", auto_resize=False, **kwargs)


def test_a_second_context_over_the_limit_is_refused_before_the_first_is_encoded(no_work):
    with pytest.raises(InputError, match="2064x32, over the 2048 px limit"):
        no_work.edit([Image.new("RGB", (32, 32)), Image.new("RGB", (2064, 32))], "x", auto_resize=False)


def test_context_over_the_limit_without_auto_resize(no_work):
    with pytest.raises(InputError, match="2064x32, over the 2048 px limit"):
        no_work.edit(Image.new("RGB", (2064, 32)), "x", auto_resize=False)


def test_the_limits_themselves_are_accepted(pipe):
    """2**64-1 is the top of torch's generator range (torch refuses one more); guidance 0 and 100 run and stay
    finite; 2048 passes the size check (too slow to run on a CPU)."""
    from kontext_rt import image as im

    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(2**64)
    a = pipe.generate("x", width=32, height=32, steps=1, seed=2**64 - 1, guidance=100, output="latent")
    b = pipe.generate("x", width=32, height=32, steps=1, seed=2**64 - 1, guidance=0, output="latent")
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.equal(a, b)
    im.check_output_size(2048, 2048)


def test_long_prompt_warns_on_cache_hits_too(pipe, kontext_dir):
    from transformers import T5TokenizerFast

    from kontext_rt.text import PromptTruncated

    prompt = "a cat on a red sofa " * 40
    n = len(T5TokenizerFast.from_pretrained(kontext_dir / "tokenizer_2")(prompt).input_ids)
    assert n > pipe.max_sequence_length
    for _ in range(2):  # the second call is a cache hit: the prompt is still truncated
        with pytest.warns(PromptTruncated, match=f"{n} T5 tokens, max_sequence_length {pipe.max_sequence_length}"):
            pipe.encode_prompt(prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.encode_prompt("a cat on a red sofa")


def _tokenizer_broken(folder, how):
    if how == "missing":
        (folder / "tokenizer_2" / "tokenizer.json").unlink()
    else:  # what transformers builds when tokenizer.json is missing: special tokens only, saved in its place
        from transformers import T5TokenizerFast

        (folder / "empty").mkdir()
        T5TokenizerFast.from_pretrained(folder / "empty", extra_ids=0).save_pretrained(folder / "tokenizer_2")


@pytest.mark.parametrize("how,match", [("missing", "no tokenizer files"), ("specials-only", "unusable tokenizer")])
def test_unusable_t5_tokenizer_is_refused_at_load(kontext_dir, tmp_path, monkeypatch, how, match):
    from kontext_rt.weights.formats import CheckpointFormat

    def loaded(*a, **k):
        raise AssertionError("transformer weights read before the tokenizer check")

    ckpt = tmp_path / "ckpt"
    shutil.copytree(kontext_dir, ckpt)
    _tokenizer_broken(ckpt, how)
    monkeypatch.setattr(CheckpointFormat, "load_transformer", loaded)
    with pytest.raises(CheckpointError, match=f"tokenizer_2: {match}"):
        Pipeline.from_pretrained(ckpt)


def test_converted_validation_errors_are_input_errors():
    """The runtime's own validation raises KontextError kinds (still ValueErrors for older callers)."""
    from kontext_rt import Optimizations, backends
    from kontext_rt.sampling import schedule as sampler
    from kontext_rt.text import TextEmbeddingCache

    calls = [
        lambda: backends.resolve("warp", "cpu"),
        lambda: Optimizations(max_graphs=0).check(torch.device("cpu"), torch.float32),
        lambda: sampler.schedule(0, 16),
        lambda: sampler.explicit_schedule([0.5, 0.7]),
        lambda: TextEmbeddingCache(-1),
        lambda: Pipeline.from_pretrained("unused", device="tpu:9"),
        lambda: Pipeline.from_pretrained("unused", device="meta"),  # a torch device this runtime does not run on
    ]
    for call in calls:
        with pytest.raises(InputError) as info:
            call()
        assert isinstance(info.value, (KontextError, ValueError))


@pytest.mark.parametrize("extra", [0, 1])
def test_truncation_warning_exactly_when_t5_truncates(pipe, kontext_dir, extra):
    """The warning follows the tokenizer's own truncation: a prompt of max_sequence_length tokens (with </s>)
    is whole, one more token loses one."""
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(kontext_dir / "tokenizer_2")
    msl = pipe.max_sequence_length
    prompt = "a" * (msl - 1 + extra)  # tiny T5: '▁a', then one token per 'a', then </s>
    assert len(tok(prompt).input_ids) == msl + extra
    truncated = tok(prompt, max_length=msl, truncation=True).input_ids != tok(prompt).input_ids
    assert truncated == bool(extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.text.warn_if_truncated(prompt, msl)
    assert any("T5 tokens" in str(w.message) for w in caught) == truncated


@pytest.fixture
def weights_never_read(monkeypatch):
    """Loading the transformer or VAE weights fails: what is refused here is refused before them."""
    from kontext_rt.weights.formats import CheckpointFormat

    def loaded(*a, **k):
        raise AssertionError("weights read before the check")

    monkeypatch.setattr(CheckpointFormat, "load_transformer", loaded)
    monkeypatch.setattr(CheckpointFormat, "load_vae", loaded)


def test_load_arguments_are_checked_before_the_weights(kontext_dir, tmp_path, weights_never_read):
    from kontext_rt import LoRAError, Optimizations

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    cases = [
        (dict(loras=[tmp_path / "missing.safetensors"]), LoRAError, "file not found"),
        (dict(loras=[bad]), LoRAError, "bad.safetensors"),
        (dict(loras=str(bad)), InputError, "loras must be a list"),
        (dict(loras=[(bad, 1.0, "extra")]), InputError, r"a path or \(path, strength\)"),
        (dict(text_cache_size=-1), InputError, "text cache size"),
        (dict(text_cache_size="64"), InputError, "text cache size"),
        (dict(engine_precision="fp16"), InputError, "only used by backend='tensorrt'"),
        (dict(engine_precision="fp32"), InputError, "engine_precision must be one of fp16, bf16, fp8, got 'fp32'"),
        (dict(max_sequence_length=0), InputError, "max_sequence_length must be an integer in 1..512"),
        (
            dict(
                dtype=torch.bfloat16, optimize=Optimizations(fp8="static", fp8_calibration=tmp_path / "no.safetensors")
            ),
            CheckpointError,
            "calibration file not found",
        ),
    ]
    for kwargs, kind, match in cases:
        with pytest.raises(kind, match=match):
            Pipeline.from_pretrained(kontext_dir, **kwargs)


def test_a_broken_vae_config_is_refused_before_the_transformer_weights(kontext_dir, tmp_path, weights_never_read):
    import json

    ckpt = tmp_path / "ckpt"
    shutil.copytree(kontext_dir, ckpt)
    config = ckpt / "vae" / "config.json"
    c = json.loads(config.read_text())
    del c["latent_channels"]
    config.write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="bad VAE config"):
        Pipeline.from_pretrained(ckpt)


def test_a_session_refuses_batched_latents(pipe):
    session = pipe.session(Image.new("RGB", (32, 32)), auto_resize=False)
    with pytest.raises(InputError, match="latents must have batch 1"):
        session.edit("x", latents=torch.zeros(2, 4, 64))
