"""This runtime vs diffusers on the same weights, in the same run (CPU here; any device that torch has).

    python -m pytest benchmarks/bench_pipeline.py --benchmark-only --benchmark-group-by=group \
        --benchmark-json=benchmarks/results/cpu-pipeline.json

Groups: `forward` (one transformer call, a Kontext layout of text + target + context tokens, width 256) and
`edit` (a whole tiny edit: text encode, VAE encode, 4 steps, VAE decode; the text cache is off so both sides
encode the prompt every time). pytest-benchmark reports each; compare the two rows of a group.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kontext_rt import Pipeline  # noqa: E402
from kontext_rt.checkpoint import DiffusersFolder  # noqa: E402
from kontext_rt.rope import rope_table, sequence_ids  # noqa: E402

from tests import builders  # noqa: E402

TEXT, GRID = 64, (16, 16)  # 64 text + 256 target + 256 context tokens
H, W, STEPS = 48, 80, 4


@pytest.fixture(scope="module")
def forward_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fwd")
    ref = builders.diffusers_transformer(True, torch.Generator().manual_seed(0), attention_head_dim=64,
                                         num_attention_heads=4, axes_dims_rope=(8, 28, 28), num_single_layers=4)
    ref.save_pretrained(folder / "transformer")
    ours = DiffusersFolder(folder, None).load_transformer(torch.float32, "cpu")
    return ours, ref


@pytest.fixture(scope="module")
def forward_inputs(forward_models):
    cfg = forward_models[0].cfg
    g = torch.Generator().manual_seed(0)
    n = GRID[0] * GRID[1]
    img, ctx = torch.randn(1, n, 64, generator=g), torch.randn(1, n, 64, generator=g)
    txt, pooled = torch.randn(1, TEXT, cfg.context_in_dim, generator=g), torch.randn(1, cfg.vec_in_dim, generator=g)
    ids = sequence_ids(TEXT, [GRID, GRID])
    return img, ctx, txt, pooled, torch.tensor([0.5]), torch.tensor([2.5]), ids


@pytest.mark.benchmark(group="forward")
@pytest.mark.parametrize("impl", ["kontext-rt", "diffusers"])
def test_forward(benchmark, forward_models, forward_inputs, impl):
    ours, ref = forward_models
    img, ctx, txt, pooled, t, g, ids = forward_inputs
    if impl == "kontext-rt":
        def step():
            cos, sin = rope_table(ids, ours.cfg.axes_dim, ours.cfg.theta)
            return ours(img, ctx, txt, pooled, t, g, cos, sin)
    else:
        def step():
            out = ref(hidden_states=torch.cat([img, ctx], 1), encoder_hidden_states=txt, pooled_projections=pooled,
                      timestep=t, img_ids=ids[TEXT:], txt_ids=ids[:TEXT], guidance=g, return_dict=False)[0]
            return out[:, : img.shape[1]]
    with torch.inference_mode():
        out = benchmark(step)
    assert out.shape == img.shape


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return builders.diffusers_checkpoint(tmp_path_factory.mktemp("edit"), guidance=True)


@pytest.mark.benchmark(group="edit")
@pytest.mark.parametrize("impl", ["kontext-rt", "diffusers"])
def test_edit(benchmark, tiny_checkpoint, impl):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    lat = torch.randn(1, (H // 16) * (W // 16), 64, generator=torch.Generator().manual_seed(0))
    if impl == "kontext-rt":
        pipe = Pipeline.from_pretrained(tiny_checkpoint, text_cache_size=0)
        run = lambda: pipe.edit(img, "make it red", steps=STEPS, auto_resize=False, latents=lat)  # noqa: E731
    else:
        from diffusers import FluxKontextPipeline

        ref = FluxKontextPipeline.from_pretrained(tiny_checkpoint, local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        run = lambda: ref(image=img, prompt="make it red", num_inference_steps=STEPS, guidance_scale=2.5,  # noqa: E731
                          latents=lat, max_area=H * W, _auto_resize=False, height=H, width=W).images[0]
    out = benchmark(run)
    assert out.size == (W, H)
