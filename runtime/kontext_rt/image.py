"""Image I/O and the latent layout: validation, preferred Kontext resolutions, packing (docs/model.md)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kontext_rt.errors import InputError

MULTIPLE = 16  # VAE /8 and the 2x2 patch
MAX_PIXELS = 64 * 2**20  # refuse larger inputs before decoding them (decompression bombs)
# The largest side of an image the model works at (output, or context after resizing). FLUX.1 was trained up to
# about 2 MP; memory grows with the square of the area beyond that (the VAE's mid-block attends over every latent
# pixel: 4096x4096 asks for 256 GiB of attention scores where SDPA has no fused kernel).
MAX_SIDE = 2048

PREFERRED_KONTEXT_RESOLUTIONS = [  # (width, height)
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
]


def load_image(src, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A PIL image or a path -> an RGB PIL image; bad input raises InputError naming the problem."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise InputError(f"image {path}: file not found")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(path)
                check_input_pixels(img.size, str(path), max_pixels)
                img.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f"image {path}: not a readable image ({e})") from None
        except OSError as e:
            raise InputError(f"image {path}: unreadable ({e})") from None
    elif isinstance(src, Image.Image):
        img = src
        check_input_pixels(img.size, "image", max_pixels)
    else:
        raise TypeError(f"image must be a PIL image or a path, got {type(src).__name__}")
    return img.convert("RGB")


def check_input_pixels(size, name: str, max_pixels: int):
    """An input image's own size, before it is decoded: not empty, not a decompression bomb, not under 16 px."""
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"{name} has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise InputError(f"{name} is {w}x{h} = {w * h / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit")
    if w < MULTIPLE or h < MULTIPLE:
        raise InputError(f"{name} is {w}x{h}: both sides must be at least {MULTIPLE} pixels")


def context_size(
    width: int, height: int, auto_resize: bool, name: str = "context image", preferred=PREFERRED_KONTEXT_RESOLUTIONS
) -> tuple[int, int]:
    """Floor to multiples of 16; with auto_resize, the preferred resolution of nearest aspect ratio (FLUX.1
    Kontext's about 1 MP, or the sizes a checkpoint says it was trained at).

    Without auto_resize, a side over MAX_SIDE is refused (InputError): the image would be encoded at that size.
    """
    floored = width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE
    if auto_resize:
        ar = floored[0] / floored[1]
        return min((abs(ar - w / h), w, h) for w, h in preferred)[1:]
    if max(floored) > MAX_SIDE:
        raise InputError(
            f"{name} is {width}x{height}: without auto-resize it is encoded at {floored[0]}x"
            f"{floored[1]}, over the {MAX_SIDE} px limit on a side; resize it or use auto-resize"
        )
    return floored


def default_size(preferred=PREFERRED_KONTEXT_RESOLUTIONS) -> tuple[int, int]:
    """A text-to-image run's size when none is given: the preferred resolution nearest to square (1024x1024)."""
    return min((abs(w / h - 1), w, h) for w, h in preferred)[1:]


def outside_trained_size(width: int, height: int, preferred) -> str | None:
    """A warning's text when width x height is far (over 4x, or under a quarter) from the area of every size a
    checkpoint says it was trained at; None when it is not."""
    areas = [w * h for w, h in preferred]
    if min(areas) / 4 <= width * height <= 4 * max(areas):
        return None
    sizes = ", ".join(f"{w}x{h}" for w, h in preferred)
    return (
        f"{width}x{height} is far from the size this checkpoint was trained at ({sizes}, its model_index.json "
        "says): expect an image it cannot draw; ask for one of those sizes"
    )


def check_output_size(width, height):
    """Output width and height: positive multiples of 16, at most MAX_SIDE (InputError otherwise)."""
    check_side("width", width)
    check_side("height", height)


def check_side(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise InputError(f"{name} must be a positive integer, got {v!r}")
    if v % MULTIPLE:
        raise InputError(f"{name} {v} is not a multiple of {MULTIPLE}")
    if v > MAX_SIDE:
        raise InputError(f"{name} {v} is over the {MAX_SIDE} px limit on a side")


def to_tensor(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB PIL -> (1, 3, H, W) float32 in [-1, 1], LANCZOS-resized to (width, height) as diffusers does."""
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.LANCZOS)
    x = np.asarray(img, dtype=np.float32)[None] / 255.0
    return torch.from_numpy(x).permute(0, 3, 1, 2) * 2.0 - 1.0  # channels-last strides, the VAE's layout on the CPU


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> uint8 images, rounded (diffusers' postprocess)."""
    x = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in x]


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, h*w, 4C): tokens row-major, channel index c*4 + ph*2 + pw."""
    b, c, hh, ww = z.shape
    return z.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, rows*cols, 4C) -> (B, C, 2*rows, 2*cols), the inverse of pack."""
    b, _, d = x.shape
    return x.view(b, rows, cols, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, rows * 2, cols * 2)
