"""Image-quality and edit-correctness metrics, numpy float64, on 8-bit RGB images (PIL or (H, W, 3) uint8 arrays).

Every colour test below uses one rule: the *dominant colour* of a region is the per-channel median of its pixels,
and it *matches* a palette colour when no channel differs by more than COLOUR_TOL (40 of 255). The palette's two
closest colours differ by 90 in some channel, so a colour matches at most one palette entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from kontext_rt.errors import InputError
from kontext_toy import shapes
from kontext_toy.shapes import PALETTE, EditSample, GenSample, Scene, Shape

COLOUR_TOL = 40  # max |channel difference| (0-255) for a colour to count as a palette colour
DATA_RANGE = 255.0
# SSIM constants of Wang et al. 2004: K1, K2, an 11x11 Gaussian window of sigma 1.5
SSIM_K1, SSIM_K2, SSIM_WIN, SSIM_SIGMA = 0.01, 0.03, 11, 1.5


def as_array(img) -> np.ndarray:
    """PIL image or array -> float64 (H, W, C) in 0..255."""
    a = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, dtype=np.float64)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise InputError(f"an image must be (H, W) or (H, W, C), got shape {a.shape}")
    return a


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_array(a), as_array(b)
    if a.shape != b.shape:
        raise InputError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a, b


def _check_mask(mask, shape) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape[:2]:
        raise InputError(f"mask shape {mask.shape} does not match the image's {shape[:2]}")
    return mask


def psnr(a, b, mask=None) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(255^2 / MSE), the MSE over every channel of the pixels where
    mask (H, W) is true (all pixels without a mask). Identical pixels give inf; an empty mask gives nan."""
    a, b = _pair(a, b)
    if mask is not None:
        m = _check_mask(mask, a.shape)
        a, b = a[m], b[m]
    if a.size == 0:
        return math.nan
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE**2 / mse)


def gaussian_window(size: int = SSIM_WIN, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian whose outer product is SSIM's 2-D window."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable correlation of (H, W) with g x g, only where the window fits: (H - k + 1, W - k + 1)."""
    k = len(g)
    rows = sum(g[i] * x[i : x.shape[0] - k + 1 + i] for i in range(k))
    return sum(g[j] * rows[:, j : x.shape[1] - k + 1 + j] for j in range(k))


def ssim_map(a, b) -> np.ndarray:
    """SSIM of every 11x11 window that fits inside the image, per channel: (H - 10, W - 10, C).

    SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)), means and (population)
    covariances weighted by the Gaussian window, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2 (Wang et al. 2004;
    skimage's structural_similarity with gaussian_weights=True, use_sample_covariance=False, data_range=255).
    """
    a, b = _pair(a, b)
    if min(a.shape[:2]) < SSIM_WIN:
        raise InputError(f"SSIM needs images of at least {SSIM_WIN}x{SSIM_WIN} pixels, got {a.shape[:2]}")
    g = gaussian_window()
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    out = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        mx, my = _filter_valid(x, g), _filter_valid(y, g)
        sxx = _filter_valid(x * x, g) - mx * mx
        syy = _filter_valid(y * y, g) - my * my
        sxy = _filter_valid(x * y, g) - mx * my
        out.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))
    return np.stack(out, -1)


def ssim(a, b, mask=None) -> float:
    """Mean SSIM over the windows that fit inside the image and over the RGB channels (per channel, averaged, as
    skimage's channel_axis does; not on luminance). With mask (H, W): only the windows centred on a masked pixel;
    nan when there is none."""
    m = ssim_map(a, b)
    if mask is not None:
        half = SSIM_WIN // 2
        centres = _check_mask(mask, as_array(a).shape)[half:-half, half:-half]
        if not centres.any():
            return math.nan
        m = m[centres]
    return float(m.mean())


def lpips(a, b, model=None) -> float | None:
    """LPIPS distance (the `lpips` package, AlexNet features) when that package is importable and its network can
    be built; None otherwise (it is not a dependency of kontext-rt). Pass model=lpips.LPIPS(...) to reuse one."""
    try:
        import lpips as lp
        import torch
    except ImportError:
        return None
    a, b = _pair(a, b)
    if model is None:
        try:
            model = lp.LPIPS(net="alex", verbose=False)
        except Exception:  # its AlexNet weights download on first use: offline, no score
            return None
    to_t = lambda x: torch.from_numpy(x / 127.5 - 1.0).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return float(model(to_t(a), to_t(b)).item())


# ---- edit correctness --------------------------------------------------------------------------------------------


def dominant(img, region: np.ndarray) -> np.ndarray:
    """Per-channel median RGB of the pixels in region (H, W) bool."""
    a = as_array(img)
    region = _check_mask(region, a.shape)
    if not region.any():
        raise InputError("dominant colour of an empty region")
    return np.median(a[region], axis=0)


def matches(rgb, colour: str) -> bool:
    return bool(np.max(np.abs(np.asarray(rgb, np.float64) - PALETTE[colour])) <= COLOUR_TOL)


def colour_pixels(img, colour: str) -> np.ndarray:
    """(H, W) bool: pixels within COLOUR_TOL of a palette colour in every channel."""
    return np.max(np.abs(as_array(img) - PALETTE[colour]), axis=-1) <= COLOUR_TOL


def cell_box(cell: tuple[int, int], size: int) -> np.ndarray:
    """(size, size) bool: the pixels of one grid cell."""
    side = size // shapes.GRID
    box = np.zeros((size, size), bool)
    box[cell[0] * side : (cell[0] + 1) * side, cell[1] * side : (cell[1] + 1) * side] = True
    return box


def _centroid(mask: np.ndarray) -> np.ndarray:
    """(x, y) mean of the pixel centres in mask."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def _blob(img, colour: str, region: np.ndarray, area: int):
    """Centroid of the pixels of `colour` inside region, or None when they cover under half of `area`."""
    found = colour_pixels(img, colour) & region
    return _centroid(found) if found.sum() >= area / 2 else None


def edit_success(sample: EditSample, output) -> bool:
    """Whether output carries out the sample's instruction (the rest of the image is preservation's business).

    - recolour: the dominant colour of the shape's pixels matches the new colour.
    - move: pixels of the shape's colour inside its old and new cells cover at least half its area, and their
      centroid moved from the shape's by at least half the step along the direction and less than half across.
    - remove: the dominant colour of the shape's pixels matches the background.
    - background: the dominant colour of the target's background pixels (shapes grown by a pixel left out) matches
      the new background colour.
    - add: pixels of the new colour in the expected cell cover at least half the new shape's area, their centroid
      within a quarter cell of the cell's centre.
    """
    out = as_array(output)
    meta, size = sample.meta, sample.target.size[0]
    if out.shape[:2] != (sample.target.size[1], size):
        raise InputError(f"output is {out.shape[1]}x{out.shape[0]}, the sample {size}x{sample.target.size[1]}")
    if sample.kind == "background":
        tgt = Scene.from_dict(meta["target"])
        return matches(dominant(out, ~shapes.grow(tgt.shapes_mask())), meta["colour"])
    shape = Shape.from_dict(meta["shape"])
    region = shapes.shape_mask(shape, size)
    if sample.kind == "recolour":
        return matches(dominant(out, region), meta["colour"])
    if sample.kind == "remove":
        return matches(dominant(out, region), Scene.from_dict(meta["source"]).background)
    if sample.kind == "move":
        new = Shape.from_dict(meta["new_shape"])
        box = cell_box(shape.cell, size) | cell_box(new.cell, size)
        found = _blob(out, shape.colour, box, int(region.sum()))
        if found is None:
            return False
        d_row, d_col = shapes.DIRECTIONS[meta["direction"]]
        moved = found - _centroid(region)
        along, across = moved @ np.array([d_col, d_row]), moved @ np.array([d_row, d_col])
        return bool(along >= meta["step"] / 2 and abs(across) < meta["step"] / 2)
    if sample.kind == "add":
        found = _blob(out, shape.colour, cell_box(shape.cell, size), int(region.sum()))
        if found is None:
            return False
        cx, cy, side = shapes.cell_geometry(shape.cell, size)
        return bool(np.max(np.abs(found - (cx, cy))) <= side / 4)
    raise InputError(f"unknown edit kind {sample.kind!r}")


def preservation(sample: EditSample, output) -> dict:
    """PSNR (dB) and SSIM of output against the target over the pixels outside the edit mask (SSIM: the windows
    centred outside it; nan when none is)."""
    keep = ~sample.mask
    return {"psnr": psnr(output, sample.target, keep), "ssim": ssim(output, sample.target, keep)}


def kept_only(sample: EditSample, output) -> np.ndarray:
    """output outside the edit mask and the target inside it (float64, 0..255): a whole-image metric of it against
    the target (LPIPS) then sees only what the edit should have kept."""
    out, target = _pair(output, sample.target)
    mask = _check_mask(sample.mask, out.shape)
    out = out.copy()  # as_array does not copy a float64 array: the caller's output stays as it was
    out[mask] = target[mask]
    return out


def generation_success(sample: GenSample, output) -> bool:
    """A deliberately simple text-to-image check, on colours only (neither positions nor kinds, which a caption
    does not fix or a colour test cannot tell): the image's dominant colour matches the caption's background, and
    every shape colour named covers at least half the area of a small shape of that kind somewhere."""
    out = as_array(output)
    scene = Scene.from_dict(sample.meta["target"])
    if not matches(dominant(out, np.ones(out.shape[:2], bool)), scene.background):
        return False
    for s in scene.shapes:
        area = shapes.shape_mask(Shape(s.kind, s.colour, (0, 0), "small"), scene.size).sum()
        if colour_pixels(out, s.colour).sum() < area / 2:
            return False
    return True


def scene_embedding(img, grid: int = shapes.GRID) -> np.ndarray:
    """The shapes task's stand-in for an identity embedder (drift's embed): the mean colour of each cell of a
    grid x grid split of the image, centred on mid-grey (0..255 -> -127.5..127.5), flattened. Two pictures with the
    same shapes in the same places and colours embed alike; a shape lost, moved or recoloured turns the vector."""
    a = as_array(img)
    h, w = a.shape[:2]
    if h % grid or w % grid:
        raise InputError(f"scene_embedding: a {h}x{w} image does not split into a {grid}x{grid} grid")
    cells = a.reshape(grid, h // grid, grid, w // grid, a.shape[2]).mean(axis=(1, 3))
    return (cells - 127.5).ravel()


def drift(images: Sequence, embed: Callable | None = None) -> dict:
    """How far a multi-turn session wanders from its start: for images [turn 0, turn 1, ...] (e.g. the image after
    each edit-then-undo pair), PSNR (dB) of each later turn to turn 0, and, with embed (image -> vector; a face
    embedder such as AuraFace, or any other), the cosine similarity of each later turn's embedding to turn 0's
    (None without one)."""
    if len(images) < 2:
        raise InputError("drift needs at least two images (turn 0 and a later turn)")
    first = images[0]
    out = {"psnr": [psnr(img, first) for img in images[1:]], "cosine": None}
    if embed is not None:
        e0 = np.asarray(embed(first), np.float64).ravel()
        cos = []
        for img in images[1:]:
            e = np.asarray(embed(img), np.float64).ravel()
            cos.append(float(e @ e0 / (np.linalg.norm(e) * np.linalg.norm(e0))))
        out["cosine"] = cos
    return out
