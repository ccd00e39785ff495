"""The scaling model of sequence parallelism (benchmarks/gpu/sp_scaling.py): its bytes are what the runtime's
Ulysses attention sends, counted on gloo ranks (a spy on the collectives, uneven shards), and its table runs from
the committed GPU results; docs/python-api.md shows that table."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests import bench_scripts
from tests.test_sequence_parallel import CFG

WORLD, TEXT, IMAGE = 3, 7, 41  # 41 image tokens: shards 14, 14, 13


def _count(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: one UlyssesAttention call on every group it is in, the bytes it sends to other ranks counted."""
    from kontext_rt.model.op_table import EAGER_OPS
    from kontext_rt.model.ulysses import UlyssesAttention, shard_sizes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sent = {}
        real_a2a, real_gather = dist.all_to_all_single, dist.all_gather

        def all_to_all_single(out, inp, out_splits=None, in_splits=None, group=None):
            me = dist.get_rank(group)
            rows = inp.shape[0] // sum(in_splits) if in_splits else 0
            per_row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
            mine = in_splits[me] * rows * per_row if in_splits else 0
            sent["a2a"] = sent.get("a2a", 0) + inp.numel() * inp.element_size() - mine
            return real_a2a(out, inp, out_splits, in_splits, group=group)

        def all_gather(parts, y, group=None):
            sent["gather"] = sent.get("gather", 0) + y.numel() * y.element_size() * (dist.get_world_size(group) - 1)
            return real_gather(parts, y, group=group)

        dist.all_to_all_single, dist.all_gather = all_to_all_single, all_gather
        groups = {n: dist.new_group(list(range(n))) for n in (2, WORLD)}
        found = {}
        for n, group in groups.items():
            if rank >= n:
                continue
            sizes = shard_sizes(IMAGE, n)
            sent.clear()
            gen = torch.Generator().manual_seed(rank)
            heads, d = CFG.num_heads, CFG.head_dim
            q, k, v = (torch.randn(1, heads, TEXT + sizes[rank], d, generator=gen) for _ in range(3))
            ones = (torch.ones(d), torch.ones(d))
            angles = torch.zeros(TEXT + IMAGE, d // 2)
            UlyssesAttention(EAGER_OPS.attention, group, TEXT, sizes)(
                q, k, v, ones, ones, TEXT, angles.cos(), angles.sin()
            )
            found[n] = dict(sent)
        torch.save(found, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_models_bytes_are_what_the_attention_sends(tmp_path):
    sp = bench_scripts.load("gpu/sp_scaling.py")
    mp.spawn(_count, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    lay = sp.Layout(text=TEXT, target=IMAGE, context=0, elem=4)  # float32 here
    for rank in range(WORLD):
        found = torch.load(tmp_path / f"{rank}.pt")
        for n, sent in found.items():
            want = sp.bytes_per_block(CFG.num_heads, CFG.head_dim, lay, n, rank)
            assert sent["a2a"] == want["qkv_all_to_all"] + want["out_all_to_all"], (n, rank)
            assert sent["gather"] == want["text_all_gather"], (n, rank)


def test_the_table_runs_from_the_committed_results_and_the_docs_show_it():
    sp = bench_scripts.load("gpu/sp_scaling.py")
    from kontext_rt.config import PRESETS

    folder = bench_scripts.BENCH / "results" / "h200-2026-11-28-8fc0047"
    found = sp.inputs(folder, "fp8")
    suite = json.loads((folder / "suite.json").read_text())
    assert found["step_ms"] == suite["ladder"]["fp8"]["kontext"]["ms_per_step"]
    rows = sp.model(PRESETS["flux-kontext-dev"], found["step_ms"], found["vae_s"])
    one = [r for r in rows if r["gpus"] == 1]
    assert all(r["step_ms"] == found["step_ms"] and r["sent_mb_per_step"] == 0 for r in one)
    assert all(abs(r["edit_28_s"] - suite["end_to_end_s"]["fp8"]["28"]) < 1e-9 for r in one)  # its own inputs back
    page = (bench_scripts.BENCH.parent / "docs" / "python-api.md").read_text()
    missing = [line for line in sp.render(found, rows).splitlines() if line.startswith("| ") and line not in page]
    assert not missing, missing
