"""What every launcher in this package shares: input validation with clear messages, and the interpreter check.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is first imported). Which of the two a kernel object is was fixed when it was decorated, so the check
looks at the kernel, not at the environment.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 128)  # powers of two; D/2 >= 16 is the smallest tl.dot operand


def interpreted(kernel) -> bool:
    """True when `kernel` (a jit function, or an autotuner around one) runs in the Triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    while hasattr(kernel, "fn") and not isinstance(kernel, InterpretedFunction):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device the kernel can run on: CUDA, or the CPU under the interpreter."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all inputs must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not interpreted(kernel):
        raise RuntimeError(
            "Triton kernels need a CUDA device; on the CPU they run only under the Triton "
            "interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"Triton kernels run on CUDA devices, not {device.type}")
    return device


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} is {t.dtype} but the other inputs are {dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` may hold None for a dimension that is free."""
    ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def check_head_dim(d: int) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the Triton kernels (supported: {HEAD_DIMS})")


def check_rope_tables(cos: torch.Tensor, sin: torch.Tensor, length: int, head_dim: int) -> None:
    for name, t in (("cos", cos), ("sin", sin)):
        check_shape(name, t, (length, head_dim // 2))
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (one angle per pair), got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def check_scales(name: str, scales, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair of (D,) contiguous scales (for tokens before the split, and from it on)."""
    if isinstance(scales, torch.Tensor) or len(scales) != 2:
        raise TypeError(f"{name} must be a pair of (D,) tensors (before split, from split on)")
    for i, s in enumerate(scales):
        check_shape(f"{name}[{i}]", s, (head_dim,))
        if not s.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous")
    return scales[0], scales[1]
