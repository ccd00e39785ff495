"""The kernel benchmark cases and their roofline units: shared by the pytest-benchmark files
(bench_rope_attention.py, bench_qk_norm_rope.py, bench_modulation.py) and the one-call GPU script
(kernels_gpu.py), so both time exactly the same calls (with benchmarks/timing.py, the benchmarks' one timer).

FLUX.1 shapes: B=1, H=24, D=128, width C=3072, bf16. L = 512 text + 4096 target (+ 4096 per 1024x1024 context):
4608 text-to-image, 8704 one context image, 12800 two.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the timer, by plain name
from timing import time_ms  # noqa: E402

LENGTHS = {"text-to-image": 4608, "one-context": 8704, "two-contexts": 12800}
TEXT = 512
HEADS, HEAD_DIM, WIDTH = 24, 128, 3072


def attention_flops(batch, heads, length, head_dim) -> float:
    """Two (L x L x D) products per head, non-causal: 4 * B * H * L^2 * D."""
    return 4.0 * batch * heads * length**2 * head_dim


def attention_inputs(length, device, dtype=torch.bfloat16, batch=1, heads=HEADS, head_dim=HEAD_DIM, text=TEXT, seed=0):
    """q, k, v as strided views of one qkv projection, norm scales, the split, and real FLUX RoPE tables."""
    from kontext_rt.config import infer_axes_dim
    from kontext_rt.model.rope import rope_table, sequence_ids

    gen = torch.Generator(device="cpu").manual_seed(seed)
    image = length - text
    if image <= 0:
        raise ValueError(f"length {length} leaves no image tokens after {text} text tokens")
    grids = [(64, 64)] * (image // 4096) if image % 4096 == 0 else [(1, image)]  # 1024x1024 images, or one row
    cos, sin = rope_table(sequence_ids(text, grids), infer_axes_dim(head_dim), 10_000)
    qkv = torch.randn(batch, length, 3, heads, head_dim, generator=gen).to(device, dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scales = [(2 + 0.5 * torch.randn(head_dim, generator=gen)).to(device, dtype) for _ in range(4)]
    return q, k, v, (scales[0], scales[1]), (scales[2], scales[3]), text, cos.to(device), sin.to(device)


def norm_rope_bytes(q, cos) -> int:
    """Read q and k, write them back, read the cos/sin tables."""
    return 4 * q.numel() * q.element_size() + 2 * cos.numel() * cos.element_size()


def rows_inputs(length, device, dtype=torch.bfloat16, batch=1, width=WIDTH, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, length, width, generator=gen).to(device, dtype)
    y = torch.randn(batch, length, width, generator=gen).to(device, dtype)
    shift, scale, gate = (0.5 * torch.randn(batch, 1, 3 * width, generator=gen)).to(device, dtype).chunk(3, -1)
    return x, y, shift, scale, gate


def eager_attention(q, k, v, q_scales, k_scales, split, cos, sin, backend=None):
    """The eager op (torch norm + RoPE, SDPA, transpose), optionally pinned to one SDPA backend."""
    from kontext_rt.kernels import reference

    q, k = reference.qk_norm_rope(q, k, q_scales, k_scales, split, cos, sin)
    return sdpa(q, k, v, backend)


def sdpa(q, k, v, backend=None):
    if backend is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def copy_bandwidth_gbs(device, nbytes=1 << 30) -> float:
    """Measured device-to-device copy rate (read + write), the memory floor the elementwise kernels are held to."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9
