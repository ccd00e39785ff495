"""The memory plan: exact weight bytes, a traced transient checked against a hand count, refusal before the weights,
and the `kontext-rt plan` command."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kontext_rt import memory
from kontext_rt.cli import main
from kontext_rt.config import PRESETS, VAE_PRESETS
from kontext_rt.errors import InputError, OutOfMemoryPlan
from kontext_rt.model.fp8_linear import fp8_eligible
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_rt.pipeline import Pipeline
from kontext_rt.weights.formats import CheckpointFormat, detect

FULL = ("flux-kontext-dev", "flux-schnell")  # flux-dev shares the kontext config; schnell drops guidance_in


def small_plan(cfg, vae_cfg, dtype=torch.bfloat16, fp8=False):
    """A plan at 64x64 (weights do not depend on the size; a small trace keeps the test quick)."""
    return memory.plan(cfg, vae_cfg, dtype, fp8, 8, 16, 16, 64, 64)


def recipe_bytes(cfg, fp8: bool) -> int:
    """Bytes of the transformer in bf16, counted from the plain model's parameters; with fp8, each eligible linear
    as the FP8 recipe keeps it: an e4m3 weight (1 byte), one float32 scale per output channel, the bias in bf16."""
    with torch.device("meta"):
        model = FluxTransformer(cfg)
    total = 0
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if fp8 and isinstance(module, nn.Linear) and fp8_eligible(name):
            out_features, in_features = module.weight.shape
            total += out_features * in_features + 4 * out_features
            total += 0 if module.bias is None else 2 * module.bias.numel()
        else:
            total += 2 * sum(p.numel() for p in own)
    return total


@pytest.mark.parametrize("preset", FULL)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_full_size_weight_bytes_are_exact(preset, fp8):
    cfg = PRESETS[preset]
    p = small_plan(cfg, VAE_PRESETS["flux"], fp8=fp8)
    assert p.transformer_weights == recipe_bytes(cfg, fp8)
    with torch.device("meta"):
        vae = AutoEncoder(VAE_PRESETS["flux"])
    assert p.vae_weights == 2 * sum(t.numel() for t in vae.parameters())


def test_fp8_converted_meta_model_matches_the_recipe():
    """convert works on the meta device; what it leaves is the recipe's count, for a model the test also converts."""
    cfg = PRESETS["flux-kontext-dev"]
    converted = memory.meta_transformer(cfg, torch.bfloat16, fp8=True)
    kept = {n: t for n, t in converted.named_buffers() if n.endswith(("weight", "weight_scale"))}
    assert any(t.dtype == torch.float8_e4m3fn for t in kept.values())
    assert memory.tensor_bytes(converted) == recipe_bytes(cfg, fp8=True)


def test_live_bytes_peak_of_linear_gelu_linear_by_hand():
    """x (B, K) -> h = gelu(lin1(x)) (B, N) -> lin2(h) (B, M). Alive at once, by hand: lin1's output and GELU's
    (2BN, then lin1's dies), then GELU's and lin2's (BN + BM). With M > N the peak is BN + BM, in float32 bytes.
    The weights and x exist before the trace: not counted."""
    b, k, n, m = 8, 16, 32, 96
    with torch.device("meta"):
        lin1, lin2 = nn.Linear(k, n), nn.Linear(n, m)
        x = torch.empty(b, k)

    def run():
        h = F.gelu(lin1(x))
        lin2(h)

    assert memory.trace_peak(run) == 4 * (b * n + b * m)


def test_live_bytes_counts_views_once_and_pre_existing_memory_never():
    with torch.device("meta"):
        x = torch.empty(64, 64)

    def run():
        y = x.t()  # a view of memory that was already there
        z = y * 2  # new: 64*64 float32
        z[1:3].t().add_(1)  # views and in-place ops on z: nothing new

    assert memory.trace_peak(run) == 4 * 64 * 64


def test_plan_table_names_every_line():
    p = small_plan(PRESETS["tiny"], VAE_PRESETS["tiny"])
    text = str(p)
    for line in (
        "transformer blocks",
        "modulation linears",
        "VAE weights",
        "text encoders",
        "stage: denoising step",
        "stage: VAE encode/decode",
        "stage: text encode",
        "margin",
    ):
        assert line in text
    assert p.budget == p.peak + int(p.peak * memory.MARGIN)


MODULATION = ("img_mod.", "txt_mod.", "modulation.lin", "adaLN_modulation")


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_full_size_parts_are_the_parameters_by_name(fp8):
    """The plan's blocks and modulation linears, against the meta model's tensors picked out by their names."""
    cfg = PRESETS["flux-kontext-dev"]
    p = small_plan(cfg, VAE_PRESETS["flux"], fp8=fp8)
    model = memory.meta_transformer(cfg, torch.bfloat16, fp8)
    named = [(n, t.numel() * t.element_size()) for n, t in (*model.named_parameters(), *model.named_buffers())]
    mod = sum(b for n, b in named if any(m in n for m in MODULATION))
    blocks = sum(b for n, b in named if n.startswith(("double_blocks.", "single_blocks.")))
    assert p.modulation_weights == mod and p.block_weights == blocks - (
        mod - sum(b for n, b in named if n.startswith("final_layer.adaLN_modulation"))
    )
    single = [
        sum(b for n, b in named if n.startswith(f"single_blocks.{i}.") and "modulation" not in n) for i in range(38)
    ]
    double = [sum(b for n, b in named if n.startswith(f"double_blocks.{i}.") and "_mod." not in n) for i in range(19)]
    assert p.largest_block == max(single + double)
    assert p.largest_modulation_layer == max(b for n, b in named if n.endswith("img_mod.lin.weight")) + max(
        b for n, b in named if n.endswith("img_mod.lin.bias")
    )


def on_device_bytes(pipe) -> tuple[int, int, int]:
    """(always on the device, largest streamed block, largest streamed modulation layer), counted from the loaded
    pipeline's own objects: every tensor of the transformer, VAE and loaded text encoders, less those held in host
    memory by a streamed or staged part."""
    from kontext_rt.streaming import Staged
    from kontext_rt.vae_runner import StagedVAE

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    model = pipe.transformer
    residency = model.residency
    streams = [s for s in (getattr(residency, "blocks", None), getattr(residency, "modulation", None)) if s]
    streamed = {t.untyped_storage().data_ptr() for s in streams for u in s.units for t in u.host}
    total = size(t for t in (*model.parameters(), *model.buffers()) if t.untyped_storage().data_ptr() not in streamed)
    if not isinstance(pipe.vae, StagedVAE):
        total += size((*pipe.vae.parameters(), *pipe.vae.buffers()))
    if pipe.text.placement == "device":
        total += sum(size((*m.parameters(), *m.buffers())) for m in pipe.text._models if not isinstance(m, Staged))
    blocks = residency.blocks.largest_unit if getattr(residency, "blocks", None) else 0
    mods = residency.modulation.largest_unit if getattr(residency, "modulation", None) else 0
    return total, blocks, mods


@pytest.mark.parametrize("placement", ["resident", "lean", "offload", "transformer=offload,text_encoders=staged"])
def test_plan_of_each_placement_is_the_loaded_pipeline(kontext_dir, placement):
    """What the plan keeps on the device, and the units it streams, equal the loaded pipeline's (tiny checkpoint)."""
    from kontext_rt import load_checks
    from kontext_rt.placement import Placement

    pipe = Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, placement=placement)
    pipe.encode_prompt("load the text encoders")
    pl = Placement.parse(placement)
    checkpoint = detect(kontext_dir)
    p = load_checks.memory_plan(checkpoint, pipe.cfg, torch.bfloat16, False, 8, (64, 64), pl)
    resident, block, mod = on_device_bytes(pipe)
    assert p.resident == resident
    assert (2 * p.largest_block if pl.offloads_blocks else 0) == 2 * block
    assert (p.largest_modulation_layer if pl.modulation == "staged" else 0) == mod


@pytest.mark.parametrize("placement", ["offload", "lean"])
def test_the_plan_streams_as_many_units_at_once_as_streaming_holds(kontext_dir, placement):
    """The plan's allowance for streamed blocks (denoising step) and streamed modulation layers (modulation table)
    is exactly what the streaming code held on the device at once in a real run: its own count of units holding
    device memory (Streamed.max_on_device) times its largest unit. Both sides are read, neither restated: a plan
    that allowed one block, or a stream that copied two ahead, fails here."""
    from kontext_rt import load_checks
    from kontext_rt.placement import Placement

    pipe = Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, placement=placement)
    pipe.generate("stream the blocks", width=64, height=64, steps=2, seed=0)
    residency = pipe.transformer.residency
    p = load_checks.memory_plan(
        detect(kontext_dir), pipe.cfg, torch.bfloat16, False, 8, (64, 64), Placement.parse(placement)
    )
    planned = {
        "blocks": p.stages["denoising step"] - p.resident - p.table - p.denoise_transient,
        "modulation": p.stages["modulation table"] - p.resident - p.table,
    }
    for part, planned_bytes in planned.items():
        streamed = getattr(residency, part, None)
        held = streamed.max_on_device * streamed.largest_unit if streamed is not None else 0
        assert planned_bytes == held, f"{placement}, {part}: planned {planned_bytes} bytes, streaming held {held}"
    assert (residency.blocks is not None) == (placement == "offload") and residency.modulation is not None


def test_a_refused_plan_names_the_placements_that_fit(kontext_dir, monkeypatch):
    from kontext_rt import load_checks
    from kontext_rt.placement import PRESETS as PLACEMENTS

    plans = []
    original = load_checks.memory_plan
    monkeypatch.setattr(load_checks, "memory_plan", lambda *a: plans.append(original(*a)) or plans[-1])
    with pytest.raises(OutOfMemoryPlan):
        Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, max_memory=1)
    resident, offload = plans[0].budget, plans[0].placed(PLACEMENTS["offload"]).budget
    assert offload < resident
    with pytest.raises(OutOfMemoryPlan, match="placement='offload'") as err:
        Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, max_memory=offload)
    assert "placement='resident'" not in str(err.value)
    assert Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, max_memory=offload, placement="offload")


@pytest.fixture
def no_weights(monkeypatch):
    def read(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(CheckpointFormat, "load_transformer", read)
    monkeypatch.setattr(CheckpointFormat, "load_vae", read)


def test_over_max_memory_is_refused_before_any_weights(kontext_dir, no_weights):
    with pytest.raises(
        OutOfMemoryPlan, match="(?s)transformer blocks.*Nothing fits: the least is placement='offload'"
    ) as err:
        Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, max_memory=1024)
    assert isinstance(err.value, InputError)


def test_max_memory_boundary_is_the_planned_total(kontext_dir, monkeypatch):
    """The plan's total fits exactly; one byte less is refused (so the plan, not a constant, decides)."""
    from kontext_rt import load_checks

    plans = []
    original = load_checks.memory_plan
    monkeypatch.setattr(load_checks, "memory_plan", lambda *a: plans.append(original(*a)) or plans[-1])
    with pytest.raises(OutOfMemoryPlan):
        Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, max_memory=1)
    need = plans[0].budget
    assert plans[0].text_encoders > 0  # the tiny checkpoint's text encoders are counted from their headers
    with pytest.raises(OutOfMemoryPlan):
        Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, max_memory=need - 1)
    assert Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, max_memory=need) is not None


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1G"])
def test_max_memory_must_be_positive_bytes(kontext_dir, no_weights, bad):
    with pytest.raises(InputError, match="max_memory"):
        Pipeline.from_pretrained(kontext_dir, max_memory=bad)


def test_cli_plan_for_a_checkpoint(kontext_dir, capsys, no_weights):
    assert main(["plan", "--checkpoint", str(kontext_dir), "--width", "64", "--height", "64"]) == 0
    out = capsys.readouterr().out
    assert "64x64, bfloat16" in out and "transformer blocks" in out and "planned total" in out


def test_cli_plan_for_the_full_preset(capsys):
    assert main(["plan", "--preset", "flux-kontext-dev", "--width", "256", "--height", "256", "--fp8"]) == 0
    out = capsys.readouterr().out
    want = recipe_bytes(PRESETS["flux-kontext-dev"], fp8=True) / 2**30
    parts = ("transformer blocks", "modulation linears", "transformer embedders")
    shown = [float(line.split()[-5]) for line in out.splitlines() if line.strip().startswith(parts)]
    assert len(shown) == 3 and abs(sum(shown) - want) <= 0.015  # three figures rounded to 0.01 GiB
    assert "bfloat16 + fp8 linears" in out


@pytest.mark.parametrize(
    "args, match",
    [
        (["--preset", "nope"], "unknown preset"),
        (["--preset", "tiny", "--fp8", "--dtype", "fp32"], "--fp8"),
        (["--preset", "tiny", "--width", "100"], "multiple of 16"),
        (["--preset", "tiny", "--checkpoint", "x"], "not allowed with"),
    ],
)
def test_cli_plan_refuses_bad_arguments(args, match, capsys):
    assert main(["plan", *args]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("placement", ["resident", "offload"])
def test_the_denoising_stage_bounds_what_the_real_loop_allocates(kontext_dir, placement, monkeypatch):
    """The real sampling loop of the tiny pipeline, run under LiveBytes on the CPU: every storage it creates (the
    modulation table, the streamed blocks' copies, the step's activations) stays within the plan's denoising stage
    above what is always on the device. On the CPU a block is copied in after the previous one has run, so the
    plan's two blocks are an upper bound here; on a GPU the copy overlaps (benchmarks/gpu/memory_gpu.py measures it)."""
    from kontext_rt import load_checks, pipeline
    from kontext_rt.placement import Placement

    pipe = Pipeline.from_pretrained(kontext_dir, placement=placement)
    peaks = []
    loop = pipeline.denoise

    def measured(*args, **kwargs):
        with torch.inference_mode(), memory.LiveBytes() as live:
            out = loop(*args, **kwargs)
        peaks.append(live.peak)
        return out

    monkeypatch.setattr(pipeline, "denoise", measured)
    pipe.generate("x", width=64, height=64, steps=4, seed=0, output="latent")
    p = load_checks.memory_plan(
        detect(kontext_dir),
        pipe.cfg,
        torch.float32,
        False,
        pipe.max_sequence_length,
        (64, 64),
        Placement.parse(placement),
        None,
        4,
    )
    planned = p.stages["denoising step"] - p.resident
    assert 0 < peaks[0] <= planned
    if placement == "offload":  # the streamed copies are real allocations, seen by the trace
        streamed = pipe.transformer.residency.blocks
        assert peaks[0] >= p.table + min(u.nbytes for u in streamed.units)
