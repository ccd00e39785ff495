"""LoRA features test_lora.py does not reach: rsLoRA scaling (alpha / sqrt(r)), B biases (PEFT's lora_bias), and
norm_out's swapped halves (diffusers' norm_out.linear is [scale | shift], BFL's final adaLN [shift | scale]) for
the weight and the bias, through Pipeline.load_lora.

Two references: diffusers + PEFT loading and fusing the same file, and the fusion written here in float64 on the
BFL layout from the PEFT definition (W += strength * scaling * B @ A, b += strength * scaling * b_B, scaling alpha / r
or alpha / sqrt(r) with rsLoRA). Each side must be within twice the other's error against the float64 fusion plus one
float32 ulp of the weight (both fuse in float32; tests/test_lora.py's rule).
"""

import math

import pytest
import torch

from kontext_rt import Pipeline
from tests.test_lora import diffusers_fused

RANK, ALPHA, STRENGTH = 4, 8.0, 0.7
H, MLP = 64, 256  # the tiny preset's hidden and MLP widths
# diffusers module -> (its out, in), the runtime weight it lands on, the rows of that weight, halves swapped
MODULES = {
    "transformer_blocks.0.attn.to_k": ((H, H), "double_blocks.0.img_attn.qkv", (H, 2 * H), False),
    "single_transformer_blocks.1.proj_mlp": ((MLP, H), "single_blocks.1.linear1", (3 * H, 3 * H + MLP), False),
    "transformer_blocks.1.ff.net.2": ((H, MLP), "double_blocks.1.img_mlp.2", (0, H), False),
    "norm_out.linear": ((2 * H, H), "final_layer.adaLN_modulation.1", (0, 2 * H), True),
}


def write_lora(folder, rslora: bool, bias: bool):
    from diffusers import FluxKontextPipeline

    gen = torch.Generator().manual_seed(20 + 2 * rslora + bias)
    layers = {}
    for name, ((rows, cols), *_) in MODULES.items():
        layers[f"{name}.lora_A.weight"] = torch.randn(RANK, cols, generator=gen) * 0.3
        layers[f"{name}.lora_B.weight"] = torch.randn(rows, RANK, generator=gen) * 0.3
        if bias:
            layers[f"{name}.lora_B.bias"] = torch.randn(rows, generator=gen) * 0.3
    meta = {"r": RANK, "lora_alpha": ALPHA, "use_rslora": rslora, "lora_bias": bias, "target_modules": list(MODULES)}
    FluxKontextPipeline.save_lora_weights(
        folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta, weight_name="lora.safetensors"
    )
    return folder / "lora.safetensors", layers


def float64_fusion(base: dict, layers: dict, rslora: bool) -> dict:
    scaling = ALPHA / (math.sqrt(RANK) if rslora else RANK)
    out = {k: v.double().clone() for k, v in base.items()}
    for name, (_, target, (start, end), swap) in MODULES.items():
        a, b = layers[f"{name}.lora_A.weight"].double(), layers[f"{name}.lora_B.weight"].double()
        deltas = {"weight": b @ a}
        if f"{name}.lora_B.bias" in layers:
            deltas["bias"] = layers[f"{name}.lora_B.bias"].double()
        for kind, delta in deltas.items():
            if swap:  # diffusers [scale | shift] rows -> BFL [shift | scale]
                delta = torch.cat(delta.chunk(2, 0)[::-1])
            out[f"{target}.{kind}"][start:end] += STRENGTH * scaling * delta
    return out


@pytest.mark.parametrize("rslora,bias", [(True, False), (False, True)], ids=["rslora", "bias"])
def test_lora_matches_peft_and_float64(kontext_dir, tmp_path, rslora, bias):
    path, layers = write_lora(tmp_path, rslora, bias)
    pipe = Pipeline.from_pretrained(kontext_dir)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora(path, STRENGTH)
    ours = pipe.transformer.state_dict()
    theirs = diffusers_fused(kontext_dir, path, STRENGTH)
    exact = float64_fusion(base, layers, rslora)
    changed = set()
    for k, ref in exact.items():
        err_ours, err_theirs = ((w.double() - ref).abs().max().item() for w in (ours[k], theirs[k]))
        ulp = torch.finfo(torch.float32).eps * ref.abs().max().item()
        assert err_ours <= 2 * err_theirs + ulp, f"{k}: runtime {err_ours:.3g}, diffusers {err_theirs:.3g}"
        assert err_theirs <= 2 * err_ours + ulp, f"{k}: diffusers {err_theirs:.3g}, runtime {err_ours:.3g}"
        if not torch.equal(ours[k], base[k]):
            changed.add(k)
    want = {f"{target}.{kind}" for _, target, _, _ in MODULES.values() for kind in ("weight",) + ("bias",) * bias}
    assert changed == want
