"""Compile the Triton kernels for NVIDIA GPUs without one (ahead of time, to cubin with the ptxas that ships with
triton) and report each compile's registers and spill bytes, as JSON on stdout.

Run as `python -m tests.aot_compile` in a process without TRITON_INTERPRET (the interpreter replaces the kernels
with Python functions that cannot be compiled); tests/test_kernel_compile.py does so.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def resource_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(
        item.split(":")
        for line in text.splitlines()
        if "REG:" in line
        for item in line.split()
        if ":" in item and item.split(":")[1].isdigit()
    )
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["STACK"])}


def fp32_divisions(ptx: str) -> dict:
    """How each float32 division was lowered: `div.rn.f32` is IEEE (torch's tensor-by-tensor `/`), `div.full.f32`
    and `div.approx.f32` are approximate (Triton's default for `/` on float32)."""
    return {kind: len(re.findall(rf"\bdiv\.{kind}(\.ftz)?\.f32\b", ptx)) for kind in ("rn", "full", "approx")}


def global_accesses(ptx: str) -> dict:
    """The PTX's global loads and stores by form, e.g. {"ld.global.v4.b32": 16, "st.global.b16": 64}: a `.v4.b32`
    moves 16 bytes per instruction, a `.b16` two."""
    return dict(collections.Counter(re.findall(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx)))


# Arguments the JIT would specialize as divisible by 16 at FLUX's shapes (pointers from torch's allocator, strides
# of head_dim-128 rows): compiled so, a kernel's loads can vectorize as they will on the device.
ALIGNED = {
    "qk_norm_rope D=128": (
        *("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "qs0_ptr", "qs1_ptr", "ks0_ptr", "ks1_ptr", "cos_ptr"),
        *("sin_ptr", "stride_qb", "stride_qh", "stride_ql", "stride_kb", "stride_kh", "stride_kl"),
    ),
}
PREPASS_ALIGNED = (
    *("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_out_ptr", "v_out_ptr", "qs0_ptr", "qs1_ptr", "ks0_ptr", "ks1_ptr"),
    *("cos_ptr", "sin_ptr", "amax_ptr", "col_ptr", "mean_ptr", "stride_qb", "stride_qh", "stride_ql", "stride_kb"),
    *("stride_kh", "stride_kl", "stride_vb", "stride_vh", "stride_vl"),
)


GELU_QUANT_ALIGNED = ("attn_ptr", "mlp_ptr", "q_ptr", "scale_ptr", "A", "M", "stride_ar", "stride_mr")


def aligned(name: str) -> tuple:
    if name.startswith("gelu_quant"):
        return GELU_QUANT_ALIGNED
    return PREPASS_ALIGNED if name.startswith("attention_prepass") else ALIGNED.get(name, ())


def compile_kernel(kernel, types: dict, constexprs: dict, warps: int, stages: int, arch: int, aligned=()) -> dict:
    """types: triton type strings for pointer and float arguments; other runtime arguments are i32. aligned: the
    arguments to compile as divisible by 16."""
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in aligned}
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=target,
        options={"num_warps": warps, "num_stages": stages},
    )
    ptx = compiled.asm["ptx"]
    return resource_usage(compiled.asm["cubin"]) | {
        "arch": arch,
        "warps": warps,
        "stages": stages,
        "wgmma": "wgmma" in ptx,
        "fp32_div": fp32_divisions(ptx),
        "global_accesses": global_accesses(ptx),
    }


def jobs():
    from kontext_rt.kernels import fp8_quant, modulation, qk_norm_rope, rope_attention, row_linear

    def attention_types(dt):
        ptrs = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "qs0_ptr", "qs1_ptr", "ks0_ptr", "ks1_ptr")
        return {p: f"*{dt}" for p in ptrs} | {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "qk_scale": "fp32", "eps": "fp32"}

    kernel = rope_attention._rope_attention_kernel
    for d, table in rope_attention.GPU_CONFIGS.items():
        for fused in (True, False):
            for bm, bn, w, s in table if d == 128 else table[:1]:  # every tuned config at FLUX's head dim
                const = dict(HALF=d // 2, NORM=fused, ROPE=fused, DOT_FP32=False, BLOCK_M=bm, BLOCK_N=bn)
                name = f"rope_attention D={d} fused={fused} {bm}x{bn} w{w} s{s}"
                yield name, kernel, attention_types("bf16"), const, w, s, 90
    const = dict(HALF=64, NORM=True, ROPE=True, DOT_FP32=False, BLOCK_M=128, BLOCK_N=32)
    yield "rope_attention D=128 fused sm_80", kernel, attention_types("bf16"), const, 8, 3, 80
    yield "rope_attention D=128 fused fp32", kernel, attention_types("fp32"), const | {"DOT_FP32": True}, 8, 2, 90

    types = {
        p: "*bf16" for p in ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "qs0_ptr", "qs1_ptr", "ks0_ptr", "ks1_ptr")
    } | {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "eps": "fp32"}
    yield (
        "qk_norm_rope D=128",
        qk_norm_rope._qk_norm_rope_kernel,
        types,
        dict(HALF=64, BLOCK=qk_norm_rope.BLOCK_L_GPU),
        4,
        1,
        90,
    )
    block = triton.next_power_of_2(3072)
    types = {p: "*bf16" for p in ("x_ptr", "shift_ptr", "scale_ptr", "gate_ptr", "y_ptr", "out_ptr")} | {"eps": "fp32"}
    yield "modulate C=3072", modulation._modulate_kernel, types, dict(BLOCK_C=block), modulation._warps(block), 1, 90
    yield (
        "gated_residual C=3072",
        modulation._gated_residual_kernel,
        types,
        dict(BLOCK_C=block),
        modulation._warps(block),
        1,
        90,
    )

    # the launchers' own constexprs and warps, at FLUX's widest rows (K = 12288 for linear2)
    for dt in ("bf16", "fp32"):
        types = {"x_ptr": f"*{dt}", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "amax_floor": "fp32"}
        block, warps = fp8_quant.launch_config(12288)
        yield f"fp8_quant {dt} K=12288", fp8_quant._quantize_rows_kernel, types, dict(BLOCK_K=block), warps, 1, 90
        types = {p: f"*{dt}" for p in ("x_ptr", "w_ptr", "b_ptr", "out_ptr")}
        const = dict(
            HAS_BIAS=True,
            INTERPRET=False,
            IEEE=dt == "fp32",
            BLOCK_M=row_linear.BLOCK_M,
            BLOCK_N=row_linear.BLOCK_N,
            BLOCK_K=row_linear.BLOCK_K,
        )
        yield (
            f"row_linear {dt}",
            row_linear._row_linear_kernel,
            types,
            const,
            row_linear.NUM_WARPS,
            row_linear.NUM_STAGES,
            90,
        )


def gelu_quant_jobs():
    """The fused GELU + cat + e4m3 quantizer with its launcher's constexprs at FLUX's single block widths (A = 3072,
    M = 12288; A = 0 is the same binary), sm_90 only: its output is e4m3, which Triton has no type for before
    sm_89, and the FP8 path it feeds (_scaled_mm row-wise) is Hopper's."""
    from kontext_rt.kernels import gelu_quant

    block, warps = gelu_quant.launch_config(3072, 12288)
    for dt in ("bf16", "fp32"):
        types = {"attn_ptr": f"*{dt}", "mlp_ptr": f"*{dt}", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
        types |= {"amax_floor": "fp32"}
        const = dict(BLOCK=block, INTERPRET=False)
        yield f"gelu_quant {dt} A=3072 M=12288", gelu_quant._gelu_quant_kernel, types, const, warps, 1, 90


def prepass_jobs():
    """The pre-pass's three kernels with its launcher's constexprs, at FLUX's head dim, bf16 in: the write pass
    plain and in its heaviest mode, the statistics pass and its reduction. fp8 on sm_90 only: Triton has no e4m3
    (fp8e4nv) before sm_89, and FA3's FP8 forward is Hopper's; sm_80 compiles the bf16 modes with smooth_k."""
    from kontext_rt.kernels import prepass

    io = ("q_ptr", "k_ptr", "v_ptr", "qs0_ptr", "qs1_ptr", "ks0_ptr", "ks1_ptr")
    f32 = ("cos_ptr", "sin_ptr", "amax_ptr", "col_ptr", "mean_ptr", "qd_ptr", "kd_ptr", "vd_ptr")
    for arch, fp8 in ((90, True), (80, False)):
        out = "*fp8e4nv" if fp8 else "*bf16"
        types = {p: "*bf16" for p in io} | {p: "*fp32" for p in f32} | {"eps": "fp32"}
        plain = types | {p: "*bf16" for p in ("q_out_ptr", "k_out_ptr", "v_out_ptr")}
        types |= {p: out for p in ("q_out_ptr", "k_out_ptr", "v_out_ptr")}
        mode = "fp8 smooth_k" if fp8 else "smooth_k"
        flags = dict(HALF=64, FP8=fp8, SMOOTH=True)
        const = dict(HALF=64, FP8=False, SMOOTH=False, BLOCK=prepass.BLOCK_L_GPU)
        yield f"attention_prepass write plain sm_{arch}", prepass._write_kernel, plain, const, 4, 1, arch
        const = flags | dict(BLOCK=prepass.BLOCK_L_GPU)
        yield f"attention_prepass write {mode} sm_{arch}", prepass._write_kernel, types, const, 4, 1, arch
        yield f"attention_prepass stats {mode} sm_{arch}", prepass._stats_kernel, types, const, 4, 1, arch
        const = flags | dict(BLOCK_T=prepass.BLOCK_PARTIALS, K_DTYPE=triton.language.bfloat16)
        yield f"attention_prepass finalize {mode} sm_{arch}", prepass._finalize_kernel, types, const, 4, 3, arch


def main() -> int:
    selected = sys.argv[1] if len(sys.argv) > 1 else ""  # a name prefix, to compile a few kernels by hand
    results = {
        name: compile_kernel(kernel, types, const, w, s, arch, aligned(name))
        for name, kernel, types, const, w, s, arch in (*jobs(), *gelu_quant_jobs(), *prepass_jobs())
        if name.startswith(selected)
    }
    json.dump(results, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
