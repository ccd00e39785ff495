"""run_batch: requests sharing one sampling loop each get the image they get alone, bit for bit; threads too.

The sizes keep at least 12 target tokens: below that this CPU's BLAS picks another GEMM kernel for a matrix of one
request's few rows than for the batch's, and the rounding differs (seen at 6 tokens: img_in, 1e-6)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import kontext_rt as krt
from kontext_rt.errors import InputError


def picture(seed: int, w: int = 48, h: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    return krt.Pipeline.from_pretrained(kontext_dir)


def alone(pipe, r: krt.Request):
    args = dict(steps=r.steps, guidance=r.guidance, seed=r.seed)
    if r.images:
        return pipe.edit(list(r.images), r.prompt, width=r.width, height=r.height, auto_resize=r.auto_resize, **args)
    return pipe.generate(r.prompt, width=r.width, height=r.height, **args)


def test_a_batch_of_edits_equals_each_edit_alone(pipe):
    requests = [
        krt.Request("make it red", (picture(1),), steps=2, seed=5, auto_resize=False),
        krt.Request("a blue sky over the sea", (picture(2),), steps=2, seed=6, guidance=4.0, auto_resize=False),
        krt.Request("make it red", (picture(1),), steps=2, seed=7, guidance=1.5, auto_resize=False),
    ]
    keys = {pipe.batch_key(r) for r in requests}
    assert len(keys) == 1
    reports = [krt.RunReport() for _ in requests]
    batched = pipe.run_batch(requests, reports)
    for r, img, report in zip(requests, batched, reports, strict=True):
        assert np.array_equal(np.asarray(img), np.asarray(alone(pipe, r)))
        assert report.seed == r.seed and report.batch_size == 3 and report.timings["denoise"] > 0
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[2]))  # seeds and guidance differ


def test_a_batch_of_two_image_edits_and_of_generations(pipe):
    two = [
        krt.Request("put them together", (picture(3), picture(4, 32, 32)), steps=2, seed=s, auto_resize=False)
        for s in (1, 2)
    ]
    gens = [krt.Request(p, width=64, height=48, steps=2, seed=s) for p, s in (("a fox", 3), ("a cat", 4))]
    for requests in (two, gens):
        for r, img in zip(requests, pipe.run_batch(requests), strict=True):
            assert np.array_equal(np.asarray(img), np.asarray(alone(pipe, r)))


def test_batch_keys_part_what_cannot_share_a_loop(pipe):
    base = krt.Request("x", (picture(1),), steps=2, auto_resize=False)
    others = [
        krt.Request("x", (picture(1, 64, 32),), steps=2, auto_resize=False),  # another size
        krt.Request("x", (picture(1),), steps=3, auto_resize=False),  # more steps
        krt.Request("x", (picture(1), picture(2)), steps=2, auto_resize=False),  # two context images
        krt.Request("x", steps=2, width=48, height=32),  # no context image
    ]
    for other in others:
        assert pipe.batch_key(other) != pipe.batch_key(base)
        with pytest.raises(InputError, match="batch_key"):
            pipe.run_batch([base, other])


def test_a_bad_request_is_refused_before_anything_is_encoded(pipe, monkeypatch):
    monkeypatch.setattr(pipe.vae, "encode", lambda x: pytest.fail("encoded"))
    good = krt.Request("x", (picture(1),), steps=2, auto_resize=False)
    for bad, match in (
        (krt.Request("x", (picture(1),), steps=2, seed=-1, auto_resize=False), "seed"),
        (krt.Request("", (picture(1),), steps=2, auto_resize=False), "prompt"),
        (krt.Request("x", ("/nonexistent.png",), steps=2), "nonexistent"),
    ):
        with pytest.raises(InputError, match=match):
            pipe.run_batch([good, bad])
    with pytest.raises(InputError):
        pipe.run_batch([])


def test_concurrent_calls_from_threads_equal_the_same_calls_one_by_one(pipe):
    calls = [
        lambda: pipe.generate("a fox", width=64, height=48, steps=2, seed=1),
        lambda: pipe.edit(picture(2), "make it red", steps=2, seed=2, auto_resize=False),
        lambda: pipe.generate("a cat", width=48, height=32, steps=2, seed=3),
        lambda: pipe.edit(picture(4), "a hat", steps=1, seed=4, auto_resize=False),
    ]
    want = [np.asarray(c()) for c in calls]
    got = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def work(i):
        barrier.wait()
        got[i] = np.asarray(calls[i]())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)


def test_a_latent_batch_of_one_prompt_equals_each_row_alone(pipe):
    """edit(latents=(B, N, 64)): each row's result equals that row's noise run alone (the table is per row)."""
    noise = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(0))
    args = dict(prompt="x", width=64, height=48, steps=2, output="latent")
    batched = pipe.generate(latents=noise, **args)
    for b in range(3):
        assert torch.equal(batched[b : b + 1], pipe.generate(latents=noise[b : b + 1], **args))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reports": krt.RunReport()}, "reports"),
        ({"reports": [1]}, "reports"),
        ({"progress": 3}, "progress"),
    ],
)
def test_bad_batch_arguments_are_refused_before_anything_is_encoded(pipe, monkeypatch, kwargs, match):
    monkeypatch.setattr(pipe.vae, "encode", lambda x: pytest.fail("encoded"))
    with pytest.raises(InputError, match=match):
        pipe.run_batch([krt.Request("x", (picture(1),), steps=2, auto_resize=False)], **kwargs)


@pytest.mark.parametrize("bad, match", [({"images": None}, "images"), ({"auto_resize": "no"}, "auto_resize")])
def test_bad_request_fields(pipe, bad, match):
    with pytest.raises(InputError, match=match):
        pipe.batch_key(krt.Request("x", **{"images": (picture(1),), **bad}))


def test_the_default_step_count_is_one_key(pipe):
    default = pipe.variant.steps
    assert pipe.batch_key(krt.Request("x", width=64, height=48)) == pipe.batch_key(
        krt.Request("x", width=64, height=48, steps=default)
    )
