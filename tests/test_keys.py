"""Full size without the memory: presets on the meta device, and every real checkpoint key mapped 1:1.

The real key sets come from diffusers (its model classes on the meta device, and its own BFL/LDM converters), so
a real checkpoint cannot surprise the loaders.
"""

import pytest
import torch

from kontext_rt.config import PRESETS, VAE_PRESETS
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_rt.weights.configs import bfl_transformer_config, bfl_vae_config
from kontext_rt.weights.mapping import diffusers_transformer_rules, diffusers_vae_rules


def meta_shapes(factory):
    with torch.device("meta"):
        module = factory()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}, module


def meta_state(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize(
    "preset,params,bfl,diff",
    [
        ("flux-kontext-dev", 11_901_408_320, 780, 1160),
        ("flux-dev", 11_901_408_320, 780, 1160),
        ("flux-schnell", 11_891_178_560, 776, 1156),
    ],
)
def test_full_transformer_keys(preset, params, bfl, diff):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = PRESETS[preset]
    ours, module = meta_shapes(lambda: FluxTransformer(cfg))
    assert sum(p.numel() for p in module.parameters()) == params
    assert len(ours) == bfl
    ref_shapes, _ = meta_shapes(lambda: FluxTransformer2DModel(guidance_embeds=cfg.guidance_embed))
    assert len(ref_shapes) == diff

    # diffusers -> runtime: every diffusers tensor is used exactly once, with the shape the rule expects
    rules = diffusers_transformer_rules(ours)
    used = [s for r in rules for s in r.sources]
    assert sorted(used) == sorted(ref_shapes)
    for r in rules:
        assert [ref_shapes[s] for s in r.sources] == r.source_shapes(ours[r.target])

    # BFL: the runtime's own names are the BFL key set; diffusers' converter must turn them into its model's keys
    converted = convert_flux_transformer_checkpoint_to_diffusers(meta_state(ours))
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes
    assert bfl_transformer_config(ours, "meta") == cfg


def test_full_vae_keys():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = VAE_PRESETS["flux"]
    ours, module = meta_shapes(lambda: AutoEncoder(cfg))
    assert sum(p.numel() for p in module.parameters()) == 83_819_683
    assert len(ours) == 244
    ref_shapes, ref = meta_shapes(
        lambda: AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=16,
            norm_num_groups=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    )
    rules = diffusers_vae_rules(ours, len(cfg.ch_mult))
    assert sorted(s for r in rules for s in r.sources) == sorted(ref_shapes)
    for r in rules:
        assert [ref_shapes[s] for s in r.sources] == r.source_shapes(ours[r.target])
    converted = convert_ldm_vae_checkpoint(meta_state(ours), dict(ref.config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes
    assert bfl_vae_config(ours, "meta") == cfg
