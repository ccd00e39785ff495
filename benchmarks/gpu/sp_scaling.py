"""A model of one Kontext step on N GPUs under Ulysses sequence parallelism (kontext_rt.model.ulysses), from the
single-GPU figures of a committed run and the bytes the all-to-alls move: docs/python-api.md's scaling table.

    python benchmarks/gpu/sp_scaling.py benchmarks/results/h200-2026-11-28-8fc0047 [--rung fp8] [--json F]

Per block and rank (bytes each rank sends; B batch, H heads of D, e bytes per element, T text and L image tokens,
L_r this rank's shard of contiguous image tokens, h = H / N heads per rank), as UlyssesAttention moves them:

    q, k, v to head shards    3 * B * h * L_r * D * e * (N - 1)      (its tokens, every other rank's heads)
    outputs back to tokens    B * h * (L - L_r) * D * e              (its heads, every other rank's tokens)
    text outputs, all-gather  B * T * h * D * e * (N - 1)            (its heads of the replicated text stream)

so with even shards 4 * B * H * L * D * e * (N - 1) / N^2 + B * T * H * D * e * (N - 1) / N per block, over the
19 + 38 blocks, plus one gather of the target velocity per step. tests/test_sp_scaling.py counts what the real
attention sends on gloo ranks against this formula.

Time: T_N = T_1 * (r + (1 - r) / N) + blocks * (bytes / link + 3 * latency). r is the share of the step's FLOPs that
every rank repeats (the text tokens' linears: the text stream is replicated; attention splits by heads, the image
tokens' linears by tokens), taking the step's time to split as its FLOPs do (one rate for linears and attention: an
approximation). Communication is not overlapped with compute (an upper bound; NCCL on its own stream can hide part
of it). The links: NVLink 4 on an H100 SXM, 450 GB/s per direction per GPU (900 GB/s both ways, NVIDIA's figure),
and PCIe Gen5 x16, 64 GB/s per direction (nominal); the per-collective latency 20 us. The single-GPU step and the
edit's VAE time come from the given run (an H200's: the H100 SXM's own figures are owed by a GPU run). A model,
not a measurement: docs/python-api.md says so beside its table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

LINKS_GBS = {"NVLink 4 (H100 SXM)": 450.0, "PCIe Gen5 x16": 64.0}  # per direction per GPU, GB/s
LATENCY_S = 20e-6  # per collective (NCCL on one node: tens of microseconds)
WORLDS = (1, 2, 4, 8)
STEPS = 28


@dataclass(frozen=True)
class Layout:
    text: int = 512
    target: int = 4096
    context: int = 4096
    batch: int = 1
    elem: int = 2  # bf16 activations (the FP8 rungs' attention inputs stay bf16)

    @property
    def image(self) -> int:
        return self.target + self.context


def shards(length: int, world: int) -> list[int]:
    """The runtime's split (model.ulysses.shard_sizes), restated: contiguous, the first length % world larger."""
    base, extra = divmod(length, world)
    return [base + (r < extra) for r in range(world)]


def bytes_per_block(heads: int, head_dim: int, lay: Layout, world: int, rank: int = 0) -> dict:
    """What `rank` sends in one block's attention (the module docstring's three terms)."""
    if world == 1:
        return {"qkv_all_to_all": 0, "out_all_to_all": 0, "text_all_gather": 0}
    h, mine = heads // world, shards(lay.image, world)[rank]
    unit = lay.batch * h * head_dim * lay.elem
    return {
        "qkv_all_to_all": 3 * unit * mine * (world - 1),
        "out_all_to_all": unit * (lay.image - mine),
        "text_all_gather": unit * lay.text * (world - 1),
    }


def replicated_share(cfg, lay: Layout) -> float:
    """The share of a step's FLOPs every rank repeats: the text tokens' linears (suite_parts.step_flops's terms)."""
    from suite_parts import step_flops

    c, mlp = cfg.hidden_size, cfg.mlp_hidden
    per_text_token = cfg.depth * 2 * (3 * c * c + c * c + 2 * c * mlp) + cfg.depth_single_blocks * 2 * (
        c * (3 * c + mlp) + (c + mlp) * c
    )
    return lay.batch * lay.text * per_text_token / (lay.batch * step_flops(cfg, lay.text, lay.target, lay.context))


def model(cfg, step_ms: float, vae_s: float, lay: Layout = Layout()) -> list[dict]:
    """One row per link and world size: bytes, communication and step time, speed-up, a 28-step edit."""
    blocks = cfg.depth + cfg.depth_single_blocks
    r = replicated_share(cfg, lay)
    rows = []
    for link, gbs in LINKS_GBS.items():
        for n in WORLDS:
            sent = blocks * sum(bytes_per_block(cfg.num_heads, cfg.head_dim, lay, n).values())
            sent += (n > 1) * lay.batch * lay.target * 64 * 4 * (n - 1) // n  # the velocity gather, float32
            comm_ms = 1e3 * (sent / (gbs * 1e9) + (n > 1) * (3 * blocks + 1) * LATENCY_S)
            step = step_ms * (r + (1 - r) / n) + comm_ms
            rows.append(
                {
                    "link": link,
                    "gpus": n,
                    "sent_mb_per_step": sent / 1e6,
                    "comm_ms_per_step": comm_ms,
                    "step_ms": step,
                    "speedup": step_ms / step,
                    "edit_28_s": STEPS * step / 1e3 + vae_s,
                }
            )
    return rows


def inputs(folder: Path, rung: str) -> dict:
    """The run's single-GPU step (the rung's Kontext ms/step) and its edit's time outside the loop (the 28-step
    edit less 28 steps: the VAE encode and decode)."""
    suite = json.loads((folder / "suite.json").read_text())
    compiled = folder / "suite-compile.json"
    ladder = {**suite["ladder"], **(json.loads(compiled.read_text())["ladder"] if compiled.exists() else {})}
    step_ms = ladder[rung]["kontext"]["ms_per_step"]
    edit_rung = rung if rung in suite["end_to_end_s"] else "fp8"
    edit = suite["end_to_end_s"][edit_rung]["28"]
    vae_s = max(edit - STEPS * ladder[edit_rung]["kontext"]["ms_per_step"] / 1e3, 0.0)
    return {"device": suite["device"], "rung": rung, "step_ms": step_ms, "vae_s": vae_s, "folder": folder.name}


def render(found: dict, rows: list[dict]) -> str:
    lines = [
        "| link | GPUs | MB sent per step per GPU | comm ms/step | step ms | speed-up | 28-step edit, s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['link']} | {r['gpus']} | {r['sent_mb_per_step']:.0f} | {r['comm_ms_per_step']:.1f} | "
            f"{r['step_ms']:.1f} | {r['speedup']:.2f} | {r['edit_28_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    from kontext_rt.config import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a GPU results folder (benchmarks/results/...)")
    ap.add_argument("--rung", default="fp8", help="the single-GPU rung the model starts from (default fp8)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    cfg = PRESETS["flux-kontext-dev"]
    found = inputs(args.folder, args.rung)
    rows = model(cfg, found["step_ms"], found["vae_s"])
    print(
        f"From {found['folder']} ({found['device']}, rung {found['rung']}: {found['step_ms']:.1f} ms/step, "
        f"{found['vae_s']:.2f} s of VAE per edit); replicated share {replicated_share(cfg, Layout()):.3f}"
    )
    print(render(found, rows))
    if args.json:
        args.json.write_text(json.dumps({"inputs": found, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
