"""Image inputs: every kind of bad file gets a ValueError that names it."""

import struct
import zlib

import pytest
from PIL import Image

from kontext_rt.image import load_image


def _png_claiming(path, w, h):
    """A tiny valid PNG whose header claims w x h (a decompression bomb never needs to be decoded to be refused)."""
    Image.new("RGB", (16, 16)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + type of IHDR
    data[ihdr : ihdr + 8] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_good_image_is_rgb(tmp_path):
    Image.new("L", (32, 16)).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (32, 16)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "x.png")


def test_decompression_bomb(tmp_path):
    _png_claiming(tmp_path / "bomb.png", 40_000, 40_000)
    with pytest.raises(ValueError, match=r"bomb.png.*(MP|decompression)"):
        load_image(tmp_path / "bomb.png")


def test_zero_size_and_too_small():
    with pytest.raises(ValueError, match="zero size"):
        load_image(Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match="at least 16 pixels"):
        load_image(Image.new("RGB", (8, 64)))


def test_wrong_type():
    with pytest.raises(TypeError, match="PIL image or a path"):
        load_image(42)
