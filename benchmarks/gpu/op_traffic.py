"""What one transformer forward asks of a GPU, counted on the meta device: a count, never a timing.

    python benchmarks/gpu/op_traffic.py [--out FILE.json] [--preset flux-kontext-dev] [--layout 512 4096 4096]

The runtime's eager model (the eager op table, the eager rung's per-step modulation) and diffusers'
FluxTransformer2DModel are built at full size on the meta device (no memory, no compute) in bf16, and one
forward of each runs under a TorchDispatchMode that sees every aten op with its input and output shapes,
dtypes and strides. Per op it tallies:
- matmul FLOPs (2 per multiply-add: mm, addmm, bmm and attention) and the bytes the matmuls read and write;
- every other op that launches a kernel: the bytes it reads plus the bytes it writes (distinct elements: a
  broadcast (B, 1, C) operand counts once), what bounds elementwise and norm kernels on a GPU;
- launches: one per kernel op. Views (permute, slice, unflatten...) and empty allocations launch nothing, and
  a copy_ of a tensor onto itself (what `y[idx] *= s` ends with) returns early in aten: none of these count.
Two functions decompose differently on the meta device than on CUDA, so they are caught where Python calls
them and counted as the CUDA kernels they are there (torch 2.11): F.scaled_dot_product_attention as flash or
cuDNN attention (reads q, k, v; writes its output in q's memory layout, as both allocate it; 4 * B * H * Lq *
Lk * D FLOPs) and F.rms_norm as aten._fused_rms_norm (reads x, writes y and one float32 rstd per row; a
non-contiguous x is copied first, as the kernel reads it contiguous). Everything else is aten's own
decomposition, the same on both devices.

Each op is attributed to a region (double block, single block, or outside them) and a site: the innermost line
of model code (not torch's) that called it. Extra bytes turn into ms at --copy-tb-s (an H200 copies about
4 TB/s): a lower bound for memory-bound kernels, not a prediction of the step time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
TORCH_DIR = str(Path(torch.__file__).parent)
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "_scaled_mm"}
# ops that allocate or alias without a kernel (views are found by their schema: OpOverload.is_view)
NO_KERNEL = {"empty", "empty_strided", "empty_like", "_unsafe_view", "lift_fresh", "detach", "alias"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a kernel touches: a stride-0 (broadcast) dim counts once."""
    return math.prod(s for s, st in zip(t.shape, t.stride(), strict=True) if st != 0) * t.element_size()


def tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors(o)]
    return []


def signature(ts: list[torch.Tensor]) -> str:
    return " ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in ts)


def same_data(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """aten's copy_ returns at once when src is dst's very elements (Copy.cpp, is_same_data)."""
    return (
        dst.untyped_storage()._cdata == src.untyped_storage()._cdata  # one storage (meta data_ptrs are all 0)
        and dst.storage_offset() == src.storage_offset()
        and dst.stride() == src.stride()
        and dst.shape == src.shape
        and dst.dtype == src.dtype
    )


class Tally:
    """Per (region, op, site): launches, non-matmul bytes, matmul bytes and FLOPs; the first shapes seen."""

    def __init__(self):
        self.rows: dict[tuple[str, str, str], dict] = defaultdict(
            lambda: {"launches": 0, "bytes": 0, "matmul_bytes": 0, "flops": 0, "largest": 0, "shapes": ""}
        )
        self.region = "outside"

    def site(self) -> str:
        """file:line function of the innermost frame outside torch and this script: the model code's line."""
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if not name.startswith(TORCH_DIR) and name != __file__:
                return f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}"
            frame = frame.f_back
        return "?"

    def add(self, op: str, inputs, outputs, flops: int = 0):
        row = self.rows[(self.region, op, self.site())]
        moved = sum(map(tensor_bytes, inputs)) + sum(map(tensor_bytes, outputs))
        row["launches"] += 1
        row["matmul_bytes" if flops else "bytes"] += moved
        row["flops"] += flops
        if moved > row["largest"]:  # the shapes of the call that moves the most bytes at this site
            row["largest"], row["shapes"] = moved, f"{signature(inputs)} -> {signature(outputs)}"


class AtenOps(TorchDispatchMode):
    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_KERNEL:
            return out
        ins = tensors(list(args) + list(kwargs.values()))
        if name == "copy_" and same_data(args[0], args[1]):
            return out
        flops = 0
        if name in MATMULS:
            a, b = (args[1], args[2]) if name.startswith("add") or name == "baddbmm" else (args[0], args[1])
            flops = 2 * a.numel() * b.shape[-1]  # (.., M, K) @ (.., K, N): 2 * M * K * N per batch
        self.tally.add(f"aten.{name}", ins, tensors(out), flops)
        return out


class CudaKernels(TorchFunctionMode):
    """The two functions whose meta decomposition is not their CUDA kernel, counted as that one kernel."""

    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")  # diffusers passes them by keyword
            q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
            (b, h, lq, d), lk = q.shape, k.shape[-2]
            # flash and cuDNN allocate the output in q's memory layout (empty_like(q), cuDNN's
            # alloc_with_matching_layout): with q in (B, L, H, D) memory the caller's (B, L, H*D) view is free
            out = torch.empty_like(q)
            self.tally.add("sdpa (flash/cuDNN)", [q, k, v], [out], flops=4 * b * h * lq * lk * d)
            return out
        if func is F.rms_norm:
            x = args[0] if args else kwargs["input"]
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            if not x.is_contiguous():  # the CUDA kernel reads a contiguous input (expect_contiguous): a copy
                x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
                self.tally.add("aten.clone (rms_norm input)", [x], [x])
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
            reads = [x] + ([weight] if weight is not None else [])
            self.tally.add("aten._fused_rms_norm", reads, [out, rstd])
            return out
        return func(*args, **kwargs)


def regions(tally: Tally, blocks: dict[str, list[torch.nn.Module]]):
    """Forward hooks that set the tally's region while a block runs."""
    handles = []
    for region, mods in blocks.items():
        for m in mods:
            handles.append(m.register_forward_pre_hook(lambda *_, r=region: setattr(tally, "region", r)))
            handles.append(m.register_forward_hook(lambda *_: setattr(tally, "region", "outside")))
    return handles


@torch.no_grad()
def count(run, blocks) -> Tally:
    tally = Tally()
    handles = regions(tally, blocks)
    try:
        with CudaKernels(tally), AtenOps(tally):
            run()
    finally:
        for h in handles:
            h.remove()
    return tally


def eager_model(cfg, layout, dtype):
    """The runtime's eager step: forward (its modulation table for this step included) with the eager ops. The
    RoPE tables are the request's, made before the loop: not counted."""
    from kontext_rt.model.op_table import EAGER_OPS
    from kontext_rt.model.rope import rope_table, sequence_ids
    from kontext_rt.model.transformer import FluxTransformer

    text, target, context = layout
    with torch.device("meta"):
        model = FluxTransformer(cfg).to(dtype)
        cos, sin = rope_table(sequence_ids(text, grids(target, context)), cfg.axes_dim, cfg.theta)
        img, ctx = (
            torch.empty(1, target, cfg.in_channels, dtype=dtype),
            torch.empty(1, context, cfg.in_channels, dtype=dtype),
        )
        txt, pooled = (
            torch.empty(1, text, cfg.context_in_dim, dtype=dtype),
            torch.empty(1, cfg.vec_in_dim, dtype=dtype),
        )
        t, g = torch.empty(1), torch.empty(1)
    run = lambda: model(img, ctx if context else None, txt, pooled, t, g, cos, sin, EAGER_OPS)  # noqa: E731
    return run, {"double": list(model.double_blocks), "single": list(model.single_blocks)}


def diffusers_model(cfg, layout, dtype):
    """diffusers' forward as the GPU suite's baseline calls it (suite_parts.diffusers_loop): [target |
    context] tokens, ids from the same sequence_ids; it builds its RoPE tables inside the forward: counted."""
    from diffusers import FluxTransformer2DModel

    from kontext_rt.model.rope import sequence_ids
    from kontext_rt.weights.configs import transformer_config_json

    text, target, context = layout
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(transformer_config_json(cfg)).to(dtype)
        ids = sequence_ids(text, grids(target, context))
        hidden = torch.empty(1, target + context, cfg.in_channels, dtype=dtype)
        txt, pooled = (
            torch.empty(1, text, cfg.context_in_dim, dtype=dtype),
            torch.empty(1, cfg.vec_in_dim, dtype=dtype),
        )
        t, g = torch.empty(1), torch.empty(1)
    kwargs = dict(encoder_hidden_states=txt, pooled_projections=pooled, timestep=t, guidance=g)
    kwargs |= dict(img_ids=ids[text:], txt_ids=ids[:text], return_dict=False)
    run = lambda: model(hidden, **kwargs)  # noqa: E731
    return run, {"double": list(model.transformer_blocks), "single": list(model.single_transformer_blocks)}


def grids(target: int, context: int) -> list[tuple[int, int]]:
    side = math.isqrt(target)
    return [(side, target // side)] + ([(side, context // side)] if context else [])


def totals(tally: Tally) -> dict:
    rows = tally.rows.values()
    return {
        "launches": sum(r["launches"] for r in rows),
        "non_matmul_gb": sum(r["bytes"] for r in rows) / 1e9,
        "matmul_gb": sum(r["matmul_bytes"] for r in rows) / 1e9,
        "matmul_tflop": sum(r["flops"] for r in rows) / 1e12,
    }


def grouped(tally: Tally, key) -> dict[str, dict]:
    out: dict[str, dict] = defaultdict(lambda: {"launches": 0, "gb": 0.0})
    for k, r in tally.rows.items():
        out[key(k)]["launches"] += r["launches"]
        out[key(k)]["gb"] += r["bytes"] / 1e9
    return dict(out)


def differences(ours: dict, theirs: dict, tb_s: float, top: int) -> list[dict]:
    """Groups by how many more bytes ours moves than theirs (ms at tb_s TB/s: GB per ms), then launches."""
    rows = []
    for k in ours.keys() | theirs.keys():
        a, b = ours.get(k, {"launches": 0, "gb": 0.0}), theirs.get(k, {"launches": 0, "gb": 0.0})
        extra = a["gb"] - b["gb"]
        rows.append(
            {
                "group": k,
                "eager_gb": round(a["gb"], 3),
                "diffusers_gb": round(b["gb"], 3),
                "extra_gb": round(extra, 3),
                "extra_ms": round(extra / tb_s, 3),
                "eager_launches": a["launches"],
                "diffusers_launches": b["launches"],
            }
        )
    rows.sort(key=lambda r: (-abs(r["extra_gb"]), -abs(r["eager_launches"] - r["diffusers_launches"])))
    return rows[:top]


def sites(tally: Tally, top: int) -> list[dict]:
    """The largest non-matmul sites of one model: where its bytes go, with the shapes of its largest call."""
    rows = [
        {
            "region": k[0],
            "op": k[1],
            "site": k[2],
            "launches": r["launches"],
            "gb": round(r["bytes"] / 1e9, 3),
            "shapes": r["shapes"],
        }
        for k, r in tally.rows.items()
        if r["bytes"]
    ]
    return sorted(rows, key=lambda r: -r["gb"])[:top]


def main(argv=None) -> dict:
    from diffusers import __version__ as diffusers_version

    from kontext_rt.config import PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--preset", default="flux-kontext-dev")
    edit = (512, 4096, 4096)  # text, target, context tokens: a 1024x1024 edit of a 1024x1024 image
    p.add_argument("--layout", type=int, nargs=3, default=edit, help="text, target, context tokens")
    p.add_argument("--copy-tb-s", type=float, default=4.0, help="memory rate for bytes -> ms (H200: about 4)")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    cfg, layout, dtype = PRESETS[args.preset], tuple(args.layout), torch.bfloat16
    tallies = {
        "eager": count(*eager_model(cfg, layout, dtype)),
        "diffusers": count(*diffusers_model(cfg, layout, dtype)),
    }
    models = {name: totals(t) | {"by_region": grouped(t, lambda k: k[0])} for name, t in tallies.items()}
    ms = 1 / args.copy_tb_s  # ms per GB at the copy rate (1 TB/s moves 1 GB per ms)
    extra_gb = models["eager"]["non_matmul_gb"] - models["diffusers"]["non_matmul_gb"]
    by_op = [grouped(t, lambda k: f"{k[0]} {k[1]}") for t in tallies.values()]
    result = {
        "what": "aten ops of one transformer forward counted on meta tensors: bytes, FLOPs and launches, "
        "not a timing (benchmarks/gpu/op_traffic.py)",
        "preset": args.preset,
        "layout": {"text": layout[0], "target": layout[1], "context": layout[2]},
        "dtype": "bfloat16",
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "copy_tb_s": args.copy_tb_s,
        "models": models,
        "eager_minus_diffusers": {
            "non_matmul_gb": round(extra_gb, 3),
            "ms_at_copy_rate": round(extra_gb * ms, 2),
            "launches": models["eager"]["launches"] - models["diffusers"]["launches"],
        },
        "by_op": differences(by_op[0], by_op[1], args.copy_tb_s, args.top),
        "sites": {name: sites(t, args.top) for name, t in tallies.items()},
    }
    print(f"{'model':10} {'matmul TFLOP':>12} {'matmul GB':>10} {'other GB':>9} {'launches':>9}")
    for name, m in models.items():
        gb = f"{m['matmul_gb']:10.2f} {m['non_matmul_gb']:9.2f}"
        print(f"{name:10} {m['matmul_tflop']:12.2f} {gb} {m['launches']:9}")
    d = result["eager_minus_diffusers"]
    rate = f"{d['ms_at_copy_rate']:+.2f} ms at {args.copy_tb_s} TB/s"
    print(f"eager - diffusers: {d['non_matmul_gb']:+.2f} GB ({rate}), {d['launches']:+} launches")
    for r in result["by_op"][:12]:
        print(
            f"  {r['group']:40} {r['extra_gb']:+8.2f} GB {r['extra_ms']:+7.2f} ms "
            f"launches {r['eager_launches']:5} vs {r['diffusers_launches']:5}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
