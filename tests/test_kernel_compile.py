"""The kernels compile for the GPUs they are meant for, checked on a machine without one.

The interpreter runs the kernels' Python semantics but never lowers them: layouts, tensor-core shapes and
register allocation are only exercised by compiling. Triton compiles ahead of time for a named target with the
ptxas it ships, so every tuned attention configuration at head dim 128 is compiled for sm_90 (H100/H200), the
other kernels once (fp8_quant and row_linear as their launchers call them), and register spills and the lowering
of float32 divisions are read back from the cubin and the PTX. Compiling also refuses what the interpreter lets
through, such as a plain module global read inside a kernel.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton-cache")), "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.aot_compile"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas to compile NVIDIA targets with")
def test_every_kernel_compiles_for_hopper_and_ampere(compiled):
    from kontext_rt.kernels.rope_attention import GPU_CONFIGS

    assert len([n for n in compiled if n.startswith("rope_attention D=128 fused=")]) == 2 * len(GPU_CONFIGS[128])
    for name in (
        "rope_attention D=128 fused sm_80",
        "qk_norm_rope D=128",
        "modulate C=3072",
        "gated_residual C=3072",
        "fp8_quant bf16 K=12288",
        "fp8_quant fp32 K=12288",
        "row_linear bf16",
        "row_linear fp32",
        "gelu_quant bf16 A=3072 M=12288",
        "gelu_quant fp32 A=3072 M=12288",
    ):
        assert name in compiled
    # Hopper: the attention products run on warpgroup tensor-core instructions
    assert all(
        r["wgmma"]
        for n, r in compiled.items()
        if n.startswith("rope_attention") and r["arch"] == 90 and "fp32" not in n
    )


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas to compile NVIDIA targets with")
def test_each_head_dim_and_mode_has_a_config_without_register_spills(compiled):
    """The autotuner picks among the configs; at least one per head dim and mode must keep everything in
    registers (bf16, sm_90), or the fused RoPE work has outgrown the tile sizes."""
    groups = {}
    for name, r in compiled.items():
        if name.startswith("rope_attention D=") and "fused=" in name:
            groups.setdefault(name.split(" ")[1] + name.split(" ")[2], []).append(r["spill_bytes"])
    assert len(groups) == 6
    assert all(min(spills) == 0 for spills in groups.values()), groups
    for name in (
        "qk_norm_rope D=128",
        "modulate C=3072",
        "gated_residual C=3072",
        "fp8_quant bf16 K=12288",
        "row_linear bf16",
    ):
        assert compiled[name]["spill_bytes"] == 0, (name, compiled[name])


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas to compile NVIDIA targets with")
def test_fp8_quantizer_divides_as_torch_does(compiled):
    """The quantizer claims torch's cast bit for bit, and torch's float32 `/` is IEEE round-to-nearest. Triton
    lowers a plain `/` to the approximate div.full.f32 on the GPU (the interpreter divides exactly, so only the
    compiled PTX shows it): every division in the quantizer must be div.rn."""
    for name in ("fp8_quant bf16 K=12288", "fp8_quant fp32 K=12288"):
        div = compiled[name]["fp32_div"]
        assert div["rn"] > 0 and div["full"] == 0 and div["approx"] == 0, (name, div)


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas to compile NVIDIA targets with")
def test_the_norm_rope_kernel_moves_q_and_k_in_16_byte_accesses(compiled):
    """Memory-bound: its q and k rows must load and store as 16-byte vectors, as the JIT compiles it for aligned
    FLUX tensors. (Loading even and odd columns as strided tiles made every access 2 bytes: 5% of an H200's copy
    rate.) The few 2-byte loads left are the learned scales, read once per program."""
    accesses = compiled["qk_norm_rope D=128"]["global_accesses"]
    assert accesses.get("ld.global.v4.b32", 0) >= 8 and accesses.get("st.global.v4.b32", 0) >= 8, accesses
    assert "st.global.b16" not in accesses and accesses.get("ld.global.b16", 0) <= 4, accesses


PREPASS = [
    *("attention_prepass write plain sm_90", "attention_prepass write fp8 smooth_k sm_90"),
    *("attention_prepass stats fp8 smooth_k sm_90", "attention_prepass finalize fp8 smooth_k sm_90"),
    *("attention_prepass write plain sm_80", "attention_prepass write smooth_k sm_80"),
    *("attention_prepass stats smooth_k sm_80", "attention_prepass finalize smooth_k sm_80"),
]


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas to compile NVIDIA targets with")
def test_the_prepass_compiles_without_spills_and_moves_rows_in_16_byte_accesses(compiled):
    """Memory-bound like the norm+RoPE kernel: every q, k, v row is read as 16-byte vectors in both passes and
    written as 16-byte vectors, bf16 (8 values) or e4m3 (16 values); only the scales are read 2 bytes at a time.
    The fp8 write divides by the descale as torch does (div.rn), as does the reduction for the descales and the
    mean. (fp8 is compiled for sm_90 only: Triton has no e4m3 type before sm_89.)"""
    for name in PREPASS:
        assert compiled[name]["spill_bytes"] == 0, (name, compiled[name])
        accesses = compiled[name]["global_accesses"]
        assert not any(form.endswith((".b8", ".b16", ".u8", ".u16")) for form in accesses if form.startswith("st.")), (
            name,
            accesses,
        )
        assert accesses.get("ld.global.b16", 0) <= 4, (name, accesses)
        if " write " in name or " stats " in name:
            # per thread, a (32, 128) bf16 tile is 4 loads of 16 bytes, cos and sin (32, 64) float32 8 together
            tensors = 1 if name.startswith("attention_prepass stats smooth_k") else 3  # k only, or q, k and v
            assert accesses.get("ld.global.v4.b32", 0) >= 8 + 4 * tensors, (name, accesses)
    for name in PREPASS[:2] + PREPASS[4:6]:
        stores = compiled[name]["global_accesses"].get("st.global.v4.b32", 0)
        assert stores >= (6 if "fp8" in name else 12), (name, stores)  # 32 values per thread per tensor
    for name in ("attention_prepass write fp8 smooth_k sm_90", "attention_prepass finalize fp8 smooth_k sm_90"):
        div = compiled[name]["fp32_div"]
        assert div["rn"] > 0 and div["full"] == 0, (name, div)


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas to compile NVIDIA targets with")
def test_the_gelu_quantizer_compiles_without_spills_divides_as_torch_and_moves_16_byte_vectors(compiled):
    """The fused GELU + cat + e4m3 quantizer (sm_90 only: e4m3). Memory-bound like the quantizer it extends: attn
    and mlp_in rows load as 16-byte vectors in both passes (4 per thread per pass for bf16 at the 4096-wide tile),
    the e4m3 bytes store as 16-byte vectors, and its divisions (scale, quotient) are IEEE div.rn as torch's."""
    for name in ("gelu_quant bf16 A=3072 M=12288", "gelu_quant fp32 A=3072 M=12288"):
        r = compiled[name]
        assert r["spill_bytes"] == 0, (name, r)
        assert r["fp32_div"]["rn"] > 0 and r["fp32_div"]["full"] == 0 and r["fp32_div"]["approx"] == 0, (name, r)
        accesses = r["global_accesses"]
        assert accesses.get("ld.global.v4.b32", 0) >= 8, (name, accesses)
        assert accesses.get("st.global.v4.b32", 0) >= 2, (name, accesses)
        assert not any(f.endswith((".b8", ".b16", ".u8", ".u16")) for f in accesses), (name, accesses)
