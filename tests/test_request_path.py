"""One request, one path: a CLI edit finds its checkpoint once and reads each config file once, and a server
request is checked once and reads no config at all. Counted with spies on the functions that do the work, so a
second detection, a re-read config or a second check of a request fails here."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import kontext_rt.image as im
from kontext_rt import Pipeline
from kontext_rt.cli import main
from kontext_rt.serve import Settings, create_app
from kontext_rt.serve import app as serve_app
from kontext_rt.serve.background import serving
from kontext_rt.weights import configs, formats
from tests.test_serve import multipart


class Spies:
    """Counts of every call of the functions below, made while the spies are on."""

    def __init__(self, monkeypatch):
        self.calls = Counter()
        self.json_reads = Counter()
        read_json = configs.read_json

        def counted_json(path):
            self.json_reads[Path(path).resolve()] += 1
            return read_json(path)

        for module in (configs, formats):  # formats imported read_json by name
            monkeypatch.setattr(module, "read_json", counted_json)
        self.wrap(monkeypatch, formats, "diffusers_transformer_config", "transformer config")
        self.wrap(monkeypatch, formats, "diffusers_vae_config", "vae config")
        self.wrap(monkeypatch, formats.DiffusersFolder, "open", "checkpoint found", classmethod_of=True)
        self.wrap(monkeypatch, Pipeline, "_check", "request checked")
        self.wrap(monkeypatch, im, "load_image", "image loaded")
        self.wrap(monkeypatch, serve_app, "decode_image", "upload decoded")

    def wrap(self, monkeypatch, owner, name, label, classmethod_of=False):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls[label] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(
            owner, name, classmethod(lambda cls, *a, **k: counted(*a, **k)) if classmethod_of else counted
        )

    def reset(self):
        self.calls.clear()
        self.json_reads.clear()


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(path)
    return path


def test_a_cli_edit_finds_the_checkpoint_once_and_reads_each_config_once(
    kontext_dir, picture, tmp_path, monkeypatch, capsys
):
    spies = Spies(monkeypatch)
    out = tmp_path / "out.png"
    argv = [str(picture), "make it blue", "--checkpoint", str(kontext_dir), "-o", str(out), "--steps", "1"]
    code = main(["edit", *argv, "--seed", "1", "--no-text-cache", "-q", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert out.is_file()
    assert spies.calls["checkpoint found"] == 1
    assert spies.calls["transformer config"] == 1 and spies.calls["vae config"] == 1
    assert spies.calls["request checked"] == 1
    reread = {str(p): n for p, n in spies.json_reads.items() if n > 1}
    assert not reread and spies.json_reads, reread
    assert (kontext_dir / "model_index.json").resolve() in spies.json_reads


def test_a_server_request_is_checked_once_and_reads_no_config(kontext_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(kontext_dir)
    spies = Spies(monkeypatch)
    body, headers = multipart(
        {"prompt": "make it blue", "size": "32x32", "steps": "1", "seed": "3"},
        [("image", "a.png", _png(Image.new("RGB", (32, 32), (10, 200, 30))))],
    )
    with serving(create_app(pipe, Settings(max_batch=1))) as port:
        spies.reset()  # what the server does at start is not a request's
        status, answer = _post(port, "/v1/images/edits", body, headers)
    assert status == 200, answer
    assert spies.calls["request checked"] == 1
    assert spies.calls["upload decoded"] == 1 and spies.calls["image loaded"] == 1
    assert spies.calls["checkpoint found"] == 0 and not spies.json_reads
    assert spies.calls["transformer config"] == 0 and spies.calls["vae config"] == 0


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _post(port, path, body, headers):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        answer = json.loads(r.read())
    finally:
        conn.close()
    if r.status == 200:
        Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"])))
    return r.status, answer
