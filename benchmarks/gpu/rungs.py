"""The GPU suite's ladder, once: each rung adds one speed option to the rung before it.

A rung is one entry of RUNGS; its place in the tuple is its order. From this table:
  - gpu_suite.py derives its phases (PHASES: a bf16 rung is timed before the FP8 conversion, an FP8 rung after it,
    a compile rung in the compile part) and how it times a rung (the rung's backend and Optimizations pick the op
    table, the denoiser, FP8 and torch.compile);
  - goals() sets the best Kontext step of the rungs that count toward each goal beside GOALS;
  - ladder_table.py renders the README and docs tables in this order, and the table of rungs itself.
A new rung is one entry here (and a run to measure it): the results keep their format, a "ladder" keyed by name.

    python benchmarks/gpu/ladder_table.py --rungs     # the table of rungs, as docs/benchmarks.md shows it
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kontext_rt.options import Attention, Optimizations


@dataclass(frozen=True)
class Goal:
    """A target for an H100, kept in suite.json under goals_h100 by its key."""

    key: str
    target: float  # at most this
    what: str


BF16, FP8, EDIT = "kontext_bf16_ms_per_step", "kontext_fp8_ms_per_step", "edit_28_steps_s"
GOALS = (
    Goal(BF16, 230.0, "ms per Kontext step in bf16: the best rung counting toward it"),
    Goal(FP8, 150.0, "ms per Kontext step with FP8 linears: the best rung counting toward it"),
    Goal(EDIT, 4.5, "seconds for a 28-step edit with the VAE: the best rung that ran the edits"),
)


PARTS = ("core", "torchao", "compile")  # the suite's parts, in the order their rungs are listed


@dataclass(frozen=True)
class Rung:
    """One rung: what a pipeline loads to run it (Pipeline.from_pretrained(backend=..., optimize=...)), what it adds
    to the rung before it, and the step goal its Kontext ms/step counts toward."""

    name: str  # its key in suite.json's "ladder", its phase, its row in the tables
    backend: str  # the op table: "eager" or "triton"
    optimize: Optimizations
    adds: str  # what it adds to the rung before it
    goal: str | None = None  # a Goal's key
    linears: str = "runtime"  # "torchao": the blocks' linears quantized by torchao instead (a comparison rung)

    @property
    def fp8(self) -> bool:
        return self.optimize.fp8 is not None or self.linears == "torchao"

    @property
    def part(self) -> str:
        """The gpu_suite part that times it: "compile" (its own process, last) for torch.compile, "torchao" (its own
        process, opt-in) for torchao's linears, else "core"."""
        if self.optimize.compile:
            return "compile"
        return "torchao" if self.linears == "torchao" else "core"

    @property
    def fa3(self) -> bool:
        """Whether it runs FlashAttention-3 (attention fa3 or fa3-fp8): the suite probes FA3 first."""
        return self.optimize.attention in (Attention.FA3, Attention.FA3_FP8)

    def needs(self) -> list[str]:
        """The suite phases it needs: the model in the state it measures (and FA3 probed, for an FA3 rung)."""
        probe = ["fa3-probe"] * self.fa3
        if self.optimize.compile:
            return ["compile-blocks", *probe]
        if self.linears == "torchao":
            return ["torchao-convert"]
        if self.fp8:
            return ["fp8-convert", *probe]
        return ["model"] + (["triton-backend"] if self.backend == "triton" else []) + probe

    def settings(self) -> str:
        """backend= and optimize= as a pipeline is loaded with them (the options left at their defaults unsaid)."""
        if self.linears == "torchao":
            return "not a pipeline option: torchao.quantize_ on the blocks' linears, for comparison"
        changed = [
            f"{f.name}={getattr(self.optimize, f.name)!r}"
            for f in dataclasses.fields(Optimizations)
            if getattr(self.optimize, f.name) != f.default
        ]
        return f"backend={self.backend!r}, optimize=Optimizations({', '.join(changed)})"


RUNGS = (
    Rung(
        "eager",
        "eager",
        Optimizations(hoist=False),
        "the reference ops (torch), each step's modulation computed inside the step",
    ),
    Rung(
        "triton",
        "triton",
        Optimizations(hoist=False),
        "the Triton kernels: norm+RoPE (then SDPA), modulation, row-invariant linears",
        BF16,
    ),
    Rung("hoisted", "triton", Optimizations(), "every step's modulation computed once, before the loop", BF16),
    Rung(
        "graphs",
        "triton",
        Optimizations(cuda_graphs=True),
        "one CUDA graph per shape bucket, replayed each step",
        BF16,
    ),
    Rung(
        "fa3",
        "triton",
        Optimizations(cuda_graphs=True, attention="fa3"),
        "FlashAttention-3's bf16 forward after the attention pre-pass (norm, RoPE, FA3's layout in one kernel), "
        "in place of the norm+RoPE kernel and SDPA",
        BF16,
    ),
    Rung(
        "fp8",
        "triton",
        Optimizations(cuda_graphs=True, fp8="dynamic"),
        "the blocks' linears in FP8 e4m3 (torch._scaled_mm, per-token activation scales)",
        FP8,
    ),
    Rung(
        "fp8-attention",
        "triton",
        Optimizations(cuda_graphs=True, fp8="dynamic", attention="fa3-fp8"),
        "attention in FP8 too: the pre-pass quantizes q, k, v per (batch, head), then FA3's FP8 forward",
        FP8,
    ),
    Rung(
        "torchao-fp8",
        "triton",
        Optimizations(cuda_graphs=True),
        "torchao 0.18's float8 dynamic row-wise linears (flux-fast's) in place of the runtime's FP8 linears, "
        "graphs as the fp8 rung; its own process, opt-in (--only torchao)",
        FP8,
        linears="torchao",
    ),
    Rung(
        "compile",
        "triton",
        Optimizations(cuda_graphs=True, fp8="dynamic", compile=True),
        "torch.compile of each block (inductor), in its own process, last",
        FP8,
    ),
)
BY_NAME = {r.name: r for r in RUNGS}


def check(rungs: tuple[Rung, ...]) -> None:
    """What the suite's phases assume of the table: the model is changed in place, once per part (bf16 rungs, then
    FP8 ones; the compile part after the core), and only what Optimizations allows."""
    names = [r.name for r in rungs]
    if len(set(names)) != len(names):
        raise ValueError(f"rung names repeat: {names}")
    keys = {g.key for g in GOALS}
    for r in rungs:
        if r.backend not in ("eager", "triton"):
            raise ValueError(f"rung {r.name!r}: backend {r.backend!r} is not one the suite runs (eager, triton)")
        if r.goal is not None and r.goal not in keys:
            raise ValueError(f"rung {r.name!r}: goal {r.goal!r} is none of {sorted(keys)}")
        if r.optimize.cuda_graphs and not r.optimize.hoist:
            raise ValueError(f"rung {r.name!r}: cuda_graphs replays the hoisted step, it needs hoist=True")
        if r.linears not in ("runtime", "torchao"):
            raise ValueError(f"rung {r.name!r}: linears {r.linears!r} is not runtime or torchao")
        if r.linears == "torchao" and (r.optimize.fp8 is not None or r.optimize.compile):
            raise ValueError(f"rung {r.name!r}: torchao's linears stand in for the runtime's FP8, uncompiled")
        if r.optimize.fp8 is not None and r.optimize.fp8 != "dynamic":
            raise ValueError(f"rung {r.name!r}: the suite has no calibration file, only fp8='dynamic' runs")
    order = [(PARTS.index(r.part), r.fp8) for r in rungs]
    if order != sorted(order):
        raise ValueError(f"rungs out of order: core, torchao, compile; bf16 before fp8 within each ({names})")
    if len({r.fp8 for r in rungs if r.part == "compile"}) > 1:
        raise ValueError("the compile part converts its model once: its rungs are all FP8 or all bf16")


check(RUNGS)


def rungs(part: str | None = None, fp8: bool | None = None) -> list[Rung]:
    """The rungs of a suite part, and of one precision, in order."""
    return [r for r in RUNGS if part in (None, r.part) and fp8 in (None, r.fp8)]


def ordered(names) -> list[str]:
    """Rung names in the table's order; names the table no longer has (an older run's) after them, as given."""
    names = list(dict.fromkeys(names))
    return [r.name for r in RUNGS if r.name in names] + [n for n in names if n not in BY_NAME]


def goals(result: dict) -> dict:
    """suite.json's goals_h100 from its ladder and edits: each step goal's best Kontext ms/step among the rungs that
    count toward it, the fastest 28-step edit, and whether each rung beat diffusers."""
    lad, e2e = result["ladder"], result["end_to_end_s"]

    def best(goal):
        ran = [r.name for r in RUNGS if r.goal == goal and "kontext" in lad.get(r.name, {})]
        return min((lad[name]["kontext"]["ms_per_step"] for name in ran), default=None)

    edit = min((v["28"] for v in e2e.values() if "28" in v), default=None)
    base = result.get("diffusers", {}).get("kontext", {}).get("ms_per_step")
    faster = {r: lad[r]["kontext"]["ms_per_step"] < base for r in lad if "kontext" in lad[r]} if base else None
    return {
        "targets": {g.key: g.target for g in GOALS},
        **{g.key: edit if g.key == EDIT else best(g.key) for g in GOALS},
        "faster_than_diffusers": faster,
        "note": "the targets are for an H100; compare only on the device named",
    }
