"""A synthetic editing task rendered on the fly: flat shapes on a plain background, instructions, exact targets.

A scene is 1-3 shapes (circle, square, triangle, star; at most one of each kind, each its own palette colour) in
the cells of a GRID x GRID grid, small or large, on a background colour. An edit sample is a source scene, an
instruction ("make the circle red", "move the square to the left", "remove the triangle", "make the background
blue", "add a small green star") and the exact target scene; a generation sample is a caption and one rendering of
it. Held-out (colour, kind) pairs never appear in the train split; every held-out sample edits or names one.

Determinism: the random choices come from splitmix64 on Python integers and the pixels from float64 comparisons
on pixel centres (no anti-aliasing, no drawing library, constants rounded to 6 decimals), so the same seed gives
the same pixels on any machine and with any numpy or Pillow version. Sample i of a split depends on (seed, i)
alone, not on how many samples are drawn before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType

import numpy as np
from PIL import Image

from kontext_rt.errors import InputError

# sRGB 8-bit; the closest two colours differ by 90 in some channel (metrics.COLOUR_TOL is under half of that)
PALETTE: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 170, 50),
        "blue": (30, 70, 220),
        "yellow": (240, 220, 30),
        "purple": (140, 50, 170),
        "orange": (250, 130, 20),
        "white": (250, 250, 250),
        "black": (20, 20, 20),
    }
)
KINDS = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
EDIT_KINDS = ("recolour", "move", "remove", "background", "add")
GEN_KIND = "generate"
SPLITS = ("train", "heldout")
# (colour, kind) pairs that no train sample shows, in its source, its target or its caption
HELDOUT_PAIRS = frozenset({("green", "circle"), ("yellow", "square"), ("blue", "triangle"), ("purple", "star")})
GRID = 4  # cells per side; a cell is size / GRID pixels, one 16 px latent token at the default 64 px
RADIUS = MappingProxyType({"small": 0.28, "large": 0.44})  # of a cell; a large shape stays inside its cell
# (d_row, d_col) of a move by one cell, and how the instruction says it
DIRECTIONS = MappingProxyType({"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)})
DIRECTION_WORDS = MappingProxyType({"left": "to the left", "right": "to the right", "up": "up", "down": "down"})
MAX_TRIES = 10_000  # rejection sampling of a split's constraint; each try succeeds with probability > 1/20


def _star_vertices() -> tuple[tuple[float, float], ...]:
    """A five-pointed star of outer radius 1 (inner 0.45), point up, in (x, y) with y down; rounded to 6 decimals
    so libm differences in the last bit cannot move a pixel."""
    pts = []
    for k in range(10):
        a = math.radians(-90 + 36 * k)
        r = 1.0 if k % 2 == 0 else 0.45
        pts.append((round(r * math.cos(a), 6), round(r * math.sin(a), 6)))
    return tuple(pts)


_TRIANGLE = ((0.0, -1.0), (0.866025, 0.5), (-0.866025, 0.5))
_STAR = _star_vertices()
_SQUARE_HALF = 0.85  # of the radius: a square of about a circle's area


class _Rand:
    """splitmix64 on Python integers: the same stream everywhere, independent of numpy's generator versions."""

    MASK = (1 << 64) - 1

    def __init__(self, *keys: int):
        self.state = 0x9E3779B97F4A7C15
        for k in keys:
            self.state = (self.state ^ (int(k) & self.MASK)) & self.MASK
            self.next()

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n  # bias of n / 2**64: immaterial for n < 100

    def choice(self, seq):
        seq = list(seq)
        return seq[self.below(len(seq))]

    def sample(self, seq, k: int) -> list:
        pool, out = list(seq), []
        for _ in range(k):
            out.append(pool.pop(self.below(len(pool))))
        return out


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: tuple[int, int]  # (row, col) in the grid
    size: str = "large"

    @classmethod
    def from_dict(cls, d: dict) -> Shape:
        return cls(d["kind"], d["colour"], tuple(d["cell"]), d["size"])


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    size: int = 64

    def shape(self, kind: str) -> Shape:
        return next(s for s in self.shapes if s.kind == kind)

    def free_cells(self) -> list[tuple[int, int]]:
        used = {s.cell for s in self.shapes}
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]

    def to_dict(self) -> dict:
        return {"background": self.background, "size": self.size, "shapes": [asdict(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(d["background"], tuple(Shape.from_dict(s) for s in d["shapes"]), d["size"])

    def pairs(self) -> set[tuple[str, str]]:
        return {(s.colour, s.kind) for s in self.shapes}

    def render_array(self) -> np.ndarray:
        """(size, size, 3) uint8."""
        img = np.empty((self.size, self.size, 3), np.uint8)
        img[:] = PALETTE[self.background]
        for s in self.shapes:
            img[shape_mask(s, self.size)] = PALETTE[s.colour]
        return img

    def render(self) -> Image.Image:
        return Image.fromarray(self.render_array(), "RGB")

    def shapes_mask(self) -> np.ndarray:
        """Pixels covered by any shape, (size, size) bool."""
        m = np.zeros((self.size, self.size), bool)
        for s in self.shapes:
            m |= shape_mask(s, self.size)
        return m


@dataclass
class EditSample:
    source: Image.Image
    instruction: str
    target: Image.Image
    kind: str  # one of EDIT_KINDS
    mask: np.ndarray  # (H, W) bool: the pixels the edit may change (the changed shapes, grown by one pixel)
    meta: dict = field(default_factory=dict)  # JSON-serialisable: scenes, the edited shape, colours, split, index


@dataclass
class GenSample:
    caption: str
    target: Image.Image
    meta: dict = field(default_factory=dict)
    kind: str = GEN_KIND


def check_size(size) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 32 or size % 16:
        raise InputError(f"image size must be an integer multiple of 16, at least 32, got {size!r}")
    return size


def cell_geometry(cell: tuple[int, int], size: int) -> tuple[float, float, float]:
    """(x centre, y centre, cell side) in pixels."""
    side = size / GRID
    return (cell[1] + 0.5) * side, (cell[0] + 0.5) * side, side


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly) -> np.ndarray:
    """Even-odd rule for points (px, py) against a polygon's vertices, vectorised over the points."""
    inside = np.zeros(px.shape, bool)
    n = len(poly)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xcross = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < xcross)
    return inside


def shape_mask(shape: Shape, size: int) -> np.ndarray:
    """(size, size) bool: the pixels whose centres lie inside the shape."""
    if shape.kind not in KINDS:
        raise InputError(f"unknown shape kind {shape.kind!r}; kinds: {', '.join(KINDS)}")
    cx, cy, side = cell_geometry(shape.cell, size)
    r = RADIUS[shape.size] * side
    centres = np.arange(size, dtype=np.float64) + 0.5
    dx = (centres[None, :] - cx) / r  # in units of the radius
    dy = (centres[:, None] - cy) / r
    dx, dy = np.broadcast_arrays(dx, dy)
    if shape.kind == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape.kind == "square":
        return (np.abs(dx) <= _SQUARE_HALF) & (np.abs(dy) <= _SQUARE_HALF)
    return _inside_polygon(dx, dy, _TRIANGLE if shape.kind == "triangle" else _STAR)


def grow(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Binary dilation by a (2p+1)^2 square."""
    out = mask.copy()
    for _ in range(pixels):
        m = out.copy()
        m[1:] |= out[:-1]
        m[:-1] |= out[1:]
        m2 = m.copy()
        m2[:, 1:] |= m[:, :-1]
        m2[:, :-1] |= m[:, 1:]
        out = m2
    return out


def caption(scene: Scene) -> str:
    """'a red circle and a blue square on a white background' (shapes in row-major cell order)."""
    parts = [f"{_article(s.colour)} {s.colour} {s.kind}" for s in sorted(scene.shapes, key=lambda s: s.cell)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on {_article(scene.background)} {scene.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: _Rand, size: int) -> Scene:
    background = rng.choice(PALETTE)
    n = 1 + rng.below(3)
    kinds = rng.sample(KINDS, n)
    colours = rng.sample([c for c in PALETTE if c != background], n)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    shapes = tuple(Shape(k, c, cell, rng.choice(SIZES)) for k, c, cell in zip(kinds, colours, cells, strict=True))
    return Scene(background, shapes, size)


def _unused_colours(scene: Scene) -> list[str]:
    used = {scene.background} | {s.colour for s in scene.shapes}
    return [c for c in PALETTE if c not in used]


def _edit(rng: _Rand, kind: str, size: int):
    """(source scene, instruction, target scene, changed shapes (source and target), meta) or None when the drawn
    scene admits no such edit."""
    return _edit_on(rng, random_scene(rng, size), kind)


def _edit_on(rng: _Rand, src: Scene, kind: str):
    """An edit of this kind of src, its parameters drawn by rng (as _edit returns it), or None when src admits none
    (those checks draw nothing, so _edit's draws are what they were before sessions existed)."""
    if kind != "add" and kind != "background" and not src.shapes:
        return None
    if kind == "background":
        return _apply(src, kind, colour=rng.choice(_unused_colours(src)))
    if kind == "add":
        new_kinds = [k for k in KINDS if k not in {s.kind for s in src.shapes}]
        if not new_kinds or not src.free_cells() or not _unused_colours(src):
            return None
        return _apply(src, kind, rng.choice(new_kinds), rng.choice(_unused_colours(src)))
    shape = rng.choice(src.shapes)
    if kind == "recolour":
        return _apply(src, kind, shape.kind, rng.choice(_unused_colours(src)))
    if kind == "move":
        moves = _moves(src, shape)
        return _apply(src, kind, shape.kind, direction=rng.choice(moves)) if moves else None
    return _apply(src, kind, shape.kind)


def _moves(scene: Scene, shape: Shape) -> list[str]:
    """The directions in which a one-cell move of shape lands in a free cell (free cells are inside the grid)."""
    free = set(scene.free_cells())
    return [d for d, (dr, dc) in DIRECTIONS.items() if (shape.cell[0] + dr, shape.cell[1] + dc) in free]


def _apply(src: Scene, kind: str, shape_kind: str | None = None, colour: str | None = None, direction=None):
    """The edit of src that the arguments name: (src, instruction, target, changed shapes, meta)."""
    if kind == "background":
        return src, f"make the background {colour}", replace(src, background=colour), (), {"colour": colour}
    if kind == "add":
        shape = Shape(shape_kind, colour, src.free_cells()[0], "small")
        tgt = replace(src, shapes=src.shapes + (shape,))
        return src, f"add a small {shape.colour} {shape.kind}", tgt, (shape,), {"shape": asdict(shape)}
    shape = src.shape(shape_kind)
    others = tuple(s for s in src.shapes if s is not shape)
    meta = {"shape": asdict(shape)}
    if kind == "recolour":
        new = replace(shape, colour=colour)
        instruction = f"make the {shape.kind} {colour}"
        meta["colour"] = colour
    elif kind == "move":
        dr, dc = DIRECTIONS[direction]
        new = replace(shape, cell=(shape.cell[0] + dr, shape.cell[1] + dc))
        instruction = f"move the {shape.kind} {DIRECTION_WORDS[direction]}"
        meta.update(direction=direction, step=src.size // GRID)
    elif kind == "remove":
        tgt = replace(src, shapes=others)
        return src, f"remove the {shape.kind}", tgt, (shape,), meta
    else:
        raise InputError(f"unknown edit kind {kind!r}; kinds: {', '.join(EDIT_KINDS)}")
    meta["new_shape"] = asdict(new)
    tgt = replace(src, shapes=tuple(new if s is shape else s for s in src.shapes))
    return src, instruction, tgt, (shape, new), meta


def edit_of(scene: Scene, kind: str, shape: str | None = None, colour: str | None = None, direction=None):
    """The EditSample of one named edit of scene, e.g. edit_of(scene, "recolour", "circle", "red") or
    edit_of(scene, "move", "square", direction="left"); refused when the scene does not admit it."""
    if kind not in EDIT_KINDS:
        raise InputError(f"unknown edit kind {kind!r}; kinds: {', '.join(EDIT_KINDS)}")
    kinds = {s.kind for s in scene.shapes}
    if len(kinds) != len(scene.shapes):
        raise InputError("a scene of the shapes task has at most one shape of each kind")
    if kind in ("recolour", "move", "remove") and shape not in kinds:
        raise InputError(f"a {kind} edit needs a shape of the scene ({', '.join(sorted(kinds))}), got {shape!r}")
    if kind == "add" and (shape not in KINDS or shape in kinds or not scene.free_cells()):
        raise InputError(f"add needs a kind the scene lacks and a free cell, got {shape!r}")
    if kind in ("recolour", "background", "add") and colour not in _unused_colours(scene):
        raise InputError(f"{kind} needs a colour the scene does not use ({', '.join(_unused_colours(scene))})")
    if kind == "move" and direction not in _moves(scene, scene.shape(shape)):
        raise InputError(f"the {shape} can move {', '.join(_moves(scene, scene.shape(shape))) or 'nowhere'}")
    return _sample(*_apply(scene, kind, shape, colour, direction), kind)


def _sample(src: Scene, instruction: str, tgt: Scene, changed, meta: dict, kind: str) -> EditSample:
    if kind == "background":
        mask = ~src.shapes_mask()
    else:  # the changed shapes, grown by a pixel: a decoder blurs edges by about that much
        mask = grow(np.logical_or.reduce([shape_mask(s, src.size) for s in changed]))
    meta.update(source=src.to_dict(), target=tgt.to_dict())
    return EditSample(src.render(), instruction, tgt.render(), kind, mask, meta)


def _in_split(split: str, kind: str, src: Scene, tgt: Scene, changed) -> bool:
    """train: no held-out pair anywhere; heldout: the edited shape (before or after) is a held-out pair, or, for a
    background edit or a caption, some shape is."""
    if split == "train":
        return not ((src.pairs() | tgt.pairs()) & HELDOUT_PAIRS)
    if kind in ("background", GEN_KIND):
        return bool(tgt.pairs() & HELDOUT_PAIRS)
    return any((s.colour, s.kind) in HELDOUT_PAIRS for s in changed)


def _check_split(split):
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")


def edit_sample(split: str, kind: str, seed: int = 0, index: int = 0, size: int = 64) -> EditSample:
    """The edit of this kind that (split, seed, index) draws; deterministic."""
    _check_split(split)
    check_size(size)
    if kind not in EDIT_KINDS:
        raise InputError(f"unknown edit kind {kind!r}; kinds: {', '.join(EDIT_KINDS)}")
    rng = _Rand(SPLITS.index(split), EDIT_KINDS.index(kind), seed, index)
    for _ in range(MAX_TRIES):
        drawn = _edit(rng, kind, size)
        if drawn is not None and _in_split(split, kind, drawn[0], drawn[2], drawn[3]):
            break
    else:  # pragma: no cover - each try succeeds with probability > 1/20
        raise RuntimeError(f"no {kind} edit for split {split} in {MAX_TRIES} tries")
    src, instruction, tgt, changed, meta = drawn
    meta.update(split=split, seed=seed, index=index)
    return _sample(src, instruction, tgt, changed, meta, kind)


def session(split: str, kinds: tuple[str, ...], seed: int = 0, index: int = 0, size: int = 64) -> list[EditSample]:
    """A multi-turn editing session, one EditSample per kind: turn 1 is edit_sample(split, kinds[0], seed, index);
    each later turn is an edit of its kind of the exact scene the turns before it leave, its parameters drawn by
    (split, turn, seed, index) (redrawn while the scene admits none). Later turns need not touch a held-out pair;
    the session starts in the split and goes where its edits take it, as a user's does."""
    _check_split(split)
    samples = [edit_sample(split, kinds[0], seed, index, size)]
    for turn, kind in enumerate(kinds[1:], 2):
        if kind not in EDIT_KINDS:
            raise InputError(f"unknown edit kind {kind!r}; kinds: {', '.join(EDIT_KINDS)}")
        scene = Scene.from_dict(samples[-1].meta["target"])
        rng = _Rand(SPLITS.index(split), len(EDIT_KINDS) + turn, seed, index)
        for _ in range(MAX_TRIES):
            drawn = _edit_on(rng, scene, kind)
            if drawn is not None:
                break
        else:
            raise InputError(f"turn {turn}: the scene the turns before it leave admits no {kind} edit")
        src, instruction, tgt, changed, meta = drawn
        meta.update(split=split, seed=seed, index=index, turn=turn)
        samples.append(_sample(src, instruction, tgt, changed, meta, kind))
    return samples


def gen_sample(split: str, seed: int = 0, index: int = 0, size: int = 64) -> GenSample:
    _check_split(split)
    check_size(size)
    rng = _Rand(SPLITS.index(split), len(EDIT_KINDS), seed, index)
    for _ in range(MAX_TRIES):
        scene = random_scene(rng, size)
        if _in_split(split, GEN_KIND, scene, scene, ()):
            break
    else:  # pragma: no cover
        raise RuntimeError(f"no caption for split {split} in {MAX_TRIES} tries")
    meta = {"split": split, "seed": seed, "index": index, "target": scene.to_dict()}
    return GenSample(caption(scene), scene.render(), meta)


def dataset(
    split: str = "train", n: int = 100, seed: int = 0, size: int = 64, kinds=(*EDIT_KINDS, GEN_KIND), start: int = 0
) -> Iterator[EditSample | GenSample]:
    """n samples of the split, from sample `start` on; sample i has kind kinds[i % len(kinds)] and depends only on
    (split, seed, i)."""
    _check_split(split)
    check_size(size)
    for name, value in (("n", n), ("start", start)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in (*EDIT_KINDS, GEN_KIND)]
    if not kinds or unknown:
        raise InputError(f"kinds must be a non-empty subset of {(*EDIT_KINDS, GEN_KIND)}, got {kinds!r}")
    for i in range(start, start + n):
        kind = kinds[i % len(kinds)]
        yield gen_sample(split, seed, i, size) if kind == GEN_KIND else edit_sample(split, kind, seed, i, size)


def sample_range(split: str, kinds: tuple, seed: int, size: int, start: int, n: int) -> list:
    """dataset(...) samples start..start+n-1 as a list: a function worker processes can run by name."""
    return list(dataset(split, n, seed, size, kinds, start))
