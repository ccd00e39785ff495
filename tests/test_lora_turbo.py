"""The few-step LoRAs people run on Kontext, FLUX.1-Turbo-Alpha (strength 1) and Hyper-FLUX.1-dev-8steps-lora
(scale 0.125), in their layout: diffusers/PEFT keys `transformer.<module>.lora_A/lora_B.weight` on every attention,
feed-forward and modulation linear of both block kinds, norm1_context.linear included (test_lora.py's file leaves it
out). Compared on 8-step edits, not on weights: a LoRA fused at the wrong strength, on the wrong rows or not at all
shows in what the sampler makes of it.

References: diffusers' FluxKontextPipeline with load_lora_weights + fuse_lora(lora_scale=S), in float32 and in
float64 (tests/float64_reference.py's float64 pipeline and Euler state; PEFT fuses in the model's dtype there).
Tolerance (habit 7): assert_float32_close, the runtime within twice diffusers' own float32 error of the float64
edit. The LoRA must move the edit (against the runtime's own edit without it) by far more than that bound (EFFECT
x it), so the comparison can tell; and it must move every linear weight of every block, none else. Breaking the
fusion on purpose (strength ignored, alpha ignored, norm1_context's rows swapped or its name dropped) fails here.
"""

import pytest
import torch
from safetensors.torch import save_file

from kontext_rt import Pipeline
from tests.float64_reference import assert_float32_close, float32_noise, float64_pipeline, kontext_call, rel_err
from tests.test_pipeline_reference import picture

RANK = 4
H, W = 32, 48  # the edit's size: 2 x 3 target tokens
STEPS, GUIDANCE, TEXT_TOKENS = 8, 2.5, 8  # the turbo LoRAs' recipe; 8 text tokens keep the runs cheap
EFFECT = 1000  # the LoRA moves the edit by at least this many times the comparison's bound (measured: 2e4-2e5)
# the diffusers linears a turbo LoRA targets in each block kind (module names without the block prefix)
DOUBLE = {
    *("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"),
    *("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    *("norm1.linear", "norm1_context.linear"),
}
SINGLE = {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"}
# the runtime linears (BFL names) those land on: every linear of every block
RUNTIME_DOUBLE = {
    *("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"),
    *("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin"),
}
RUNTIME_SINGLE = {"linear1", "linear2", "modulation.lin"}


def block_linears(kontext_dir) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of diffusers' own transformer under transformer_blocks / single_transformer_blocks -> (out,
    in); the per-kind module names must be the turbo layout's, so the file cannot silently lose a kind."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer")
    found = {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")
    }
    for prefix, want, blocks in (
        ("transformer_blocks", DOUBLE, model.config.num_layers),
        ("single_transformer_blocks", SINGLE, model.config.num_single_layers),
    ):
        for i in range(blocks):
            kinds = {n.removeprefix(f"{prefix}.{i}.") for n in found if n.startswith(f"{prefix}.{i}.")}
            assert kinds == want, f"{prefix}.{i}: {sorted(kinds ^ want)}"
    return found


def turbo_lora(path, kontext_dir, seed: int, alpha: float | None):
    """A turbo-layout LoRA file (no alpha keys: alpha = rank, scale 1; or the same .alpha on every module).
    Magnitudes: each update B @ A about a tenth of the weight's own (per entry), a turbo LoRA's order, not chaos."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (rows, cols) in block_linears(kontext_dir).items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, cols, generator=gen) * 0.1
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(rows, RANK, generator=gen) * 0.1
        if alpha is not None:
            sd[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def diffusers_edit(kontext_dir, path, strength, lat, img, float64: bool):
    """diffusers' 8-step edit with the LoRA loaded and fused at strength (float32, or float64 with a float64 Euler
    state)."""
    from diffusers import FluxKontextPipeline

    if float64:
        ref = float64_pipeline(FluxKontextPipeline, kontext_dir)
    else:
        ref = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
        ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path), adapter_name="turbo")
    ref.fuse_lora(lora_scale=strength, components=["transformer"])
    dtype = torch.float64 if float64 else torch.float32
    assert {p.dtype for p in ref.transformer.parameters()} == {dtype}  # PEFT's A and B too: it fuses in dtype
    args = kontext_call(img, "turbo", H, W, num_inference_steps=STEPS, max_sequence_length=TEXT_TOKENS)
    return ref(latents=lat.to(dtype), **args).images


@pytest.mark.parametrize(
    "strength,alpha",
    [(1.0, None), (0.125, None), (0.125, 8.0)],
    ids=["turbo-alpha-x1", "hyper-8steps-x0.125", "hyper-alpha-keys-x0.125"],
)
def test_turbo_lora_8_step_edit_matches_diffusers(kontext_dir, tmp_path, strength, alpha):
    path = turbo_lora(tmp_path / "turbo.safetensors", kontext_dir, seed=30, alpha=alpha)
    img = picture(H, W, seed=3)
    lat = torch.randn(1, (H // 16) * (W // 16), 64, generator=torch.Generator().manual_seed(31))
    call = dict(steps=STEPS, latents=lat, output="latent", auto_resize=False, guidance=GUIDANCE)

    plain_pipe = Pipeline.from_pretrained(kontext_dir, max_sequence_length=TEXT_TOKENS)
    pipe = Pipeline.from_pretrained(kontext_dir, max_sequence_length=TEXT_TOKENS, loras=[(path, strength)])
    assert pipe.loras == ["turbo"]
    base, fused = plain_pipe.transformer.state_dict(), pipe.transformer.state_dict()
    moved = {k.removesuffix(".weight") for k in base if not torch.equal(base[k], fused[k])}
    depth = (len(plain_pipe.transformer.double_blocks), len(plain_pipe.transformer.single_blocks))
    assert moved == {f"double_blocks.{i}.{m}" for i in range(depth[0]) for m in RUNTIME_DOUBLE} | {
        f"single_blocks.{i}.{m}" for i in range(depth[1]) for m in RUNTIME_SINGLE
    }

    ours = pipe.edit(img, "turbo", **call)
    want32 = diffusers_edit(kontext_dir, path, strength, lat, img, float64=False)
    want64 = diffusers_edit(kontext_dir, path, strength, lat, img, float64=True)
    assert_float32_close(ours, want32, want64, f"LoRA x{strength}")

    bound = 2 * float32_noise(want32, want64)
    effect = rel_err(plain_pipe.edit(img, "turbo", **call), want64)
    assert effect > EFFECT * bound, f"the LoRA moves the edit by {effect:.3g}, the bound is {bound:.3g}"
