"""Tiled VAE encode/decode (kontext_rt.model.vae_tiling) against diffusers' tiled AutoencoderKL on the same weights.

Tiles are small (32 to 96 px) on the tiny VAE, and the images are not multiples of the tile, so the last tiles are
cut by the edge (down to one latent pixel) and blend over fewer rows than the overlap.

diffusers is fed channels-last tensors, so its float32 convolutions take the NHWC path the runtime's VAE takes on
the CPU (model/vae.py, _conv_layout), as diffusers' own pipeline does for images (its image processor's arrays are
HWC). Its float32 error in NCHW is another rounding, measured up to 2x smaller at these sizes: a yardstick of the
layout, not of the tiling. The float64 reference is the same either way.
"""

import copy
from dataclasses import replace

import pytest
import torch

from kontext_rt.config import VAE_PRESETS
from kontext_rt.errors import InputError
from kontext_rt.model.vae_tiling import TiledVAE, tile_shape, tiled_decode, tiled_encode, tilings
from kontext_rt.weights.formats import DiffusersFolder
from tests import builders
from tests.float64_reference import assert_float32_close, float32_noise

# (height, width), batch, tile px, overlap
CASES = [
    ((72, 104), 1, 32, 0.25),  # 3 x 5 tiles, the last column 8 px (one latent pixel)
    ((32, 56), 2, 32, 0.25),  # height = tile but > the 24 px stride: diffusers runs a second, 8 px row of tiles
    ((136, 88), 1, 64, 0.125),  # another tile and overlap: 3 x 2 tiles, one latent pixel blended
    ((48, 40), 1, 32, 0.0),  # no overlap: tiles side by side, nothing blended
    # blends of 3 latent / 24 px (weights k/3, k/24: not exact in any float), and last tiles thinner than the blend
    # (one or two latent px), so the extent is clipped to the tile
    ((88, 152), 1, 96, 0.25),
]


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """(ours, diffusers float32, diffusers float64): the runtime's VAE loaded from diffusers' saved folder."""
    with torch.random.fork_rng():
        torch.manual_seed(7)  # diffusers initializes its weights from the global generator
        ref = builders.diffusers_vae(torch.Generator().manual_seed(7))
    folder = tmp_path_factory.mktemp("tiled")
    ref.save_pretrained(folder / "vae")
    ours = DiffusersFolder(folder, None).load_vae(torch.float32, "cpu")
    return ours, ref, copy.deepcopy(ref).double()


def _tiling(ref, tile, overlap, on=True):
    """diffusers' tiling set as TiledVAE's: the sample tile, its latent tile and the overlap factor."""
    ref.use_tiling = on
    ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = tile, tile // 8, overlap
    return ref


def _nhwc(t, dtype):
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


def _ref_encode(ref, x, tile, overlap, tiled):
    c = _tiling(ref, tile, overlap, tiled).config
    return (ref.encode(_nhwc(x, ref.dtype)).latent_dist.mode() - c.shift_factor) * c.scaling_factor


def _ref_decode(ref, z, tile, overlap, tiled):
    c = _tiling(ref, tile, overlap, tiled).config
    return ref.decode(_nhwc(z / c.scaling_factor + c.shift_factor, ref.dtype)).sample


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-b{c[1]}-t{c[2]}-o{c[3]}")
@torch.no_grad()
def case(request, vaes):
    """Everything one case compares, computed once: ours and diffusers' (float32 and float64) results, tiled and
    untiled, for encode and decode (decode of diffusers' float32 untiled latent)."""
    ours, ref, ref64 = vaes
    hw, batch, tile, overlap = request.param
    x = torch.rand(batch, 3, *hw, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = _ref_encode(ref, x, tile, overlap, tiled=False)
    out = {"tile": tile, "overlap": overlap, "hw": hw, "batch": batch}
    for op, inp, ours_fn, ref_fn in (
        ("encode", x, tiled_encode, _ref_encode),
        ("decode", z, tiled_decode, _ref_decode),
    ):
        out[op] = {
            "ours": ours_fn(ours, inp, tile, overlap),
            "ours_plain": getattr(ours, op)(inp),
            **{f"ref{k}": ref_fn(m, inp, tile, overlap, tiled=True) for k, m in (("32", ref), ("64", ref64))},
            **{f"ref{k}_plain": ref_fn(m, inp, tile, overlap, tiled=False) for k, m in (("32", ref), ("64", ref64))},
        }
    return out


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_tiled_matches_diffusers_tiled(case, op):
    """Ours tiled against diffusers tiled: the float32 parity bound of test_model_parity (twice diffusers' float32
    error of its float64 result)."""
    r = case[op]
    (h, w), b = case["hw"], case["batch"]
    want = (b, 16, h // 8, w // 8) if op == "encode" else (b, 3, h, w)
    assert r["ours"].shape == r["ref32"].shape == want
    assert_float32_close(r["ours"], r["ref32"], r["ref64"], f"tiled {op} {case['hw']}")


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_tiled_vs_untiled_bound(case, op):
    """The stated bound (module docstring): ours differs from our untiled result by diffusers' own tiled-untiled
    difference D (max abs), within the float32 slack the parity bounds allow.

    With e_t = ours_tiled - ref_tiled and e_u = ours_untiled - ref_untiled (diffusers float32), the triangle
    inequality gives | max|ours_t - ours_u| - D | <= max|e_t| + max|e_u|, and max|e| <= ||e||_F <= 3 x noise x
    ||ref||_F where the parity tests hold (noise: diffusers' float32 error of its float64 result, relative). So
    K = 1 + slack / D. Two-sided: a tiled path silently running untiled (difference 0) fails too."""
    r = case[op]
    slack = 0.0
    for kind in ("", "_plain"):
        noise = float32_noise(r["ref32" + kind], r["ref64" + kind])
        assert_float32_close(r["ours" + kind], r["ref32" + kind], r["ref64" + kind], f"{op}{kind} {case['hw']}")
        slack += 3 * noise * r["ref32" + kind].double().norm().item()
    d_ref = (r["ref32"] - r["ref32_plain"]).abs().max().item()
    d_ours = (r["ours"] - r["ours_plain"]).abs().max().item()
    assert d_ref > 0, "diffusers' tiled result equals its untiled one: the case tiles nothing"
    assert abs(d_ours - d_ref) <= slack, (
        f"{op} {case['hw']}: max |tiled - untiled| {d_ours:.4g}, diffusers' {d_ref:.4g}, allowed +- {slack:.3g} "
        f"(K = 1 + {slack / d_ref:.2g})"
    )


class _DiffusersAsAutoEncoder:
    """diffusers' own encoder and decoder behind the AutoEncoder interface, unscaled (scale 1, shift 0: exact), so
    tiled_encode/tiled_decode around them must reproduce diffusers' tiled result bit for bit."""

    def __init__(self, ref):
        self.ref = ref
        self.cfg = replace(VAE_PRESETS["tiny"], scale_factor=1.0, shift_factor=0.0)

    def encode(self, x):
        return self.ref.encoder(x).chunk(2, 1)[0]

    def decode(self, z):
        return self.ref.decoder(z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("hw,tile,overlap", [((72, 104), 32, 0.25), ((88, 152), 96, 0.25)])
@torch.no_grad()
def test_tiling_arithmetic_bit_for_bit(vaes, dtype, hw, tile, overlap):
    """The tiling itself (tile starts, blend weights and order, crops) with the network rounding taken out:
    diffusers' encoder and decoder tiled by this module equal diffusers' tiled encode and decode exactly.

    Both sides run torch's own convolutions, not oneDNN's: in bfloat16 oneDNN reads past a 3-column input to
    diffusers' stride-2 downsampler (an 8 px last tile) and returns NaN at random (the runtime's VAE avoids it:
    test_a_one_column_bfloat16_downsample_is_right_every_time), which would make either side differ by chance."""
    ref = _tiling(copy.deepcopy(vaes[1]).to(dtype), tile, overlap)
    x = (torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(5)) * 2 - 1).to(dtype)
    z = torch.randn(1, 16, hw[0] // 8, hw[1] // 8, generator=torch.Generator().manual_seed(6)).to(dtype)
    adapter = _DiffusersAsAutoEncoder(ref)
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(tiled_encode(adapter, x, tile, overlap), ref._tiled_encode(x).chunk(2, 1)[0])
        assert torch.equal(tiled_decode(adapter, z, tile, overlap), ref.tiled_decode(z, return_dict=False)[0])


@torch.no_grad()
def test_a_one_column_bfloat16_downsample_is_right_every_time():
    """The runtime's stride-2 downsampler on a 2-column bfloat16 input (a tile or image 8 px wide), run again and
    again with NaN-filled memory freed before each run (torch 2.13's oneDNN convolution read past such an input:
    NaN in about 290 of 300 runs, seen here). Each result is finite, the same every time, and within bfloat16's
    rounding (one unit in the last place, 2**-8 relative) plus float32 accumulation of the float64 result."""
    from kontext_rt.model.vae import Downsample

    gen = torch.Generator().manual_seed(0)
    down = Downsample(16)
    for p in down.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    down = down.to(torch.bfloat16)
    x = torch.randn(1, 16, 22, 2, generator=gen).to(torch.bfloat16)
    exact = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x.double(), (0, 1, 0, 1)), down.conv.weight.double(), down.conv.bias.double(), stride=2
    )
    results = set()
    for _ in range(100):
        junk = [torch.full((n,), float("nan"), dtype=torch.bfloat16) for n in (64, 256, 1024, 4096, 16384)]
        del junk
        y = down(x)
        assert y.shape == exact.shape and torch.isfinite(y).all()
        results.add(y.float().numpy().tobytes())
    assert len(results) == 1
    scale = exact.abs().max()
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + scale * 2**-16).all()


@pytest.mark.parametrize("hw,batch", [((64, 64), 2), ((48, 32), 1), ((8, 64), 1)])
@torch.no_grad()
def test_within_one_tile_is_the_plain_vae(vaes, hw, batch):
    """An image no larger than one tile (here a 64 px tile, edges included) is the AutoEncoder's result bit for
    bit, through the functions and through TiledVAE (default 1024 px tile).

    (Not a 32 px tile with overlap 0.25: its blend is one row, whose weight 0 copies the previous tile's row, so a
    32 px image tiled in two is the plain result anyway.)"""
    ours = vaes[0]
    x = torch.rand(batch, 3, *hw, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = ours.encode(x)
    assert torch.equal(tiled_encode(ours, x, 64, 0.25), z)
    assert torch.equal(tiled_decode(ours, z, 64, 0.25), ours.decode(z))
    tiled = TiledVAE(ours)
    assert tiled.cfg is ours.cfg
    assert torch.equal(tiled.encode(x), z) and torch.equal(tiled.decode(z), ours.decode(z))


@pytest.mark.parametrize("hw,tile", [((72, 104), 32), ((32, 56), 32), ((136, 88), 64), ((88, 152), 96), ((24, 16), 32)])
@torch.no_grad()
def test_tile_shape_is_the_largest_call(vaes, hw, tile):
    """tile_shape is the largest image one encoder call reads and one decoder call writes (watched, not assumed)."""
    ours = vaes[0]
    seen = {"encode": [], "decode": []}

    class Spy:
        cfg = ours.cfg

        def encode(self, x):
            seen["encode"].append((x.shape[3], x.shape[2]))
            return ours.encode(x)

        def decode(self, z):
            y = ours.decode(z)
            seen["decode"].append((y.shape[3], y.shape[2]))
            return y

    vae = TiledVAE(Spy(), tile=tile)
    vae.decode(vae.encode(torch.zeros(1, 3, *hw)))
    want = tile_shape(hw[1], hw[0], tile)
    assert vae.tile_shape(hw[1], hw[0]) == want
    for op, shapes in seen.items():
        assert max(shapes, key=lambda s: s[0] * s[1]) == want, f"{op}: calls at {shapes}"


def test_bad_arguments_are_refused(vaes):
    ours = vaes[0]
    x = torch.zeros(1, 3, 64, 64)
    for tile in (0, -32, 4, 12, 32.0, True, None):
        with pytest.raises(InputError, match="positive multiple of the VAE's downscale"):
            TiledVAE(ours, tile=tile)
        with pytest.raises(InputError, match="positive multiple of the VAE's downscale"):
            tiled_encode(ours, x, tile)
    for overlap in (-0.1, 0.5, 0.75, "0.25", None):
        with pytest.raises(InputError, match="overlap"):
            TiledVAE(ours, tile=32, overlap=overlap)
        with pytest.raises(InputError, match="overlap"):
            tiled_decode(ours, torch.zeros(1, 16, 8, 8), 32, overlap)
    # 48 px * 0.25 = 12 px, not whole latent pixels: diffusers would return a latent of the wrong size
    with pytest.raises(InputError, match="not a whole number of latent pixels"):
        tilings(48, 0.25, 8)
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        tiled_encode(ours, torch.zeros(3, 64, 64), 32)
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        tiled_encode(ours, torch.zeros(1, 4, 64, 64), 32)
    with pytest.raises(InputError, match="multiples of the VAE.s downscale"):
        tiled_encode(ours, torch.zeros(1, 3, 68, 64), 32)
    with pytest.raises(InputError, match=r"\(B, 16, H, W\)"):
        tiled_decode(ours, torch.zeros(1, 3, 8, 8), 32)
    for w, h, tile in ((0, 64, 32), (64, -8, 32), (64, 64, 0), (64.0, 64, 32)):
        with pytest.raises(InputError):
            tile_shape(w, h, tile)


# ---- the pipeline's use of it: vae_tiling=True / False / "auto", the memory plan's tiled transient ----------------


def _picture(w, h, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiled_pipes(kontext_dir):
    from kontext_rt.pipeline import Pipeline

    return {mode: Pipeline.from_pretrained(kontext_dir, vae_tiling=mode, vae_tile=32) for mode in (True, False, "auto")}


def _edit(pipe, output="pil"):
    return pipe.edit(_picture(64, 48), "x", steps=1, seed=2, auto_resize=False, output=output)


def test_pipeline_tiles_encode_and_decode_when_asked(tiled_pipes):
    import numpy as np

    from kontext_rt import image as im

    on, off = tiled_pipes[True], tiled_pipes[False]
    latent = _edit(on, "latent")  # its context went through the tiled encoder
    want = im.to_pil(TiledVAE(on.vae, 32).decode(im.unpack(latent, 3, 4)))[0]
    assert np.array_equal(np.asarray(_edit(on)), np.asarray(want))
    assert not torch.equal(latent, _edit(off, "latent"))  # the tiled encode changed the context


def test_auto_tiles_only_when_the_device_would_not_fit_the_untiled_call(tiled_pipes, monkeypatch):
    import numpy as np

    pipe = tiled_pipes["auto"]
    auto = pipe._vae_runner
    results = {}
    for free, name in ((None, "cpu"), (1, "tight"), (10**15, "roomy")):
        monkeypatch.setattr(auto, "budget", free)  # as measured after loading
        monkeypatch.setattr(auto, "decisions", {})
        results[name] = np.asarray(_edit(pipe))
        if free is not None:  # decided once per size: another budget later changes nothing
            monkeypatch.setattr(auto, "budget", 10**15 if free == 1 else 1)
            assert np.array_equal(np.asarray(_edit(pipe)), results[name])
    assert np.array_equal(results["tight"], np.asarray(_edit(tiled_pipes[True])))
    assert np.array_equal(results["roomy"], np.asarray(_edit(tiled_pipes[False])))
    assert np.array_equal(results["cpu"], results["roomy"])


def test_a_staged_vae_visits_the_device_once_for_all_its_tiles(kontext_dir):
    from kontext_rt.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(kontext_dir, vae_tiling=True, vae_tile=32, placement="vae=staged")
    copies = []
    tensors = pipe.vae.staged.tensors
    original = tensors.copy_to_device
    tensors.copy_to_device = lambda: copies.append(1) or original()
    _edit(pipe)
    assert len(copies) == 2  # one encode (6 tiles) and one decode (6 tiles)


@pytest.mark.parametrize("kw, match", [({"vae_tiling": "yes"}, "vae_tiling"), ({"vae_tile": 100}, "tile")])
def test_bad_tiling_options_are_refused_before_any_weights(kontext_dir, monkeypatch, kw, match):
    from kontext_rt.pipeline import Pipeline
    from kontext_rt.weights.formats import CheckpointFormat

    monkeypatch.setattr(CheckpointFormat, "load_transformer", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(InputError, match=match):
        Pipeline.from_pretrained(kontext_dir, **kw)


def test_the_plan_traces_one_tile_when_the_vae_may_tile():
    """A 2048 px plan with 1024 px tiles needs the VAE transient of a 1024 px image, traced on its own."""
    from kontext_rt import memory
    from kontext_rt.config import PRESETS

    cfg, vae_cfg = PRESETS["flux-kontext-dev"], VAE_PRESETS["flux"]

    def plan(size, tile):
        tokens = (size // 16) ** 2
        return memory.plan(cfg, vae_cfg, torch.bfloat16, False, 8, tokens, tokens, size, size, vae_tile=tile)

    big, small = plan(2048, 1024), plan(1024, None)
    assert big.vae_tiled_transient == small.vae_transient < big.vae_transient
    assert big.vae_stage_transient == small.vae_transient
    assert plan(2048, None).vae_tiled_transient is None and plan(1024, 1024).vae_tiled_transient is None


def test_the_load_plan_counts_on_tiles_only_when_the_vae_may_tile(kontext_dir, monkeypatch):
    """from_pretrained's plan at plan_size: with vae_tiling auto (or True) a budget between the tiled and untiled
    VAE stages is enough; with False it is refused before any weights."""
    from kontext_rt import load_checks
    from kontext_rt.errors import OutOfMemoryPlan
    from kontext_rt.pipeline import Pipeline

    plans = []
    original = load_checks.memory_plan
    monkeypatch.setattr(load_checks, "memory_plan", lambda *a: plans.append(original(*a)) or plans[-1])
    with pytest.raises(OutOfMemoryPlan):
        Pipeline.from_pretrained(kontext_dir, plan_size=(256, 256), vae_tile=64, max_memory=1)
    tiled = plans[-1]
    assert tiled.vae_tiled_transient is not None and tiled.vae_tiled_transient < tiled.vae_transient
    untiled_budget = type(tiled)(**{**tiled.__dict__, "vae_tiled_transient": None}).budget
    assert tiled.budget < untiled_budget
    kw = dict(plan_size=(256, 256), vae_tile=64, max_memory=tiled.budget)
    assert Pipeline.from_pretrained(kontext_dir, **kw) is not None
    with pytest.raises(OutOfMemoryPlan):
        Pipeline.from_pretrained(kontext_dir, vae_tiling=False, **kw)
