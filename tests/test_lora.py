"""LoRA fuse/unfuse in every format against diffusers' own load_lora_weights + fuse_lora (fp32, CPU).

diffusers' converters for kohya single-block linear1 and for BFL-named (fal/BFL control) files hard-code FLUX's
full width (3072 / 19 / 38 blocks), so on a tiny model those two are checked through the documented conversion
(diffusers' convention: A copied to every split, B split by rows) into a diffusers-format file that diffusers fuses.
Tolerance (habit 7): both sides fuse in float32; each must be within 2x the other's error against a float64 fusion,
plus one float32 ulp of the weights.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from kontext_rt import LoRAError, Pipeline
from kontext_rt.weights.formats import detect
from kontext_rt.weights.lora import LoRAStack
from kontext_rt.weights.mapping import diffusers_transformer_rules

RANK = 4
H = 64  # the tiny preset's hidden size
MLP = 256


def _ab(gen, rows, cols, rank=RANK):
    return torch.randn(rank, cols, generator=gen) * 0.3, torch.randn(rows, rank, generator=gen) * 0.3


def diffusers_lora(gen, alphas=False):
    """A PEFT-format LoRA on every default DreamBooth target of block 0/1, plus norm_out (the swapped layer)."""
    sd = {}
    targets = {
        f"transformer_blocks.{i}.{m}": (o, c)
        for i in range(2)
        for m, (o, c) in {
            "attn.to_q": (H, H),
            "attn.to_k": (H, H),
            "attn.to_v": (H, H),
            "attn.to_out.0": (H, H),
            "attn.add_q_proj": (H, H),
            "attn.add_k_proj": (H, H),
            "attn.add_v_proj": (H, H),
            "attn.to_add_out": (H, H),
            "ff.net.0.proj": (MLP, H),
            "ff.net.2": (H, MLP),
            "ff_context.net.0.proj": (MLP, H),
            "ff_context.net.2": (H, MLP),
            "norm1.linear": (6 * H, H),
        }.items()
    }
    targets |= {
        f"single_transformer_blocks.{i}.{m}": (o, c)
        for i in range(2)
        for m, (o, c) in {
            "attn.to_q": (H, H),
            "attn.to_k": (H, H),
            "attn.to_v": (H, H),
            "proj_mlp": (MLP, H),
            "proj_out": (H, H + MLP),
            "norm.linear": (3 * H, H),
        }.items()
    }
    targets |= {"norm_out.linear": (2 * H, H), "proj_out": (64, H), "x_embedder": (H, 64)}
    if alphas:  # diffusers turns names into PEFT suffix patterns: a "proj_out" alpha or target also matches the
        # other proj_outs (global vs single blocks), which then get a wrong alpha or a randomly initialised LoRA
        targets = {k: v for k, v in targets.items() if not k.endswith("proj_out")}
    for name, (rows, cols) in targets.items():
        a, b = _ab(gen, rows, cols)
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
        if alphas:
            sd[f"transformer.{name}.alpha"] = torch.tensor(float(torch.randint(1, 9, (1,), generator=gen)))
    return sd


def kohya_lora(gen, final_layer=False):
    """kohya sd-scripts names: fused qkv up-weights and alphas; the final layer (BFL order) only if asked:
    diffusers' kohya converter drops the `transformer.` prefix of final-layer keys, so it cannot be the reference
    there (test_kohya_final_layer_lands_as_bfl_names covers it)."""
    sd = {}
    mods = {
        f"lora_unet_double_blocks_{i}_{s}_{m}": (o, c)
        for i in range(2)
        for s in ("img", "txt")
        for m, (o, c) in {
            "attn_qkv": (3 * H, H),
            "attn_proj": (H, H),
            "mlp_0": (MLP, H),
            "mlp_2": (H, MLP),
            "mod_lin": (6 * H, H),
        }.items()
    }
    mods |= {
        f"lora_unet_single_blocks_{i}_{m}": (o, c)
        for i in range(2)
        for m, (o, c) in {"linear2": (H, H + MLP), "modulation_lin": (3 * H, H)}.items()
    }
    if final_layer:
        mods |= {"lora_unet_final_layer_adaLN_modulation_1": (2 * H, H), "lora_unet_final_layer_linear": (64, H)}
    for name, (rows, cols) in mods.items():
        a, b = _ab(gen, rows, cols)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = a, b
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    return sd


def split_to_diffusers(module_b, a, b, parts, sizes, alpha=None):
    """diffusers' convention: a LoRA on a fused weight as diffusers-format LoRAs on its splits (A copied, B split)."""
    out, start = {}, 0
    for part, size in zip(parts, sizes, strict=True):
        out[f"transformer.{module_b}.{part}.lora_A.weight"] = a.clone()
        out[f"transformer.{module_b}.{part}.lora_B.weight"] = b[start : start + size].clone()
        if alpha is not None:
            out[f"transformer.{module_b}.{part}.alpha"] = alpha.clone()
        start += size
    return out


@pytest.fixture(scope="module")
def base(kontext_dir):
    return detect(kontext_dir).load_transformer(torch.float32, "cpu")


def diffusers_fused(kontext_dir, path, strength):
    """diffusers' fused transformer weights, in the runtime's (BFL) layout."""
    from diffusers import FluxKontextPipeline

    ref = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    ref.load_lora_weights(str(path), adapter_name="x")
    ref.fuse_lora(lora_scale=strength, components=["transformer"])
    ref.unload_lora_weights()  # the fused weights stay
    sd = ref.transformer.state_dict()
    ours = detect(kontext_dir).load_transformer(torch.float32, "cpu")
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    return {r.target: r.combine([sd[s] for s in r.sources]) for r in diffusers_transformer_rules(shapes)}


def float64_fused(base, path, strength):
    """The same fusion in float64: the exact reference both sides are measured against."""
    from kontext_rt.weights import lora

    model = _clone(base).double()
    stack = LoRAStack(model)
    deltas = [
        lora.Delta(d.target, d.down.double(), d.up.double(), d.up_bias, d.scale, d.source)
        for d in lora.read(path, model)
    ]
    stack._fuse(deltas, strength)
    return model.state_dict()


def _clone(model):
    import copy

    return copy.deepcopy(model)


def assert_fusion_matches(base, theirs, path, strength):
    ours_model = _clone(base)
    LoRAStack(ours_model).load(path, strength)
    exact = float64_fused(base, path, strength)
    ours = ours_model.state_dict()
    changed = set()
    for k, w in ours.items():
        ref = exact[k]
        err_ours, err_theirs = (w.double() - ref).abs().max(), (theirs[k].double() - ref).abs().max()
        ulp = torch.finfo(torch.float32).eps * ref.abs().max()
        assert err_ours <= 2 * err_theirs + ulp, k
        assert (theirs[k].double() - ref).abs().max() <= 2 * err_ours + ulp, k  # and diffusers agrees with us
        if not torch.equal(w, base.state_dict()[k]):
            changed.add(k)
    return changed


@pytest.mark.parametrize("alphas,strength", [(False, 1.0), (True, 0.7)])
def test_diffusers_format_matches_diffusers(kontext_dir, base, tmp_path, alphas, strength):
    path = tmp_path / "peft.safetensors"
    save_file(diffusers_lora(torch.Generator().manual_seed(1), alphas), str(path))
    changed = assert_fusion_matches(base, diffusers_fused(kontext_dir, path, strength), path, strength)
    assert len(changed) == (2 * 9 + 2 * 3 + 3 if not alphas else 2 * 9 + 2 * 2 + 2)  # every targeted weight moved


def test_peft_metadata_alpha_matches_diffusers(kontext_dir, base, tmp_path):
    from diffusers import FluxKontextPipeline

    sd = diffusers_lora(torch.Generator().manual_seed(2))
    layers = {k.removeprefix("transformer."): v for k, v in sd.items()}
    meta = {
        "r": RANK,
        "lora_alpha": 8,
        "alpha_pattern": {"proj_out": 2},
        "rank_pattern": {},
        "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in layers}),
    }
    FluxKontextPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta, weight_name="meta.safetensors"
    )
    path = tmp_path / "meta.safetensors"
    assert len(assert_fusion_matches(base, diffusers_fused(kontext_dir, path, 1.0), path, 1.0)) == 2 * 9 + 2 * 3 + 3


def test_kohya_format_matches_diffusers(kontext_dir, base, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_lora(torch.Generator().manual_seed(3)), str(path))
    assert len(assert_fusion_matches(base, diffusers_fused(kontext_dir, path, 0.8), path, 0.8)) == 2 * 10 + 2 * 2


def test_kohya_final_layer_lands_as_bfl_names(base, tmp_path):
    """The same tensors under kohya and BFL names fuse to the same weights (BFL order, no swap)."""
    kohya = {
        k: v for k, v in kohya_lora(torch.Generator().manual_seed(11), final_layer=True).items() if "final_layer" in k
    }
    bfl = {
        k.replace("lora_unet_final_layer_adaLN_modulation_1", "diffusion_model.final_layer.adaLN_modulation.1").replace(
            "lora_unet_final_layer_linear", "diffusion_model.final_layer.linear"
        ): v
        for k, v in kohya.items()
    }
    save_file(kohya, str(tmp_path / "k.safetensors"))
    save_file(bfl, str(tmp_path / "b.safetensors"))
    a, b = _clone(base), _clone(base)
    LoRAStack(a).load(tmp_path / "k.safetensors")
    LoRAStack(b).load(tmp_path / "b.safetensors")
    for k in ("final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"):
        assert torch.equal(a.state_dict()[k], b.state_dict()[k]) and not torch.equal(
            a.state_dict()[k], base.state_dict()[k]
        )


def test_kohya_linear1_matches_diffusers_through_splits(kontext_dir, base, tmp_path):
    gen = torch.Generator().manual_seed(4)
    kohya, split = {}, {}
    for i in range(2):
        a, b = _ab(gen, 3 * H + MLP, H)
        alpha = torch.tensor(3.0)
        kohya |= {
            f"lora_unet_single_blocks_{i}_linear1.lora_down.weight": a,
            f"lora_unet_single_blocks_{i}_linear1.lora_up.weight": b,
            f"lora_unet_single_blocks_{i}_linear1.alpha": alpha,
        }
        split |= split_to_diffusers(
            f"single_transformer_blocks.{i}",
            a,
            b,
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            (H, H, H, MLP),
            alpha,
        )
    save_file(kohya, str(tmp_path / "k.safetensors"))
    save_file(split, str(tmp_path / "d.safetensors"))
    theirs = diffusers_fused(kontext_dir, tmp_path / "d.safetensors", 1.0)
    changed = assert_fusion_matches(base, theirs, tmp_path / "k.safetensors", 1.0)
    assert changed == {"single_blocks.0.linear1.weight", "single_blocks.1.linear1.weight"}


@pytest.mark.parametrize(
    "prefix,down,up",
    [("diffusion_model.", "lora_A", "lora_B"), ("", "lora_down", "lora_up"), ("base_model.model.", "lora_A", "lora_B")],
)
def test_bfl_comfyui_format_matches_diffusers_through_splits(kontext_dir, base, tmp_path, prefix, down, up):
    gen = torch.Generator().manual_seed(5)
    bfl, split = {}, {}
    for i in range(2):
        for stream, parts in (
            ("img", ("attn.to_q", "attn.to_k", "attn.to_v")),
            ("txt", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        ):
            a, b = _ab(gen, 3 * H, H)
            key = f"{prefix}double_blocks.{i}.{stream}_attn.qkv"
            bfl |= {f"{key}.{down}.weight": a, f"{key}.{up}.weight": b, f"{key}.alpha": torch.tensor(8.0)}
            split |= split_to_diffusers(f"transformer_blocks.{i}", a, b, parts, (H, H, H), torch.tensor(8.0))
        a, b = _ab(gen, 3 * H + MLP, H)
        key = f"{prefix}single_blocks.{i}.linear1"  # every module with an alpha: diffusers gives a module
        # without one the file's most common alpha, where the formats mean alpha = rank
        bfl |= {f"{key}.{down}.weight": a, f"{key}.{up}.weight": b, f"{key}.alpha": torch.tensor(2.0)}
        split |= split_to_diffusers(
            f"single_transformer_blocks.{i}",
            a,
            b,
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            (H, H, H, MLP),
            torch.tensor(2.0),
        )
    a, b = _ab(gen, 2 * H, H)  # final adaLN in BFL order; diffusers' norm_out.linear has the halves swapped
    bfl |= {
        f"{prefix}final_layer.adaLN_modulation.1.{down}.weight": a,
        f"{prefix}final_layer.adaLN_modulation.1.{up}.weight": b,
        f"{prefix}final_layer.adaLN_modulation.1.alpha": torch.tensor(4.0),
    }
    split |= {
        "transformer.norm_out.linear.lora_A.weight": a,
        "transformer.norm_out.linear.lora_B.weight": torch.cat(b.chunk(2)[::-1]),
        "transformer.norm_out.linear.alpha": torch.tensor(4.0),
    }
    save_file(bfl, str(tmp_path / "bfl.safetensors"))
    save_file(split, str(tmp_path / "d.safetensors"))
    theirs = diffusers_fused(kontext_dir, tmp_path / "d.safetensors", 1.3)
    assert len(assert_fusion_matches(base, theirs, tmp_path / "bfl.safetensors", 1.3)) == 2 * 2 + 2 + 1


def test_unfuse_restores_bit_for_bit_with_several_loras(base, tmp_path):
    save_file(diffusers_lora(torch.Generator().manual_seed(6)), str(tmp_path / "a.safetensors"))
    save_file(kohya_lora(torch.Generator().manual_seed(7)), str(tmp_path / "b.safetensors"))
    model = _clone(base)
    stack = LoRAStack(model)
    assert stack.load(tmp_path / "a.safetensors", 0.5) == "a"
    stack.load(tmp_path / "b.safetensors", 1.0, name="style")
    only_b = _clone(base)
    LoRAStack(only_b).load(tmp_path / "b.safetensors", 1.0)
    stack.unload("a")  # the other LoRA stays, fused again onto the originals
    assert stack.names() == ["style"]
    assert all(torch.equal(v, only_b.state_dict()[k]) for k, v in model.state_dict().items())
    stack.unload()
    assert stack.names() == []
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


def test_bad_lora_files(base, tmp_path):
    stack = LoRAStack(_clone(base))
    sd = diffusers_lora(torch.Generator().manual_seed(8))
    sd["transformer.transformer_blocks.0.attn.to_q.dora_scale"] = torch.ones(1, H)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.ones(RANK, 8)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(LoRAError, match=r"2 keys name nothing.*lora_te1_.*dora_scale"):
        stack.load(tmp_path / "extra.safetensors")
    bad = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(RANK, H),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(H + 1, RANK),
    }
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LoRAError, match=r"attn.to_q: A \[4, 64\] and B \[65, 4\]"):
        stack.load(tmp_path / "shape.safetensors")
    with pytest.raises(LoRAError, match="safetensors files only"):
        stack.load(tmp_path / "lora.pt")
    assert stack.names() == [] and all(
        torch.equal(v, base.state_dict()[k]) for k, v in stack.model.state_dict().items()
    )
    save_file(diffusers_lora(torch.Generator().manual_seed(9)), str(tmp_path / "ok.safetensors"))
    stack.load(tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="already loaded"):
        stack.load(tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="no LoRA named 'nope'"):
        stack.unload("nope")
    with pytest.raises(ValueError, match="strength must be a finite number"):
        stack.load(tmp_path / "ok.safetensors", float("nan"), name="other")


def test_pipeline_lora_changes_and_restores_the_edit(kontext_dir, tmp_path):
    save_file(diffusers_lora(torch.Generator().manual_seed(10)), str(tmp_path / "style.safetensors"))
    pipe = Pipeline.from_pretrained(kontext_dir)
    args = dict(prompt="x", width=32, height=32, steps=2, seed=3, output="latent")
    plain = pipe.generate(**args)
    assert pipe.load_lora(tmp_path / "style.safetensors", 0.5) == "style" and pipe.loras == ["style"]
    styled = pipe.generate(**args)
    assert not torch.allclose(styled, plain)
    pipe.unload_lora()
    assert torch.equal(pipe.generate(**args), plain)
    fused_at_load = Pipeline.from_pretrained(kontext_dir, loras=[(tmp_path / "style.safetensors", 0.5)])
    assert fused_at_load.loras == ["style"]
    assert torch.equal(fused_at_load.generate(**args), styled)


def test_metadata_is_json_of_a_lora_config(tmp_path):
    """The header key diffusers writes is the one the reader looks for (a renamed key would silently give scale 1)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    from kontext_rt.weights.lora import _adapter_config

    assert LORA_ADAPTER_METADATA_KEY == "lora_adapter_metadata"
    from diffusers import FluxKontextPipeline

    layers = {
        "transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(RANK, H),
        "transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(H, RANK),
    }
    FluxKontextPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": 16},
        weight_name="m.safetensors",
    )
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        conf = _adapter_config(dict(f.metadata()), tmp_path)
    assert conf["lora_alpha"] == 16 and json.dumps(conf)


def test_a_lora_on_every_diffusers_linear_lands_where_the_loader_puts_it(kontext_dir, base, tmp_path):
    """The LoRA reader and the checkpoint loader share one name table and one fused-row split: a LoRA on every
    nn.Linear of diffusers' own transformer fuses to what the loader makes of the diffusers weights with the same
    update (W + B @ A) added, every runtime linear included."""
    from diffusers import FluxTransformer2DModel

    from kontext_rt.weights.formats import DiffusersFolder

    ref = FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer").eval()
    gen = torch.Generator().manual_seed(11)
    sd, state = {}, ref.state_dict()
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear):
            a, b = _ab(gen, module.out_features, module.in_features)
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
            state[f"{name}.weight"] = state[f"{name}.weight"] + b @ a
    ref.load_state_dict(state)
    ref.save_pretrained(tmp_path / "transformer")
    theirs = DiffusersFolder(tmp_path, None).load_transformer(torch.float32, "cpu").state_dict()
    path = tmp_path / "every.safetensors"
    save_file(sd, str(path))
    changed = assert_fusion_matches(base, theirs, path, 1.0)
    linears = {f"{n}.weight" for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    assert changed == linears
