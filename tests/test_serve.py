"""`kontext-rt serve`: the official openai client against a real uvicorn server on loopback.

The end-to-end tests run the tiny real pipeline and compare the returned pixels with the same Pipeline called
directly (the HTTP layer must add nothing and lose nothing). The scheduler's queue, deadline, disconnect and
batching tests use a stand-in pipeline that blocks on an Event, so the order of events is certain.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import http.client
import io
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import torch
import uvicorn
from PIL import Image

from kontext_rt import Pipeline
from kontext_rt.errors import InputError
from kontext_rt.serve import Settings, create_app
from kontext_rt.serve.background import serving
from kontext_rt.serve.metrics import Metrics
from kontext_rt.serve.scheduler import Abandoned, DeadlineExceeded, Scheduler
from kontext_rt.serve.schemas import Request

PROMPT = "make the sky purple"


# ---- helpers ----------------------------------------------------------------------------------------------------


def client(port) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)


def call(port, method, path, body=b"", headers=None, timeout=30):
    """(status, headers, parsed JSON or text) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        ctype = r.getheader("content-type", "")
        return r.status, dict(r.getheaders()), json.loads(data) if "json" in ctype else data.decode()
    finally:
        conn.close()


def multipart(fields, files=()) -> tuple[bytes, dict]:
    """A multipart/form-data body: text fields (a dict or (name, value) pairs), then (name, filename, bytes) files."""
    boundary = "kontextrtboundary0123456789"
    parts = []
    for k, v in fields.items() if isinstance(fields, dict) else fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for name, filename, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_form(port, path, fields, files=()):
    body, headers = multipart(fields, files)
    return call(port, "POST", path, body, headers)


def post_json(port, path, obj):
    return call(port, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_claiming(width: int, height: int) -> bytes:
    """A 16x16 PNG whose header claims width x height (IHDR rewritten, CRC fixed): a decompression bomb's header."""
    data = bytearray(png(Image.new("L", (16, 16))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature(8), length(4), type(4)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type + 13 data bytes
    return bytes(data)


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text ('name{labels}' exactly as exposed); 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(cond, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


# ---- the real pipeline, end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    return Pipeline.from_pretrained(kontext_dir)


@pytest.fixture(scope="module")
def port(pipe):
    settings = Settings(max_upload_mb=1, max_images=2, max_steps=8)
    with serving(create_app(pipe, settings)) as p:
        yield p


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    return a, b


def test_edit_one_image_equals_the_pipeline(port, pipe, pictures):
    a, _ = pictures
    extra = {"steps": 2, "seed": 3, "auto_resize": False}
    r = client(port).images.edit(image=("a.png", png(a), "image/png"), prompt=PROMPT, size="64x48", extra_body=extra)
    got = decoded(r.data[0].b64_json)
    assert got.format == "PNG" and got.size == (64, 48)
    want = pipe.edit(a, PROMPT, width=64, height=48, steps=2, seed=3, auto_resize=False)
    assert np.array_equal(pixels(got), pixels(want))
    assert r.data[0].model_extra["seed"] == 3
    assert {"queue", "text_encode", "vae_encode", "denoise", "vae_decode"} <= set(r.model_extra["timings"])


def test_edit_two_context_images_equals_the_pipeline(port, pipe, pictures):
    a, b = pictures
    images = [("a.png", png(a), "image/png"), ("b.png", png(b), "image/png")]  # the client sends them as image[]
    extra = {"steps": 2, "seed": 5, "auto_resize": False}
    r = client(port).images.edit(image=images, prompt=PROMPT, size="32x48", extra_body=extra)
    got = decoded(r.data[0].b64_json)
    assert got.size == (32, 48)
    want = pipe.edit([a, b], PROMPT, width=32, height=48, steps=2, seed=5, auto_resize=False)
    assert np.array_equal(pixels(got), pixels(want))
    alone = pipe.edit(a, PROMPT, width=32, height=48, steps=2, seed=5, auto_resize=False)
    assert not np.array_equal(pixels(got), pixels(alone)), "the second context image made no difference"


def test_generate_equals_the_pipeline_and_the_seed_decides(port, pipe):
    c = client(port)
    gen = lambda seed: decoded(
        c.images.generate(prompt="a red fox", size="32x32", extra_body={"steps": 2, "seed": seed}).data[0].b64_json
    )
    first, again, other = gen(7), gen(7), gen(8)
    assert first.size == (32, 32)
    assert np.array_equal(pixels(first), pixels(pipe.generate("a red fox", width=32, height=32, steps=2, seed=7)))
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_solver_and_sigmas_reach_the_pipeline(port, pipe, pictures):
    """solver and sigmas: a JSON list on a generation, a comma string on a (multipart) edit."""
    c, (a, _) = client(port), pictures
    sig = [0.9, 0.6, 0.3]  # from 1, the first two steps of dpm++2m are Euler's (lambda(1) = -inf)
    extra = {"seed": 4, "solver": "dpm++2m", "sigmas": sig}
    got = decoded(c.images.generate(prompt="a red fox", size="32x32", extra_body=extra).data[0].b64_json)
    want = pipe.generate("a red fox", width=32, height=32, seed=4, solver="dpm++2m", sigmas=sig)
    euler = pipe.generate("a red fox", width=32, height=32, seed=4, sigmas=sig)
    assert np.array_equal(pixels(got), pixels(want)) and not np.array_equal(pixels(got), pixels(euler))
    extra = {"seed": 3, "auto_resize": False, "solver": "dpm++2m", "sigmas": "0.9,0.6,0.3,0", "steps": 3}
    r = c.images.edit(image=("a.png", png(a), "image/png"), prompt=PROMPT, size="64x48", extra_body=extra)
    want = pipe.edit(a, PROMPT, width=64, height=48, seed=3, auto_resize=False, solver="dpm++2m", sigmas=sig)
    assert np.array_equal(pixels(decoded(r.data[0].b64_json)), pixels(want))


def test_edit_without_size_takes_the_pipelines_choice(port, pipe, pictures):
    a, _ = pictures
    status, _, body = post_form(
        port, "/v1/images/edits", {"prompt": PROMPT, "steps": "1", "seed": "9", "auto_resize": "false"},
        [("image", "a.png", png(a))],
    )  # fmt: skip
    assert status == 200, body
    want = pipe.edit(a, PROMPT, steps=1, seed=9, auto_resize=False)
    assert np.array_equal(pixels(decoded(body["data"][0]["b64_json"])), pixels(want))


def test_a_seed_left_out_is_drawn_and_reported(port, pipe):
    status, _, body = post_json(port, "/v1/images/generations", {"prompt": "a cat", "size": "32x32", "steps": 1})
    assert status == 200, body
    seed = body["data"][0]["seed"]
    want = pipe.generate("a cat", width=32, height=32, steps=1, seed=seed)
    assert np.array_equal(pixels(decoded(body["data"][0]["b64_json"])), pixels(want))


def test_native_route_edits_with_images_and_generates_without(port, pipe, pictures):
    a, _ = pictures
    fields = {"prompt": PROMPT, "size": "32x32", "steps": "1", "seed": "4", "auto_resize": "false"}
    status, _, body = post_form(port, "/v1/images", fields, [("image", "a.png", png(a))])
    assert status == 200, body
    want = pipe.edit(a, PROMPT, width=32, height=32, steps=1, seed=4, auto_resize=False)
    assert np.array_equal(pixels(decoded(body["data"][0]["b64_json"])), pixels(want))

    as_json = {"prompt": PROMPT, "size": "32x32", "steps": 1, "seed": 4, "auto_resize": False}
    status, _, body = post_json(port, "/v1/images", {**as_json, "image": base64.b64encode(png(a)).decode()})
    assert status == 200, body
    assert np.array_equal(pixels(decoded(body["data"][0]["b64_json"])), pixels(want))

    status, _, body = post_json(port, "/v1/images", {"prompt": "a fox", "size": "32x32", "steps": 1, "seed": 4})
    assert status == 200, body
    want = pipe.generate("a fox", width=32, height=32, steps=1, seed=4)
    assert np.array_equal(pixels(decoded(body["data"][0]["b64_json"])), pixels(want))


def test_queued_requests_of_one_key_run_as_one_batch_with_each_ones_pixels(pipe, pictures):
    a, _ = pictures
    mirrored = a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # another context of the same size: the same key
    requests = [
        Request(PROMPT, (a,), 32, 32, 2, None, 1, False),
        Request("a red fox", (), 32, 32, 2, 3.5, 2),
        Request("add a hat", (mirrored,), 32, 32, 2, 4.0, 3, False),
    ]
    alone = [
        pipe.edit(a, PROMPT, width=32, height=32, steps=2, seed=1, auto_resize=False),
        pipe.generate("a red fox", width=32, height=32, steps=2, guidance=3.5, seed=2),
        pipe.edit(mirrored, "add a hat", width=32, height=32, steps=2, guidance=4.0, seed=3, auto_resize=False),
    ]
    checked = [pipe.check(r) for r in requests]
    assert checked[0].key == checked[2].key != checked[1].key
    sched = Scheduler(pipe, max_queue=8, max_batch=4, metrics=Metrics())
    jobs = [sched.submit(c, 60) for c in checked]
    sched.start()  # all three are queued before the worker looks: the two edits go together
    sched.close()
    text = sched.metrics.text().decode()
    assert metric(text, "kontext_rt_batch_size_count") == 2 and metric(text, "kontext_rt_batch_size_sum") == 3
    for job, want in zip(jobs, alone, strict=True):  # a batch rounds as its BLAS does: within one level of alone
        image, report = job.future.result(0)  # (tests/test_batch.py bounds the latents against float64)
        diff = np.abs(pixels(image).astype(np.int16) - pixels(want).astype(np.int16))
        assert diff.max() <= 1 and report.seed == job.checked.request.seed


# ---- bad input: a 4xx with an OpenAI-style error, and the server goes on ----------------------------------------


def _small_png(fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format=fmt)
    return buf.getvalue()


def _edit(fields=None, files=None):
    """An edit with a good image and prompt, then `fields` (a dict replaces, a list of pairs adds)."""
    if isinstance(fields, list):
        fields = [("prompt", PROMPT), ("steps", "1"), *fields]
    else:
        fields = {"prompt": PROMPT, "steps": "1", **(fields or {})}
    files = [("image", "a.png", _small_png())] if files is None else files
    return lambda port: post_form(port, "/v1/images/edits", fields, files)


def _generate(obj):
    return lambda port: post_json(port, "/v1/images/generations", {"prompt": "x", "steps": 1, **obj})


def _raw(path, body, content_type):
    return lambda port: call(port, "POST", path, body, {"Content-Type": content_type})


BAD = {
    "not an image": (_edit(files=[("image", "a.png", b"this is text")]), 400, "image", "not a PNG, JPEG or WebP"),
    "an empty file": (_edit(files=[("image", "a.png", b"")]), 400, "image", "is empty"),
    "a truncated PNG": (_edit(files=[("image", "t.png", _small_png()[:60])]), 400, "image", "image"),
    "a bomb past PIL's limit": (_edit(files=[("image", "b.png", png_claiming(20000, 20000))]), 400, "image", "bomb"),
    "a bomb PIL warns of": (_edit(files=[("image", "b.png", png_claiming(10000, 10000))]), 400, "image", "bomb"),
    "over the pixel limit": (_edit(files=[("image", "b.png", png_claiming(9000, 9000))]), 400, "image", "MP limit"),
    "a GIF": (_edit(files=[("image", "a.gif", _small_png("GIF"))]), 400, "image", "not a PNG, JPEG or WebP"),
    "an image under 16 px": (_edit(files=[("image", "s.png", png(Image.new("RGB", (8, 8))))]), 400, "image", "16"),
    "a context over 2048 px kept as is": (
        _edit({"auto_resize": "false"}, [("image", "w.png", png(Image.new("RGB", (2064, 16))))]),
        400,
        "image",
        "2048 px",
    ),
    "a mask": (_edit(files=[("image", "a.png", _small_png()), ("mask", "m.png", _small_png())]), 400, "mask", "mask"),
    "too many images": (_edit(files=[("image[]", f"{i}.png", _small_png()) for i in range(3)]), 400, None, "files"),
    "no image": (_edit(files=[]), 400, "image", "needs an image"),
    "image as text": (_edit({"image": "a.png"}, files=[]), 400, "image", "uploaded file"),
    "edit as JSON": (_raw("/v1/images/edits", b'{"prompt": "x"}', "application/json"), 400, None, "multipart"),
    "empty prompt": (_edit({"prompt": "   "}), 400, "prompt", "non-empty"),
    "no prompt": (_generate({"prompt": None}), 400, "prompt", "valid string"),
    "missing prompt": (_raw("/v1/images/generations", b'{"size": "32x32"}', "application/json"), 400, "prompt", ""),
    "a number as prompt": (_generate({"prompt": 12}), 400, "prompt", "string"),
    "size not WxH": (_edit({"size": "64by48"}), 400, "size", "WIDTHxHEIGHT"),
    "size not a multiple of 16": (_generate({"size": "40x32"}), 400, "size", "multiple of 16"),
    "size over the limit": (_generate({"size": "4096x1024"}), 400, "size", "2048"),
    "size zero": (_generate({"size": "0x32"}), 400, "size", "positive"),
    "steps not a number": (_edit({"steps": "two"}), 400, "steps", "integer"),
    "steps zero": (_generate({"steps": 0}), 400, "steps", "positive"),
    "steps over the server's limit": (_generate({"steps": 9}), 400, "steps", "at most 8"),
    "steps a boolean": (_generate({"steps": True}), 400, "steps", "boolean"),
    "guidance not finite": (_edit({"guidance": "nan"}), 400, "guidance", "finite"),
    "guidance out of range": (_generate({"guidance": 1e9}), 400, "guidance", "[0, 100]"),
    "seed negative": (_generate({"seed": -1}), 400, "seed", "non-negative"),
    "step_cache negative": (_generate({"step_cache": -0.5}), 400, "step_cache", "finite number >= 0"),
    "step_cache not finite": (_edit({"step_cache": "nan"}), 400, "step_cache", "finite"),
    "seed too large": (_generate({"seed": 2**64}), 400, "seed", "2**64-1"),
    "n of 2": (_generate({"n": 2}), 400, "n", "must be 1"),
    "unknown solver": (_generate({"solver": "heun"}), 400, "solver", "one of euler, dpm++2m; got 'heun'"),
    "solver not a string": (_generate({"solver": 2}), 400, "solver", "valid string"),
    "sigmas not numbers": (_edit({"sigmas": "1,a"}), 400, "sigmas", "comma list of numbers"),
    "sigmas of booleans": (_generate({"steps": None, "sigmas": [True, 0]}), 400, "sigmas", "numbers"),
    "sigmas increasing": (_generate({"steps": None, "sigmas": [0.5, 0.7]}), 400, "sigmas", "decrease strictly"),
    "sigmas disagreeing with steps": (_generate({"sigmas": [1.0, 0.5, 0]}), 400, "sigmas", "steps=1 disagrees"),
    "sigmas over the server's limit": (
        _generate({"steps": None, "sigmas": [1 - i / 10 for i in range(10)]}),
        400,
        "sigmas",
        "at most 8",
    ),
    "response_format url": (_generate({"response_format": "url"}), 400, "response_format", "not supported"),
    "unknown response_format": (_edit({"response_format": "png"}), 400, "response_format", "b64_json"),
    "unknown parameter": (_generate({"stepz": 3}), 400, "stepz", "unknown parameter"),
    "auto_resize on a generation": (_generate({"auto_resize": False}), 400, "auto_resize", "unknown"),
    "reuse_latents not a boolean": (_edit({"reuse_latents": "maybe"}), 400, "reuse_latents", "boolean"),
    "reuse_latents on a generation": (_generate({"reuse_latents": True}), 400, "reuse_latents", "unknown"),
    "a repeated field": (_edit([("prompt", "y")]), 400, "prompt", "given twice"),
    "body not JSON": (_raw("/v1/images/generations", b"prompt=x", "application/json"), 400, None, "not valid JSON"),
    "JSON not an object": (_raw("/v1/images/generations", b"[1, 2]", "application/json"), 400, None, "JSON object"),
    "bad base64 image": (lambda p: post_json(p, "/v1/images", {"prompt": "x", "image": "@@@"}), 400, "image", "base64"),
    "an unknown route": (lambda p: post_json(p, "/v1/images/variations", {}), 404, None, "Not Found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_json_error(case, port):
    send, status, param, words = BAD[case]
    got, _, body = send(port)
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"]
    assert words.lower() in err["message"].lower(), err["message"]
    assert "Traceback" not in err["message"]
    assert call(port, "GET", "/health")[:3:2] == (200, {"status": "ok"})


def test_the_openai_client_gets_the_error_as_an_exception(port):
    with pytest.raises(openai.BadRequestError) as e:
        client(port).images.generate(prompt="x", size="40x40", extra_body={"steps": 1})
    assert e.value.status_code == 400 and e.value.response.json()["error"]["param"] == "size"


# ---- upload limits: refused before the body is read whole ------------------------------------------------------


def _raw_exchange(port, head: bytes, chunks) -> tuple[int, int, dict]:
    """Send a request head, then body chunks (50 ms apart, so the server keeps up) until the server answers;
    (bytes of body sent, status, JSON). The answer must come within 5 s of the last chunk."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        sent = 0
        for chunk in chunks:
            if select.select([s], [], [], 0.05)[0]:  # an answer already: stop sending
                break
            s.sendall(chunk)
            sent += len(chunk)
        r = http.client.HTTPResponse(s)
        r.begin()
        return sent, r.status, json.loads(r.read())


def test_a_declared_length_over_the_limit_is_refused_before_any_body(port):
    head = (
        b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 5000000\r\n\r\n"  # the server's limit is 1 MB
    )
    sent, status, body = _raw_exchange(port, head, [])  # the answer comes without a byte of the body
    assert status == 413 and body["error"]["code"] == "too_large", body
    assert call(port, "GET", "/health")[0] == 200


def test_a_chunked_body_is_counted_as_it_arrives(port):
    head = (
        b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )

    def chunks():
        part = (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        )
        yield b"%x\r\n%s\r\n" % (len(part), part)
        for _ in range(64):  # 4 MB, four times the limit
            yield b"%x\r\n%s\r\n" % (65536, b"x" * 65536)

    sent, status, body = _raw_exchange(port, head, chunks())
    assert status == 413 and body["error"]["code"] == "too_large", body
    assert sent < 3 * 2**20, f"all {sent} bytes were sent before the refusal"
    assert call(port, "GET", "/health")[0] == 200


# ---- metrics ----------------------------------------------------------------------------------------------------


def test_metrics_name_the_series_and_count_the_text_cache(port, pipe):
    before = call(port, "GET", "/metrics")[2]
    for _ in range(2):
        assert (
            post_json(port, "/v1/images/generations", {"prompt": "a metric fox", "size": "32x32", "steps": 1})[0] == 200
        )
    status, headers, text = call(port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for series in (
        "kontext_rt_queue_depth ",
        "kontext_rt_running ",
        "kontext_rt_batch_size_bucket",
        'kontext_rt_stage_seconds_bucket{le="+Inf",stage="denoise"}',
        'kontext_rt_stage_seconds_bucket{le="+Inf",stage="queue"}',
        "kontext_rt_text_cache_hits_total ",
        "kontext_rt_text_cache_misses_total ",
        'kontext_rt_errors_total{kind="invalid_value"}',
    ):
        assert series in text, series
    stats = pipe.text_cache.stats  # the pipeline's own counters are the reference
    assert metric(text, "kontext_rt_text_cache_hits_total") == stats.hits
    assert metric(text, "kontext_rt_text_cache_misses_total") == stats.misses
    assert metric(text, "kontext_rt_text_cache_hits_total") - metric(before, "kontext_rt_text_cache_hits_total") >= 1
    denoised = 'kontext_rt_stage_seconds_count{stage="denoise"}'
    assert metric(text, denoised) - metric(before, denoised) == 2


def test_a_photo_edited_again_is_not_encoded_again_and_a_kept_output_skips_its_encode(port, pipe):
    """The pipeline's context cache serves the server's requests: the same upload twice is one encode; an output
    sent back with reuse_latents takes its kept latents (the counters are the pipeline's, and /metrics shows them)."""
    photo = Image.fromarray(np.random.default_rng(7).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    stats, before = pipe.context_cache.stats, dataclasses.replace(pipe.context_cache.stats)
    fields = {"prompt": PROMPT, "size": "48x32", "steps": "1", "seed": "2", "auto_resize": "false"}
    first = post_form(port, "/v1/images/edits", {**fields, "reuse_latents": "true"}, [("image", "a.png", png(photo))])
    second = post_form(port, "/v1/images/edits", fields, [("image", "a.png", png(photo))])
    assert first[0] == second[0] == 200, (first[2], second[2])
    assert (stats.misses - before.misses, stats.hits - before.hits) == (1, 1)
    out = png(decoded(first[2]["data"][0]["b64_json"]))  # the first edit's output, sent back as the context
    again = post_form(port, "/v1/images/edits", {**fields, "reuse_latents": "true"}, [("image", "o.png", out)])
    assert again[0] == 200, again[2]
    assert (stats.kept_hits - before.kept_hits, stats.misses - before.misses) == (1, 1)
    text = call(port, "GET", "/metrics")[2]
    for name in ("hits", "kept_hits", "misses"):
        assert metric(text, f"kontext_rt_context_cache_{name}_total") == getattr(stats, name), name


def test_two_apps_in_one_process_have_their_own_metrics():
    a, b = create_app(StubPipe()), create_app(StubPipe())
    a.state.metrics.rejected("queue_full")
    assert metric(a.state.metrics.text().decode(), 'kontext_rt_rejections_total{reason="queue_full"}') == 1
    assert metric(b.state.metrics.text().decode(), 'kontext_rt_rejections_total{reason="queue_full"}') == 0


# ---- the scheduler, with a stand-in pipeline --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checked:
    """A stand-in pipeline's checked request: the request and its batch key."""

    request: Request
    key: object


class StubPipe:
    """check/run_checked without a model: every request its own key (never batched); records each run's prompt
    and arguments, and holds the first `hold` runs until `release` is set (the worker is then busy). The image's
    colour is the seed, to tell answers apart. The prompt 'refused' raises InputError (a request the pipeline
    refuses), 'crash' a RuntimeError (a bug), 'oom' the device's out-of-memory error."""

    def __init__(self, hold: int = 0):
        self.calls, self.hold = [], hold
        self.entered, self.release = threading.Event(), threading.Event()
        self.text_cache = SimpleNamespace(stats=SimpleNamespace(hits=0, misses=0))

    def check(self, r):
        return Checked(r, object())

    def run_checked(self, checked, reports, progress=None):
        return [self._one(c.request, report, progress) for c, report in zip(checked, reports, strict=True)]

    def _one(self, r, report, progress):
        width, height = (32, 32) if r.images else (1024, 1024)
        kwargs = {"steps": r.steps, "guidance": r.guidance, "seed": r.seed, "report": report, "progress": progress}
        return self._run(r.prompt, kwargs, r.width or width, r.height or height)

    def _run(self, prompt, kwargs, width, height):
        self.calls.append((prompt, kwargs))
        if prompt == "refused":
            raise InputError("this prompt is refused")
        if prompt == "crash":
            raise RuntimeError("a bug")
        if prompt == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(self.calls) <= self.hold:
            self.entered.set()
            assert self.release.wait(30), "never released"
        report = kwargs.get("report")
        if report is not None:
            report.seed = kwargs.get("seed")
        return Image.new("RGB", (width, height), color_of(kwargs.get("seed")))


def color_of(seed):
    return (0, 0, 0) if seed is None else (seed % 256, (seed * 7) % 256, (seed * 13) % 256)


class BatchStub(StubPipe):
    """Batches: requests of equal (width, height) share a key; run_checked records each batch's prompts and refuses
    a batch holding the prompt 'bad' (InputError), as a pipeline refuses a bad request."""

    def __init__(self, hold: int = 0):
        super().__init__(hold)
        self.batches = []

    def check(self, r):
        return Checked(r, (r.width, r.height))

    def run_checked(self, checked, reports, progress=None):
        self.batches.append([c.request.prompt for c in checked])
        if any(c.request.prompt == "bad" for c in checked):
            raise InputError("prompt 'bad' is refused")
        return super().run_checked(checked, reports, progress)


def _gen(prompt, seed=1, width=32, height=32):
    return Request(prompt, (), width, height, 1, None, seed)


def test_batches_take_queued_requests_of_the_same_key_in_order():
    stub = BatchStub(hold=1)
    sched = Scheduler(stub, max_queue=10, max_batch=3, metrics=Metrics())
    sched.start()
    jobs = {"A": sched.submit(stub.check(_gen("A", 1)), 60)}
    assert stub.entered.wait(10)
    for name, seed, size in [("B", 2, 32), ("C", 3, 48), ("D", 4, 32), ("E", 5, 32), ("F", 6, 32)]:
        jobs[name] = sched.submit(stub.check(_gen(name, seed, size, size)), 60)
    stub.release.set()
    sched.close()
    assert stub.batches == [["A"], ["B", "D", "E"], ["C"], ["F"]]
    for name, job in jobs.items():  # each answer goes to its own request
        image, report = job.future.result(0)
        seed = job.checked.request.seed
        assert image.getpixel((0, 0)) == color_of(seed) and report.seed == seed, name
    text = sched.metrics.text().decode()
    assert metric(text, "kontext_rt_batch_size_count") == 4 and metric(text, "kontext_rt_batch_size_sum") == 6


def test_a_request_refused_in_a_batch_fails_alone():
    stub = BatchStub(hold=1)
    sched = Scheduler(stub, max_queue=10, max_batch=4, metrics=Metrics())
    sched.start()
    first = sched.submit(stub.check(_gen("A")), 60)
    assert stub.entered.wait(10)
    jobs = [sched.submit(stub.check(_gen(p, i)), 60) for i, p in enumerate(["B", "bad", "D"])]
    stub.release.set()
    sched.close()
    assert first.future.result(0)[0].size == (32, 32)
    assert stub.batches[1] == ["B", "bad", "D"] and stub.batches[2:] == [["B"], ["bad"], ["D"]]
    assert jobs[0].future.result(0) and jobs[2].future.result(0)
    with pytest.raises(InputError, match="'bad' is refused"):
        jobs[1].future.result(0)


def test_a_cancelled_job_never_starts_and_a_started_one_cannot_be_cancelled():
    stub = StubPipe(hold=1)
    sched = Scheduler(stub, max_queue=10, max_batch=1, metrics=Metrics())
    sched.start()
    a = sched.submit(stub.check(_gen("A")), 60)
    assert stub.entered.wait(10)
    b = sched.submit(stub.check(_gen("B")), 60)
    assert sched.cancel(b, "disconnected") and b.future.cancelled() and sched.depth == 0
    assert not sched.cancel(a, "disconnected")
    stub.release.set()
    sched.close()
    assert [p for p, _ in stub.calls] == ["A"] and a.future.result(0)


def test_a_job_queued_past_its_deadline_is_dropped_by_the_worker():
    now = [0.0]
    stub = StubPipe(hold=1)
    sched = Scheduler(stub, max_queue=10, max_batch=4, metrics=Metrics(), clock=lambda: now[0])
    sched.start()
    a = sched.submit(stub.check(_gen("A")), 5)
    assert stub.entered.wait(10)
    b = sched.submit(stub.check(_gen("B")), 5)
    now[0] = 6.0  # past B's deadline while A runs
    stub.release.set()
    sched.close()
    assert a.future.result(0) and [p for p, _ in stub.calls] == ["A"]
    with pytest.raises(DeadlineExceeded):
        b.future.result(0)


def _in_thread(fn, *args):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


GEN = {"prompt": "p", "size": "32x32", "steps": 1}


def test_exactly_max_steps_is_accepted_and_one_more_refused():
    stub = StubPipe()
    with serving(create_app(stub, Settings(max_steps=3))) as port:
        status, _, body = post_json(port, "/v1/images/generations", {**GEN, "steps": 3})
        assert status == 200, body
        status, _, body = post_json(port, "/v1/images/generations", {**GEN, "steps": 4})
        assert status == 400 and body["error"]["param"] == "steps" and "at most 3" in body["error"]["message"], body
    assert [k["steps"] for _, k in stub.calls] == [3]


def test_a_full_queue_answers_429_with_retry_after():
    stub = StubPipe(hold=1)
    app = create_app(stub, Settings(max_queue=1, max_batch=1))
    with serving(app) as port:
        a = _in_thread(post_json, port, "/v1/images/generations", {**GEN, "seed": 1})
        assert stub.entered.wait(10)
        b = _in_thread(post_json, port, "/v1/images/generations", {**GEN, "seed": 2})
        wait_for(lambda: app.state.scheduler.depth == 1, "B to be queued")
        status, headers, body = post_json(port, "/v1/images/generations", {**GEN, "seed": 3})
        assert status == 429 and body["error"]["code"] == "queue_full", body
        assert int(headers["retry-after"]) >= 1
        assert call(port, "GET", "/health")[0] == 200
        stub.release.set()
        assert a.result(10)[0] == 200 and b.result(10)[0] == 200
        assert decoded(b.result(0)[2]["data"][0]["b64_json"]).getpixel((0, 0)) == color_of(2)
        text = call(port, "GET", "/metrics")[2]
    assert [k["seed"] for _, k in stub.calls] == [1, 2]
    assert metric(text, 'kontext_rt_rejections_total{reason="queue_full"}') == 1


def test_a_disconnected_clients_request_is_dropped_before_it_starts():
    stub = StubPipe(hold=1)
    app = create_app(stub, Settings(max_batch=1))
    with serving(app) as port:
        a = _in_thread(post_json, port, "/v1/images/generations", {**GEN, "seed": 1})
        assert stub.entered.wait(10)
        body = json.dumps({**GEN, "seed": 2}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:  # send B whole, then hang up
            s.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_for(lambda: app.state.scheduler.depth == 1, "B to be queued")
        wait_for(lambda: app.state.scheduler.depth == 0, "B to leave the queue")
        stub.release.set()
        assert a.result(10)[0] == 200
        text = call(port, "GET", "/metrics")[2]
    assert [k["seed"] for _, k in stub.calls] == [1]
    assert metric(text, 'kontext_rt_rejections_total{reason="disconnected"}') == 1


class SteppingStub(StubPipe):
    """A run of `steps` steps of `step_s` seconds each, calling progress after each (as the pipeline does); records
    how many steps each call ran."""

    def __init__(self, steps=50, step_s=0.02):
        super().__init__()
        self.steps, self.step_s, self.ran = steps, step_s, []

    def _one(self, r, report, progress):
        self.entered.set()
        for done in range(1, self.steps + 1):
            time.sleep(self.step_s)
            self.ran.append((r.prompt, done))
            if progress is not None:
                progress(done, self.steps)
        return super()._one(r, report, progress)


def test_a_running_batch_stops_at_a_step_once_every_client_is_gone():
    stub = SteppingStub(steps=50)
    sched = Scheduler(stub, max_queue=10, max_batch=1, metrics=Metrics())
    sched.start()
    a = sched.submit(stub.check(_gen("A")), 60)
    assert stub.entered.wait(10)
    wait_for(lambda: a.started is not None, "A to start")
    sched.abandon(a)
    b = sched.submit(stub.check(_gen("B")), 60)
    assert b.future.result(10)
    sched.close()
    with pytest.raises(Abandoned, match="stopped after step"):
        a.future.result(0)
    a_steps = max(d for p, d in stub.ran if p == "A")
    assert a_steps < stub.steps and max(d for p, d in stub.ran if p == "B") == stub.steps


def test_a_client_that_hangs_up_mid_run_frees_the_worker_for_the_next():
    stub = SteppingStub(steps=100, step_s=0.02)  # 2 s alone
    app = create_app(stub, Settings(max_batch=1))
    with serving(app) as port:
        body = json.dumps({**GEN, "seed": 1}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:  # send A whole, let it start, then hang up
            s.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            assert stub.entered.wait(10)
        t0 = time.monotonic()
        status, _, answer = post_json(port, "/v1/images/generations", {**GEN, "prompt": "B", "seed": 2})
        waited = time.monotonic() - t0
        text = call(port, "GET", "/metrics")[2]
    a_steps = max(d for p, d in stub.ran if p == "p")
    assert status == 200 and a_steps < stub.steps, (a_steps, answer)
    assert waited < stub.steps * stub.step_s * 1.5  # B did not wait for A's 100 steps, then its own 100
    assert metric(text, 'kontext_rt_rejections_total{reason="disconnected"}') == 1


class SteppingBatchStub(BatchStub):
    """Batches, each in `steps` steps of `step_s` seconds calling progress after each (as run_checked
    does); the first batch waits for `release`, so the next requests queue and are taken together."""

    def __init__(self, steps=100, step_s=0.02):
        super().__init__()
        self.steps, self.step_s, self.ran = steps, step_s, []

    def run_checked(self, checked, reports, progress=None):
        prompts = tuple(c.request.prompt for c in checked)
        if not self.batches:
            self.entered.set()
            assert self.release.wait(30), "never released"
        for done in range(1, self.steps + 1):
            time.sleep(self.step_s)
            self.ran.append((prompts, done))
            if progress is not None:
                progress(done, self.steps)
        return super().run_checked(checked, reports, progress)


def test_in_a_batch_of_two_one_client_hanging_up_leaves_the_other_its_image():
    """Two requests share a batch; B's client hangs up mid-run. C still waits, so the batch runs to its last step
    and C gets its own image; B is counted as disconnected."""
    stub = SteppingBatchStub(steps=100, step_s=0.02)
    app = create_app(stub, Settings(max_batch=2))
    with serving(app) as port:
        a = _in_thread(post_json, port, "/v1/images/generations", {**GEN, "prompt": "A", "seed": 1})
        assert stub.entered.wait(10)
        body = json.dumps({**GEN, "prompt": "B", "seed": 2}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_for(lambda: app.state.scheduler.depth == 1, "B to be queued")
            c = _in_thread(post_json, port, "/v1/images/generations", {**GEN, "prompt": "C", "seed": 3})
            wait_for(lambda: app.state.scheduler.depth == 2, "C to be queued")
            stub.release.set()
            wait_for(lambda: any(p == ("B", "C") for p, _ in stub.ran), "B and C to run as one batch")
        status, _, answer = c.result(30)  # B's client is gone
        text = call(port, "GET", "/metrics")[2]
        assert a.result(10)[0] == 200
    assert status == 200, answer
    assert decoded(answer["data"][0]["b64_json"]).getpixel((0, 0)) == color_of(3)
    assert stub.batches[1] == ["B", "C"] and max(d for p, d in stub.ran if p == ("B", "C")) == stub.steps
    assert metric(text, 'kontext_rt_rejections_total{reason="disconnected"}') == 1


def test_a_request_still_queued_at_its_deadline_gets_503():
    stub = StubPipe(hold=1)
    app = create_app(stub, Settings(max_batch=1, timeout_s=0.5))
    with serving(app) as port:
        a = _in_thread(post_json, port, "/v1/images/generations", {**GEN, "seed": 1})
        assert stub.entered.wait(10)
        status, headers, body = post_json(port, "/v1/images/generations", {**GEN, "seed": 2})
        assert status == 503 and body["error"]["code"] == "timeout" and "retry-after" in headers, body
        stub.release.set()
        assert a.result(10)[0] == 200, "a started request runs to the end, past its deadline"
    assert [k["seed"] for _, k in stub.calls] == [1]


def test_errors_inside_the_pipeline_are_answered_and_the_server_goes_on():
    with serving(create_app(StubPipe())) as port:
        status, _, body = post_json(port, "/v1/images/generations", {**GEN, "prompt": "refused"})
        assert status == 400 and body["error"]["message"] == "this prompt is refused", body
        status, _, body = post_json(port, "/v1/images/generations", {**GEN, "prompt": "crash"})
        assert status == 500 and body["error"]["type"] == "server_error" and "a bug" not in body["error"]["message"]
        assert post_json(port, "/v1/images/generations", {**GEN, "seed": 4})[0] == 200
        text = call(port, "GET", "/metrics")[2]
    assert metric(text, 'kontext_rt_errors_total{kind="internal_error"}') == 1


def test_out_of_device_memory_is_a_503_to_retry_and_the_server_goes_on():
    with serving(create_app(StubPipe())) as port:
        status, headers, body = post_json(port, "/v1/images/generations", {**GEN, "prompt": "oom"})
        assert status == 503 and body["error"]["code"] == "out_of_memory" and "retry-after" in headers, body
        assert "Tried to allocate" not in body["error"]["message"]
        assert post_json(port, "/v1/images/generations", {**GEN, "seed": 4})[0] == 200


def test_shutdown_answers_the_running_and_queued_requests_first():
    stub = StubPipe(hold=1)
    app = create_app(stub, Settings(max_batch=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    a = _in_thread(post_json, port, "/v1/images/generations", {**GEN, "seed": 1})
    assert stub.entered.wait(10)
    b = _in_thread(post_json, port, "/v1/images/generations", {**GEN, "seed": 2})
    wait_for(lambda: app.state.scheduler.depth == 1, "B to be queued")
    server.should_exit = True  # what SIGTERM does
    time.sleep(0.3)
    assert thread.is_alive()
    stub.release.set()
    assert a.result(10)[0] == 200 and b.result(10)[0] == 200
    thread.join(10)
    assert not thread.is_alive() and app.state.scheduler.closing
    assert [k["seed"] for _, k in stub.calls] == [1, 2]


# ---- the command ------------------------------------------------------------------------------------------------


def test_sigterm_drains_and_exits_0(kontext_dir, pictures):
    """The real command: a request in the model when SIGTERM arrives is answered, then the process exits 0."""
    proc = subprocess.Popen(_serve_command(kontext_dir), stderr=subprocess.PIPE, text=True)
    try:
        port, _ = _serving(proc)
        a, _ = pictures
        fields = {"prompt": PROMPT, "size": "64x48", "steps": "8", "seed": "3", "auto_resize": "false"}
        answer = _in_thread(post_form, port, "/v1/images/edits", fields, [("image", "a.png", png(a))])
        wait_for(lambda: metric(call(port, "GET", "/metrics")[2], "kontext_rt_running") == 1, "the edit to start")
        proc.send_signal(signal.SIGTERM)
        status, _, body = answer.result(60)
        assert status == 200 and decoded(body["data"][0]["b64_json"]).size == (64, 48)
        assert proc.wait(60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_serve_with_speed_options_gives_the_apis_pixels(kontext_dir, lora_file):
    """The load options of edit and generate reach the server too: FP8, no hoisting and a LoRA, as the API."""
    from tests.test_cli import SPEED, speed_pipe

    cmd = _serve_command(kontext_dir, *SPEED, "--lora", f"{lora_file}:0.5")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        port, line = _serving(proc)
        assert line.rstrip().endswith("(eager, cpu; fp8 dynamic, modulation per step, LoRA style x0.5)"), line
        request = {"prompt": "a fox", "size": "32x32", "steps": 2, "seed": 4}
        status, _, body = post_json(port, "/v1/images/generations", request)
        assert status == 200, body
    finally:
        proc.kill()
        proc.wait()
    want = speed_pipe(kontext_dir, lora_file).generate("a fox", width=32, height=32, steps=2, seed=4)
    assert np.array_equal(pixels(decoded(body["data"][0]["b64_json"])), pixels(want))


def _serve_command(checkpoint, *flags) -> list[str]:
    return [sys.executable, "-m", "kontext_rt.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0", *flags]


def _serving(proc) -> tuple[int, str]:
    """(port, the start line) of a `kontext-rt serve --port 0` process, once it answers /health."""
    line = ""
    while "serving" not in line:
        line = proc.stderr.readline()
        assert line, "the server exited before serving"
    port = int(line.rsplit(":", 1)[1].split()[0])
    wait_for(lambda: _up(port), "the server to answer", 60)
    return port, line


def _up(port) -> bool:
    try:
        return call(port, "GET", "/health", timeout=2)[0] == 200
    except OSError:
        return False


def test_serve_without_the_extra_is_one_line_and_exit_2(tmp_path):
    """The package and its CLI import without the serve extra; `serve` then names the pip command."""
    script = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client', 'multipart', 'python_multipart'):\n"
        "    sys.modules[name] = None  # not installed\n"
        "import kontext_rt, kontext_rt.cli\n"
        f"sys.exit(kontext_rt.cli.main(['serve', '--checkpoint', {str(tmp_path)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and 'pip install "kontext-rt[serve]"' in lines[0]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--port", "70000"], "not in 0..65535"),
        (["--max-queue", "0"], "must be at least 1"),
        (["--context-cache", "-1"], "--context-cache"),
        (["--max-upload-mb", "-1"], "positive"),
        (["--timeout-s", "nan"], "finite"),
        (["--port", "{busy}"], "cannot listen on 127.0.0.1"),
        (["--host", "no.such.host.invalid"], "cannot listen"),
    ],
)
def test_bad_serve_flags_are_refused_before_loading(args, match, kontext_dir, monkeypatch, capsys):
    from kontext_rt.cli import main

    def loaded(*a, **k):
        raise AssertionError("the checkpoint was loaded before the check")

    monkeypatch.setattr(Pipeline, "from_pretrained", loaded)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [a.replace("{busy}", str(busy.getsockname()[1])) for a in args]
        code = main(["serve", "--checkpoint", str(kontext_dir), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines


# ---- the safety hook ---------------------------------------------------------------------------------------------


def flag_red(image):
    """A safety check for tests: flags an image whose first pixel is seed 2's colour."""
    flagged = image.getpixel((0, 0)) == color_of(2)
    return (not flagged, "red is not allowed here" if flagged else "")


def test_a_flagged_output_is_withheld_and_the_response_says_why():
    app = create_app(StubPipe(), Settings(max_batch=1, safety=flag_red))
    with serving(app) as port:
        ok = post_json(port, "/v1/images/generations", {**GEN, "seed": 1})
        status, _, body = post_json(port, "/v1/images/generations", {**GEN, "seed": 2})
        assert ok[0] == 200 and decoded(ok[2]["data"][0]["b64_json"]).getpixel((0, 0)) == color_of(1)
        assert status == 400 and body["error"]["code"] == "content_policy_violation", body
        assert "red is not allowed here" in body["error"]["message"] and "data" not in body
        assert call(port, "GET", "/health")[0] == 200
        text = call(port, "GET", "/metrics")[2]
    assert metric(text, 'kontext_rt_rejections_total{reason="safety"}') == 1


@pytest.mark.parametrize("hook", [lambda image: 1 / 0, lambda image: "fine", lambda image: (1, "x")])
def test_a_failing_safety_check_withholds_the_image(hook):
    app = create_app(StubPipe(), Settings(max_batch=1, safety=hook))
    with serving(app) as port:
        status, _, body = post_json(port, "/v1/images/generations", {**GEN, "seed": 1})
        assert status == 500 and body["error"]["code"] == "safety_check_failed" and "data" not in body, body
        assert call(port, "GET", "/health")[0] == 200


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nocolon", "MODULE:CALLABLE"),
        ("no_such_module_here:check", "cannot import"),
        ("tests.test_serve:nothing_by_this_name", "has no"),
        ("tests.test_serve:GEN", "not callable"),
    ],
)
def test_a_bad_safety_spec_is_refused_before_loading(spec, match, kontext_dir, monkeypatch, capsys):
    from kontext_rt.cli import main
    from kontext_rt.weights.formats import CheckpointFormat

    monkeypatch.setattr(CheckpointFormat, "load_transformer", lambda *a, **k: pytest.fail("weights read"))
    assert main(["serve", "--checkpoint", str(kontext_dir), "--port", "0", "--safety", spec]) == 2
    assert match in capsys.readouterr().err


def test_a_safety_spec_names_a_callable():
    from kontext_rt.serve import safety

    assert safety.load("tests.test_serve:flag_red") is flag_red


def test_the_load_test_script_runs_and_its_invariants_hold(tmp_path):
    """benchmarks/e2e/serve_load.py --smoke: none lost, no 5xx, a burst gets 429s, an abandoned request frees the worker
    (the script exits 1 otherwise); the figures themselves are the benchmark's, not checked here."""
    import subprocess
    import sys

    from tests import bench_scripts

    out = tmp_path / "load.json"
    script = bench_scripts.path("e2e/serve_load.py")
    run = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [m["max_batch"] for m in data["mixed"]] == [1, 4]
    assert all(m["ok"] == m["requests"] > 0 for m in data["mixed"])
    assert data["burst"]["rejected_429"] == data["burst"]["rejected_with_retry_after"] > 0
    assert data["abandon"]["disconnected_counted"] == 1
