"""Tiled VAE encode and decode: large images in overlapping tiles with blended seams, as diffusers' AutoencoderKL
does it with enable_tiling() (`_tiled_encode`, `tiled_decode`, `blend_v`, `blend_h`).

    vae = TiledVAE(autoencoder, tile=1024, overlap=0.25)   # encode/decode/cfg as the AutoEncoder's
    tile_shape(width, height, tile)                        # the image size one encoder/decoder call runs at

A decode at 2048 x 2048 holds GroupNorm inputs over full feature maps and a mid-block attention over all positions;
tiled, the transient is one tile's (tile_shape), whatever the image size.

The algorithm is diffusers', step for step, so the result can be checked against diffusers' tiled result on the same
weights. With T the tile in image pixels, t = T / downscale its latent size and f the overlap factor:
- encode: tiles of T px start every int(T * (1 - f)) px along each axis (the last ones cut by the image edge); each
  tile's latent is blended into the tile above over its first int(t * f) rows, then into the tile to its left over
  its first int(t * f) columns (linear ramp: weight y / n for the new tile's row y, n the blend extent, clipped to
  the new tile's size), and the first t - int(t * f) rows and columns of each are kept;
- decode: the same with the roles swapped: latent tiles of t start every int(t * (1 - f)), blend extent int(T * f)
  px, T - int(T * f) px kept.
A tile blends with its neighbours as already blended (diffusers blends in place, row by row, left to right).
An image within one tile (H <= T and W <= T; a latent within t x t) takes the plain path, bit for bit the
AutoEncoder's.

Where the scale and shift happen: diffusers tiles the raw encoder moments and the caller takes the mean and scales
after; here each tile goes through vae.encode (mean, then scale * (mean - shift)) and the scaled latents are blended.
Both the mean chunk and the affine scale act element by element and a blend's two weights sum to 1, so the order
changes only float rounding (a few ulp in the blended rows; the error against diffusers in float64 measured the
same either way to two digits), inside the float32 parity bound. Decode unscales the whole latent element by element
before any tile (in vae.decode), exactly as diffusers' caller does. Blending per tile through vae.encode/vae.decode
lets the same code wrap the eager AutoEncoder and the TensorRT VAE (whose engine profiles then cover the tile).

Tiling is not exact: GroupNorm statistics and the mid-block attention see one tile, not the image. Stated bound
(tests/test_vae_tiling.py): for the same weights and input, max |tiled - untiled| of this module is diffusers' own
max |tiled - untiled| = D, give or take the float32 rounding the parity tests allow each of the two results (3 x
diffusers' float32 error, relative Frobenius, times the result's norm, which bounds the max too): at most K x D with
K = 1 + that slack / D. On the tiny test VAE the slack is 2e-5 to 6e-4 of D and the measured gap under 5e-7 of D,
for D = 0.19 to 0.44 (encode, latents) and 1.7 to 2.9 (decode, image in [-1, 1] units) at 32 to 96 px tiles.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from kontext_rt.errors import InputError

DEFAULT_TILE = 1024  # image px: diffusers' tile_sample_min_size for FLUX (its VAE's sample_size); 128 latent px
DEFAULT_OVERLAP = 0.25  # diffusers' tile_overlap_factor


@dataclass(frozen=True)
class Tiling:
    """One direction of tiling, in diffusers' integers: input tiles and their stride, in the input's pixels;
    blend extent and rows kept per tile, in the output's pixels."""

    tile: int  # input tile side (diffusers' tile_sample_min_size for encode, tile_latent_min_size for decode)
    stride: int  # between tile starts (diffusers' overlap_size)
    blend: int  # output rows / columns ramped into the previous tile (blend_extent)
    keep: int  # output rows / columns kept from each tile (row_limit)


def _check_tile(tile, downscale: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile <= 0 or tile % downscale:
        raise InputError(f"tile={tile!r}: the tile is a positive multiple of the VAE's downscale ({downscale} px)")


def tilings(tile: int, overlap: float, downscale: int) -> tuple[Tiling, Tiling]:
    """(encode, decode) tilings of a tile of `tile` image px with `overlap` (a fraction of the tile), validated."""
    _check_tile(tile, downscale)
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0 <= overlap < 0.5:
        raise InputError(f"overlap={overlap!r}: the overlap is a fraction of the tile in [0, 0.5)")
    lat = tile // downscale
    # diffusers' expressions (int() truncates), so that the same tile and overlap tile the same way
    enc_blend, dec_blend = int(lat * overlap), int(tile * overlap)
    enc = Tiling(tile, int(tile * (1 - overlap)), enc_blend, lat - enc_blend)
    dec = Tiling(lat, int(lat * (1 - overlap)), dec_blend, tile - dec_blend)
    # tiles start where the previous tile's kept part ends, else the output is not H/8 x W/8 (or 8h x 8w): the
    # overlap must be a whole number of latent pixels
    if enc.stride != downscale * enc.keep or downscale * dec.stride != dec.keep:
        raise InputError(
            f"overlap={overlap!r} of a {tile} px tile is {tile * overlap:g} px, not a whole number of latent pixels "
            f"({downscale} px each): choose tile * overlap a multiple of {downscale}"
        )
    return enc, dec


def tile_shape(width: int, height: int, tile: int = DEFAULT_TILE) -> tuple[int, int]:
    """(tile_w, tile_h): the image size, in px, one encoder call runs at and one decoder call produces for a
    width x height image (the decoder's input is that over the VAE's downscale). The first tile is the largest,
    so a memory plan traces the plain VAE at this size for the transient of a tiled one."""
    for name, v in (("width", width), ("height", height), ("tile", tile)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise InputError(f"{name}={v!r}: a positive number of pixels")
    return min(width, tile), min(height, tile)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b with its first rows (dim 2) or columns (dim 3) ramped from a's last ones, as diffusers' blend_v / blend_h:
    b[y] = a[y - n] * (1 - y / n) + b[y] * (y / n), n = min(extent, b's size) (diffusers also clips to a's size,
    but a tile is never smaller than the one after it). Same arithmetic: weights y / n in float64, rounded to the
    op's compute type (float32, or float64 for float64 tensors), each product rounded to b's dtype before the sum."""
    n = min(extent, b.shape[dim])
    if n == 0:
        return b
    opmath = torch.float64 if b.dtype == torch.float64 else torch.float32
    w = torch.arange(n, dtype=torch.float64, device=b.device) / n
    shape = [1] * b.ndim
    shape[dim] = n
    w_a, w_b = ((1 - w).to(opmath).view(shape), w.to(opmath).view(shape))
    head = (a.narrow(dim, a.shape[dim] - n, n) * w_a).to(b.dtype) + (b.narrow(dim, 0, n) * w_b).to(b.dtype)
    return torch.cat((head, b.narrow(dim, n, b.shape[dim] - n)), dim)


def _run_tiled(run, x: torch.Tensor, t: Tiling) -> torch.Tensor:
    """run() over the overlapping tiles of x (B, C, H, W), blended and cropped; two rows of tiles held at a time."""
    h, w = x.shape[-2:]
    above, rows = None, []
    for i in range(0, h, t.stride):
        row = []
        for j in range(0, w, t.stride):
            out = run(x[:, :, i : i + t.tile, j : j + t.tile])
            if above is not None:
                out = _blend(above[len(row)], out, t.blend, 2)
            if row:
                out = _blend(row[-1], out, t.blend, 3)
            row.append(out)
        rows.append(torch.cat([o[:, :, : t.keep, : t.keep] for o in row], 3))
        above = row
    return torch.cat(rows, 2)


def _check_input(x, channels: int, what: str, downscale: int = 1) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{what}: expected a (B, {channels}, H, W) tensor, got {got}")
    if 0 in x.shape or x.shape[2] % downscale or x.shape[3] % downscale:
        raise InputError(
            f"{what}: shape {tuple(x.shape)}: a nonempty batch whose height and width are multiples of the VAE's "
            f"downscale ({downscale})"
        )


def tiled_encode(vae, x: torch.Tensor, tile: int = DEFAULT_TILE, overlap: float = DEFAULT_OVERLAP) -> torch.Tensor:
    """vae.encode (image (B, 3, H, W) in [-1, 1] -> scaled latent (B, z, H/8, W/8)) by tiles of `tile` px; an image
    within one tile goes through vae.encode whole."""
    enc, _ = tilings(tile, overlap, vae.cfg.downscale)
    _check_input(x, vae.cfg.in_channels, "tiled encode: image", vae.cfg.downscale)
    if x.shape[2] <= enc.tile and x.shape[3] <= enc.tile:
        return vae.encode(x)
    return _run_tiled(vae.encode, x, enc)


def tiled_decode(vae, z: torch.Tensor, tile: int = DEFAULT_TILE, overlap: float = DEFAULT_OVERLAP) -> torch.Tensor:
    """vae.decode (scaled latent (B, z, h, w) -> image (B, 3, 8h, 8w)) by latent tiles of tile / 8; a latent within
    one tile goes through vae.decode whole."""
    _, dec = tilings(tile, overlap, vae.cfg.downscale)
    _check_input(z, vae.cfg.z_channels, "tiled decode: latent")
    if z.shape[2] <= dec.tile and z.shape[3] <= dec.tile:
        return vae.decode(z)
    return _run_tiled(vae.decode, z, dec)


class TiledVAE:
    """An AutoEncoder (or anything with its encode/decode/cfg, e.g. the TensorRT VAE) that encodes and decodes
    images larger than `tile` px in overlapping tiles; the pipeline uses it in place of the VAE it wraps."""

    def __init__(self, vae, tile: int = DEFAULT_TILE, overlap: float = DEFAULT_OVERLAP):
        tilings(tile, overlap, vae.cfg.downscale)  # refuse a bad tile or overlap now, not at the first image
        self.vae, self.tile, self.overlap = vae, tile, overlap

    @property
    def cfg(self):
        return self.vae.cfg

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_encode(self.vae, x, self.tile, self.overlap)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return tiled_decode(self.vae, z, self.tile, self.overlap)

    def tile_shape(self, width: int, height: int) -> tuple[int, int]:
        return tile_shape(width, height, self.tile)
