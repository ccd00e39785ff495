"""What one transformer forward asks of a GPU, counted on the meta device: a count, never a timing.

    python benchmarks/gpu/op_traffic.py [--out FILE.json] [--preset flux-kontext-dev] [--layout 512 4096 4096]
        [--ops eager|triton] [--fp8] [--hoisted] [--no-diffusers]

The runtime's model (by default the eager op table and the eager rung's per-step forward, its modulation table
made inside) and diffusers' FluxTransformer2DModel are built at full size on the meta device (no memory, no
compute) in bf16, and one forward of each runs under a TorchDispatchMode that sees every aten op with its input
and output shapes, dtypes and strides. --ops triton counts the triton backend's op table (kernels/ops.py): its
ops are torch custom ops (kontext_rt::*) whose fake implementations run on meta tensors, each seen as one op,
counted as one launch that reads its inputs and writes its outputs. --fp8 converts the block linears on the meta
device as the fp8 rungs do (model/fp8_linear.convert with the table's quantize_rows, torch._scaled_mm, whose meta
implementation runs): the weight quantization is load time, not counted. --hoisted counts the hoisted and graphs
rungs' step instead: the modulation table made before the loop (not counted: once per request, for all steps)
and FluxTransformer.velocity given its row, as sampling/denoisers.Hoisted calls it (float32 state in and out).
Per op it tallies:
- matmul FLOPs (2 per multiply-add: mm, addmm, bmm, _scaled_mm and attention) and the bytes the matmuls read
  and write;
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
MODEL_FILE = str(Path("kontext_rt", "model", "transformer.py"))  # the runtime model's lines: paths ending so
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
        """file:line function of the innermost frame outside torch and this script (the model code's line), and
        when that is a helper (an op table's kernel, FP8Linear), " < " the runtime model's line that called it."""
        frame, found = sys._getframe(2), None
        while frame is not None:
            name = frame.f_code.co_filename
            if found is None and not name.startswith(TORCH_DIR) and name != __file__:
                found = f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}"
                if name.endswith(MODEL_FILE):
                    return found
            elif found is not None and name.endswith(MODEL_FILE):
                return f"{found} < {frame.f_lineno} {frame.f_code.co_name}"
            frame = frame.f_back
        return found or "the step's caller"  # no model frame: the denoiser's casts (runtime_model's run)

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
        name = func.overloadpacket.__name__  # the op's name in its namespace: aten, or kontext_rt's custom ops
        if func.is_view or name in NO_KERNEL:
            return out
        ins = tensors(list(args) + list(kwargs.values()))
        if name == "copy_" and same_data(args[0], args[1]):
            return out
        flops = 0
        if name in MATMULS and func.namespace == "aten":
            a, b = (args[1], args[2]) if name.startswith("add") or name == "baddbmm" else (args[0], args[1])
            # (.., M, K) @ (.., K, N): 2 * M * K * N per batch; _scaled_mm(q (M, K) e4m3, w.t() (K, N)) too, its
            # scales and bias (keywords) counted among the bytes it reads
            flops = 2 * a.numel() * b.shape[-1]
        self.tally.add(f"{func.namespace}.{name}", ins, tensors(out), flops)
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


def op_table(name: str):
    """The eager table, or the triton backend's (as backends/torch_backends.Triton builds it, without its device
    checks: the kernels are imported, never launched, on meta tensors)."""
    from kontext_rt.model.op_table import EAGER_OPS

    if name == "eager":
        return EAGER_OPS
    from kontext_rt.backends.torch_backends import triton_ops
    from kontext_rt.kernels import ops as kernels

    return triton_ops(kernels)


def runtime_model(cfg, layout, dtype, table: str = "eager", fp8: bool = False, hoisted: bool = False):
    """The runtime's step with op table `table`: the per-step forward (its modulation table for this step
    included), or with `hoisted` the hoisted loop's velocity given one row of a table made before it. The RoPE
    tables are the request's, made before the loop: not counted. fp8: the block linears converted to FP8Linear."""
    from kontext_rt.model import fp8_linear
    from kontext_rt.model.rope import rope_table, sequence_ids
    from kontext_rt.model.transformer import FluxTransformer

    text, target, context = layout
    ops = op_table(table)
    with torch.device("meta"):
        model = FluxTransformer(cfg).to(dtype)
        if fp8:  # weights quantized per output channel at load time (not counted), activations per row at run time
            fp8_linear.convert(model, ops.quantize_rows, matmul=torch._scaled_mm)
        cos, sin = rope_table(sequence_ids(text, grids(target, context)), cfg.axes_dim, cfg.theta)
        img, ctx = (
            torch.empty(1, target, cfg.in_channels, dtype=torch.float32 if hoisted else dtype),
            torch.empty(1, context, cfg.in_channels, dtype=dtype),
        )
        txt, pooled = (
            torch.empty(1, text, cfg.context_in_dim, dtype=dtype),
            torch.empty(1, cfg.vec_in_dim, dtype=dtype),
        )
        t, g = torch.empty(1), torch.empty(1)
        ctx = ctx if context else None
        if hoisted:  # (S=1, B=1, K) -> this step's (B, K) row, as Hoisted takes mods[i]
            mod = model.modulation_table(t[None], g, pooled, ops)[0]
    if hoisted:  # Hoisted.velocity: the float32 state cast to the model dtype, the velocity back to float32
        run = lambda: model.velocity(img.to(dtype), ctx, txt, mod, cos, sin, ops).float()  # noqa: E731
    else:
        run = lambda: model(img, ctx, txt, pooled, t, g, cos, sin, ops)  # noqa: E731
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


def differences(name: str, ours: dict, theirs: dict, tb_s: float, top: int) -> list[dict]:
    """Groups by how many more bytes ours (`name`) moves than theirs (ms at tb_s TB/s: GB per ms), then launches."""
    rows = []
    for k in ours.keys() | theirs.keys():
        a, b = ours.get(k, {"launches": 0, "gb": 0.0}), theirs.get(k, {"launches": 0, "gb": 0.0})
        extra = a["gb"] - b["gb"]
        rows.append(
            {
                "group": k,
                f"{name}_gb": round(a["gb"], 3),
                "diffusers_gb": round(b["gb"], 3),
                "extra_gb": round(extra, 3),
                "extra_ms": round(extra / tb_s, 3),
                f"{name}_launches": a["launches"],
                "diffusers_launches": b["launches"],
            }
        )
    launches = lambda r: -abs(r[f"{name}_launches"] - r["diffusers_launches"])  # noqa: E731
    rows.sort(key=lambda r: (-abs(r["extra_gb"]), launches(r), r["group"]))  # ties by name: one order every run
    return rows[:top]


def sites(tally: Tally, tb_s: float, top: int) -> list[dict]:
    """The largest non-matmul sites of one model: where its bytes go (ms at tb_s TB/s), with the shapes of its
    largest call."""
    rows = [
        {
            "region": k[0],
            "op": k[1],
            "site": k[2],
            "launches": r["launches"],
            "gb": round(r["bytes"] / 1e9, 3),
            "ms": round(r["bytes"] / 1e9 / tb_s, 3),
            "shapes": r["shapes"],
        }
        for k, r in tally.rows.items()
        if r["bytes"]
    ]
    return sorted(rows, key=lambda r: -r["gb"])[:top]


def main(argv=None) -> dict:
    from kontext_rt.config import PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--preset", default="flux-kontext-dev")
    edit = (512, 4096, 4096)  # text, target, context tokens: a 1024x1024 edit of a 1024x1024 image
    p.add_argument("--layout", type=int, nargs=3, default=edit, help="text, target, context tokens")
    p.add_argument("--ops", choices=("eager", "triton"), default="eager", help="the runtime's op table")
    p.add_argument("--fp8", action="store_true", help="FP8 block linears (dynamic per-row activations)")
    p.add_argument("--hoisted", action="store_true", help="the hoisted loop's velocity, not the per-step forward")
    p.add_argument("--no-diffusers", action="store_true", help="count the runtime's model only")
    p.add_argument("--copy-tb-s", type=float, default=4.0, help="memory rate for bytes -> ms (H200: about 4)")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    cfg, layout, dtype = PRESETS[args.preset], tuple(args.layout), torch.bfloat16
    name = "-".join([args.ops] + ["fp8"] * args.fp8 + ["hoisted"] * args.hoisted)  # "eager": the default
    tallies = {name: count(*runtime_model(cfg, layout, dtype, args.ops, args.fp8, args.hoisted))}
    if not args.no_diffusers:
        tallies["diffusers"] = count(*diffusers_model(cfg, layout, dtype))
    models = {k: totals(t) | {"by_region": grouped(t, lambda k: k[0])} for k, t in tallies.items()}
    result = {
        "what": "aten and kontext_rt ops of one transformer step counted on meta tensors: bytes, FLOPs and "
        "launches, not a timing (benchmarks/gpu/op_traffic.py)",
        "preset": args.preset,
        "layout": {"text": layout[0], "target": layout[1], "context": layout[2]},
        "dtype": "bfloat16",
        "model": {"ops": args.ops, "fp8": args.fp8, "hoisted": args.hoisted},
        "torch": torch.__version__,
        "copy_tb_s": args.copy_tb_s,
        "models": models,
    }
    print(f"{'model':20} {'matmul TFLOP':>12} {'matmul GB':>10} {'other GB':>9} {'ms':>7} {'launches':>9}")
    for k, m in models.items():
        gb = f"{m['matmul_gb']:10.2f} {m['non_matmul_gb']:9.2f} {m['non_matmul_gb'] / args.copy_tb_s:7.2f}"
        print(f"{k:20} {m['matmul_tflop']:12.2f} {gb} {m['launches']:9}")
    if not args.no_diffusers:
        from diffusers import __version__ as diffusers_version

        extra_gb = models[name]["non_matmul_gb"] - models["diffusers"]["non_matmul_gb"]
        by_op = [grouped(t, lambda k: f"{k[0]} {k[1]}") for t in tallies.values()]
        result |= {
            "diffusers": diffusers_version,
            f"{name}_minus_diffusers": {
                "non_matmul_gb": round(extra_gb, 3),
                "ms_at_copy_rate": round(extra_gb / args.copy_tb_s, 2),  # 1 TB/s moves 1 GB per ms
                "launches": models[name]["launches"] - models["diffusers"]["launches"],
            },
            "by_op": differences(name, by_op[0], by_op[1], args.copy_tb_s, args.top),
        }
        d = result[f"{name}_minus_diffusers"]
        rate = f"{d['ms_at_copy_rate']:+.2f} ms at {args.copy_tb_s} TB/s"
        print(f"{name} - diffusers: {d['non_matmul_gb']:+.2f} GB ({rate}), {d['launches']:+} launches")
    result["sites"] = {k: sites(t, args.copy_tb_s, args.top) for k, t in tallies.items()}
    for r in result["sites"][name][:12]:
        print(f"  {r['region']:7} {r['op']:28} {r['site']:42} {r['gb']:7.2f} GB {r['ms']:6.2f} ms {r['launches']:4}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
