"""The runtime's MMDiT and VAE against diffusers on the same weights, fp32 on the CPU."""

import copy

import pytest
import torch

from kontext_rt.image import pack, unpack
from kontext_rt.model.rope import image_ids, rope_table, sequence_ids
from kontext_rt.weights.formats import detect
from tests.float64_reference import assert_float32_close

# Bound (habit 7, tests/float64_reference.py): the runtime in float32 within twice diffusers' own float32 error of
# diffusers in float64, and within three times that error of diffusers in float32. Measured: diffusers' float32
# error ~2.2e-7 (forward; the runtime 0 to 6e-8 from diffusers' float32 result) and 1.3e-6 to 3.5e-6 (VAE, the
# runtime 0.98x to 1.04x of it). The VAE's reference is fed channels-last, as diffusers' pipeline feeds it images
# and as the runtime's VAE runs on the CPU (model/vae.py): fed NCHW, diffusers' float32 rounds another way, and the
# runtime measured 0.95x to 2.4x of that error (sizes 48x80 to 88x152), a yardstick of the layout, not of the model.


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def models(kontext_dir):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    layout = detect(kontext_dir)
    ours = layout.load_transformer(torch.float32, "cpu"), layout.load_vae(torch.float32, "cpu")
    ref = (
        FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer").eval(),
        AutoencoderKL.from_pretrained(kontext_dir / "vae").eval(),
    )
    return ours, ref


@pytest.fixture(scope="module")
def models64(models):
    _, (ref, vae) = models
    return copy.deepcopy(ref).double(), copy.deepcopy(vae).double()


def _inputs(cfg, batch, text, grids, gen):
    n = grids[0][0] * grids[0][1]
    m = sum(r * c for r, c in grids[1:])
    img = torch.randn(batch, n, cfg.in_channels, generator=gen)
    ctx = torch.randn(batch, m, cfg.in_channels, generator=gen) if m else None
    txt = torch.randn(batch, text, cfg.context_in_dim, generator=gen)
    pooled = torch.randn(batch, cfg.vec_in_dim, generator=gen)
    t = torch.rand(batch, generator=gen)
    return img, ctx, txt, pooled, t


@pytest.mark.parametrize(
    "text,grids",
    [
        (7, [(3, 5), (2, 4)]),  # Kontext: target + one context image of another size
        (5, [(3, 5), (3, 5), (2, 3)]),  # two context images
        (9, [(4, 6)]),  # text-to-image, no context tokens
    ],
)
@torch.no_grad()
def test_transformer_matches_diffusers(models, models64, text, grids):
    (model, _), (ref, _) = models
    gen = torch.Generator().manual_seed(len(grids) * 10 + text)
    img, ctx, txt, pooled, t = _inputs(model.cfg, 2, text, grids, gen)
    guidance = torch.tensor([2.5, 4.0])
    ids = sequence_ids(text, grids)
    cos, sin = rope_table(ids, model.cfg.axes_dim, model.cfg.theta)
    out = model(img, ctx, txt, pooled, t, guidance, cos, sin)
    hidden = img if ctx is None else torch.cat([img, ctx], 1)
    want = ref(
        hidden_states=hidden,
        encoder_hidden_states=txt,
        pooled_projections=pooled,
        timestep=t,
        img_ids=ids[text:],
        txt_ids=ids[:text],
        guidance=guidance,
        return_dict=False,
    )[0][:, : img.shape[1]]
    want64 = models64[0](
        hidden_states=hidden.double(),
        encoder_hidden_states=txt.double(),
        pooled_projections=pooled.double(),
        timestep=t.double(),
        img_ids=ids[text:],
        txt_ids=ids[:text],
        guidance=guidance.double(),
        return_dict=False,
    )[0][:, : img.shape[1]]
    assert out.shape == want.shape
    assert_float32_close(out, want, want64, f"forward {text} {grids}")


@torch.no_grad()
def test_schnell_transformer_without_guidance(schnell_dir):
    from diffusers import FluxTransformer2DModel

    model = detect(schnell_dir).load_transformer(torch.float32, "cpu")
    assert model.guidance_in is None
    ref = FluxTransformer2DModel.from_pretrained(schnell_dir / "transformer").eval()
    gen = torch.Generator().manual_seed(3)
    img, _, txt, pooled, t = _inputs(model.cfg, 1, 6, [(2, 3)], gen)
    ids = sequence_ids(6, [(2, 3)])
    cos, sin = rope_table(ids, model.cfg.axes_dim, model.cfg.theta)
    out = model(img, None, txt, pooled, t, None, cos, sin)
    want = ref(
        hidden_states=img,
        encoder_hidden_states=txt,
        pooled_projections=pooled,
        timestep=t,
        img_ids=ids[6:],
        txt_ids=ids[:6],
        return_dict=False,
    )[0]
    want64 = ref.double()(
        hidden_states=img.double(),
        encoder_hidden_states=txt.double(),
        pooled_projections=pooled.double(),
        timestep=t.double(),
        img_ids=ids[6:],
        txt_ids=ids[:6],
        return_dict=False,
    )[0]
    assert_float32_close(out, want, want64, "schnell forward")


@pytest.mark.parametrize("hw", [(48, 80), (64, 32), (88, 152)])
@torch.no_grad()
def test_vae_matches_diffusers(models, models64, hw):
    (_, vae), (_, ref) = models
    ref64 = models64[1]
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(x)
    cfg = ref.config
    channels_last = torch.channels_last
    z_ref = (
        ref.encode(x.contiguous(memory_format=channels_last)).latent_dist.mode() - cfg.shift_factor
    ) * cfg.scaling_factor
    z_ref64 = (ref64.encode(x.double()).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor
    assert z.shape == (1, 16, hw[0] // 8, hw[1] // 8)
    assert_float32_close(z, z_ref, z_ref64, f"VAE encode {hw}")
    y_ref = ref.decode((z_ref / cfg.scaling_factor + cfg.shift_factor).contiguous(memory_format=channels_last)).sample
    y_ref64 = ref64.decode(z_ref.double() / cfg.scaling_factor + cfg.shift_factor).sample
    assert_float32_close(vae.decode(z_ref), y_ref, y_ref64, f"VAE decode {hw}")


def test_rope_table_matches_diffusers():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = sequence_ids(4, [(3, 5), (2, 2), (1, 3)])
    cos, sin = rope_table(ids, (4, 14, 14), 10_000)
    cos_ref, sin_ref = FluxPosEmbed(theta=10_000, axes_dim=(4, 14, 14))(ids)
    # diffusers repeats each pair's value twice (interleaved); the runtime keeps one per pair
    torch.testing.assert_close(cos, cos_ref[:, 0::2], rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_ref[:, 1::2], rtol=0, atol=0)
    axis0 = ids[:, 0].tolist()
    assert axis0 == [0.0] * (4 + 15) + [1.0] * 4 + [2.0] * 3  # text, target (0), context 1, context 2


def test_ids_and_packing_match_diffusers():
    from diffusers import FluxKontextPipeline

    ref_ids = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    torch.testing.assert_close(image_ids(3, 5), ref_ids, rtol=0, atol=0)
    z = torch.randn(2, 16, 6, 10)
    packed = pack(z)
    torch.testing.assert_close(packed, FluxKontextPipeline._pack_latents(z, 2, 16, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack(packed, 3, 5), z, rtol=0, atol=0)
