"""FP8 (e4m3) linear layers through torch._scaled_mm, for Hopper GPUs without TensorRT.

The transformer's large linears (each block's qkv, attention output, MLP; the single blocks' linear1/linear2) get
weights quantized once, per output channel; activations are quantized per token at run time (dynamic: the fused
Triton kernel in kontext_rt.kernels.fp8_quant, or reference.quantize_rows in torch), or one static scale per
layer from the export stage's ModelOpt calibration (`kontext-rt export --precision fp8` writes it). Modulation,
norms, embedders and the final layer stay in the model dtype, as in the export recipe (export/fp8.HIGH_PRECISION
gives the reasons; a test keeps the two selections equal).

    y = (q_x * s_x) @ (q_w * s_w).T + b  =  _scaled_mm(q_x, q_w.T, scale_a=s_x (R, 1), scale_b=s_w (1, N)) + b
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn

from kontext_rt.errors import CheckpointError
from kontext_rt.kernels.reference import AMAX_FLOOR, E4M3_MAX, quantize_rows  # the per-row quantizer's reference

E4M3 = torch.float8_e4m3fn
CALIBRATION_FORMAT = "kontext-rt fp8 amax 1"  # the header tag of the export stage's calibration files
FP8_LINEARS = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
    r"|single_blocks\.\d+\.linear[12])$"
)


class Fp8Mode(StrEnum):
    """How FP8 linears scale their activations (Optimizations.fp8, which also takes the strings)."""

    DYNAMIC = "dynamic"  # per token, at run time
    STATIC = "static"  # one calibrated scale per layer (read_calibration)

    def __repr__(self) -> str:  # as the string it stands for: reprs of options (and the docs made from them) read so
        return repr(self.value)


def fp8_eligible(name: str) -> bool:
    """True for the linears that run in FP8 (module names of kontext_rt.model.transformer.FluxTransformer)."""
    return FP8_LINEARS.match(name) is not None


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (R, K) with one calibrated scale (a 0-d float32 tensor): q = e4m3(clamp(x / scale))."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def scaled_mm_dequantized(a, b, *, scale_a, scale_b, bias=None, out_dtype):
    """torch._scaled_mm's contract (row-wise scales, bias, out_dtype) computed from the dequantized operands in
    float32: for a CPU whose torch lacks row-wise scaling (torch 2.11 takes per-tensor scales only there), so the
    FP8 path runs through on a CPU rehearsal. Never the GPU path: it reads the e4m3 operands back at 4x the bytes."""
    y = dequantize(a, scale_a) @ dequantize(b, scale_b)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def matmul_for(device) -> Callable:
    """The FP8 matmul for `device`: torch._scaled_mm on CUDA (Optimizations.check has refused GPUs without FP8
    tensor cores), and on a CPU too where its torch takes row-wise scales; else scaled_mm_dequantized."""
    device = torch.device(device)
    if device.type == "cuda" or rowwise_scaled_mm_works(device):
        return torch._scaled_mm
    return scaled_mm_dequantized


def rowwise_scaled_mm_works(device) -> bool:
    """Whether torch._scaled_mm takes row-wise scales on `device` (CUDA sm_89+ does; CPUs depend on torch)."""
    a = torch.ones(16, 16, device=device).to(E4M3)
    try:
        torch._scaled_mm(
            a,
            a.t(),
            scale_a=torch.ones(16, 1, device=device),
            scale_b=torch.ones(1, 16, device=device),
            out_dtype=torch.bfloat16,
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


class FP8Linear(nn.Module):
    """A linear with an e4m3 weight and per-output-channel scales; activations quantized per token or statically.

    weight (N, K) e4m3, weight_scale (1, N) float32, bias (N,) in the model dtype, input_scale None (dynamic) or a
    0-d float32 (static). `quantize` is the per-row activation quantizer (the Triton kernel or quantize_rows);
    `matmul` is torch._scaled_mm, or scaled_mm_dequantized where a CPU torch lacks row-wise scales.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        quantize: Callable = quantize_rows,
        input_scale: torch.Tensor | None = None,
        matmul: Callable = torch._scaled_mm,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.register_buffer("input_scale", input_scale)
        self.quantize, self.matmul = quantize, matmul

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quantize: Callable = quantize_rows,
        input_amax: torch.Tensor | None = None,
        matmul: Callable = torch._scaled_mm,
    ) -> FP8Linear:
        q, scale = quantize_rows(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        input_scale = None
        if input_amax is not None:
            input_scale = (input_amax.detach().float().reshape(()).clamp(min=AMAX_FLOOR) / E4M3_MAX).to(q.device)
        return cls(q, scale.reshape(1, -1).contiguous(), bias, quantize, input_scale, matmul)

    @property
    def dynamic(self) -> bool:
        """Activations quantized per row at run time (no calibrated input scale)."""
        return self.input_scale is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            q, scale = self.quantize(x2)
        else:
            q = quantize_static(x2, self.input_scale)
            scale = self.input_scale.expand(x2.shape[0], 1).contiguous()
        return self.product(q, scale, x.shape[:-1], x.dtype)

    def product(self, q: torch.Tensor, scale: torch.Tensor, lead: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The layer on an input already quantized: q (R, K) e4m3 and scale (R, 1), R = prod(lead); (*lead, N) in
        dtype. forward's second half, for a caller that quantized the input itself (transformer.gelu_linear)."""
        y = self.matmul(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        mode = Fp8Mode.DYNAMIC if self.input_scale is None else Fp8Mode.STATIC
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={mode}"


def read_calibration(path, fingerprint: str | None) -> dict[str, torch.Tensor]:
    """Input amax per layer name from the export stage's calibration file (safetensors, checked header)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: calibration file not found (made by `kontext-rt export --precision fp8`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a calibration file ({e})") from None
    if meta.get("format") != CALIBRATION_FORMAT:
        raise CheckpointError(f"{path}: not a kontext-rt FP8 calibration file (format {meta.get('format')!r})")
    if fingerprint is not None and meta.get("checkpoint") != fingerprint:
        raise CheckpointError(
            f"{path}: calibrated on another checkpoint ({meta.get('checkpoint')}, this one is "
            f"{fingerprint}): calibrate again with `kontext-rt export --precision fp8`"
        )
    suffix = ".input_quantizer._amax"
    return {k.removesuffix(suffix): v for k, v in tensors.items() if k.endswith(suffix)}


def convert(
    model: nn.Module,
    quantize: Callable = quantize_rows,
    input_amax: dict[str, torch.Tensor] | None = None,
    matmul: Callable = torch._scaled_mm,
    device: torch.device | None = None,
    park: torch.device | None = None,
) -> list[str]:
    """Replace every FP8-eligible nn.Linear by an FP8Linear, in place; returns the converted names.

    input_amax (from read_calibration) makes the activations static; it must cover every eligible layer.
    device: each linear is moved there just before it is quantized (its full-precision copy freed after), so a
    model read into host memory never has more than one full-precision linear on the device. park: where each block
    goes once its linears are quantized (the host memory of blocks streamed from there), so the device never holds
    more than one block's quantized linears either.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and fp8_eligible(n)]
    if not names:
        raise ValueError("the model has no FP8-eligible linear layers")
    if input_amax is not None and (missing := [n for n in names if n not in input_amax]):
        raise CheckpointError(f"the calibration has no input amax for {len(missing)} layers, e.g. {missing[:3]}")
    for k, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        amax = None if input_amax is None else input_amax[name]
        linear = getattr(owner, child)
        if device is not None:
            linear = linear.to(device)
        setattr(owner, child, FP8Linear.from_linear(linear, quantize, amax, matmul))
        block = ".".join(name.split(".")[:2])  # double_blocks.N / single_blocks.N
        if park is not None and (k + 1 == len(names) or not names[k + 1].startswith(block + ".")):
            model.get_submodule(block).to(park)
    return names
