"""The triton backend's attention (Optimizations.attention): SDPA, or FlashAttention-3's forward in bf16 or FP8
after the attention pre-pass. Chosen once, by the backend's check, before any weights are read; the choice
(AttentionChoice) travels in the Accepted and the load builds the op table from it.

FA3 comes from a module outside this package, imported only when asked for: `flash_attn_interface` (Dao-AILab's
hopper/flash_attn_interface.py, as FA3's Hopper builds install it), else `fa3_fwd_interface` (the name the fa3-fwd
wheel is said to use: not yet run on a GPU). Either must have

    flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None)

over (B, L, H, D) tensors (bf16/fp16, or float8_e4m3fn with float32 (B, H) descales), returning out (B, L, H, D)
(bf16 for FP8 inputs), or (out, softmax_lse) as older versions of that interface do.

An explicit fa3 / fa3-fp8 request passes three checks or is an InputError naming the reason:
    model_fits(head_dim, dtype)          head dim 128, a bf16/fp16 model
    device_capable(device)               a CUDA GPU of compute capability 9.0 (FA3 is built for sm_90a)
    import_fa3(import_module)            the module, with its flash_attn_func
    forward_agrees(module, device, fp8)  one tiny forward on the device against SDPA, within the bound derived in
                                         its docstring
The last two take the module and the device as arguments: the CPU tests run them on fake modules.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from kontext_rt.errors import BackendUnavailable, InputError
from kontext_rt.kernels import reference
from kontext_rt.options import Attention

FA3_MODULES = ("flash_attn_interface", "fa3_fwd_interface")
FA3_CAPABILITY = (9, 0)  # FA3's kernels are built for sm_90a (Hopper) only
FA3_HEAD_DIMS = (128,)  # FLUX's; the FA3 builds this runtime carries are compiled for it alone
# auto tries these, in order, before sdpa, on CUDA devices: none today. FA3 (bf16) may come first once a GPU run
# shows it faster than SDPA at FLUX's sequence lengths; fa3-fp8 not without being asked for (lossy)
AUTO_PREFERS: tuple[Attention, ...] = ()
SMOOTH_K = False  # fa3-fp8: k minus its token mean before quantization (docs/quality.md measures both)
PROBE_SHAPE = (1, 48, 2, 128)  # (B, L, H, D) of the probe's forward: two heads, a length no tile divides
E4M3_SUBNORMAL_STEP = 2.0**-9  # the spacing of float8_e4m3fn below its smallest normal, 2^-6


class Fa3Unavailable(BackendUnavailable):
    """FA3 cannot run here; the message says why."""


@dataclass(frozen=True)
class AttentionChoice:
    """What the check chose: the attention that runs, FA3's module and the pre-pass it runs after (None for sdpa),
    and why auto passed over what it prefers."""

    kind: Attention
    module: ModuleType | None = None
    prepass: Callable | None = None
    passed_over: tuple[str, ...] = ()
    smooth_k: bool = SMOOTH_K

    def op(self, sdpa: Callable) -> Callable:
        """The op table's attention for this choice: the backend's own `sdpa`, or FA3 after the pre-pass."""
        if self.kind is Attention.SDPA:
            return sdpa
        fp8 = self.kind is Attention.FA3_FP8
        return functools.partial(fa3_attention, self.module, self.prepass, fp8, fp8 and self.smooth_k)


def fa3_attention(
    module, prepass, fp8: bool, smooth_k: bool, q, k, v, q_scales, k_scales, split, cos, sin
) -> torch.Tensor:
    """Ops.attention through FA3: q, k, v (B, H, L, D) -> the pre-pass (norm, RoPE, (B, L, H, D), e4m3 with fp8)
    -> FA3's forward -> (B, L, H*D)."""
    q, k, v, qd, kd, vd = prepass(q, k, v, q_scales, k_scales, split, cos, sin, fp8=fp8, smooth_k=smooth_k)
    return fa3_forward(module, q, k, v, qd, kd, vd).flatten(2)


def fa3_forward(module, q, k, v, q_descale=None, k_descale=None, v_descale=None) -> torch.Tensor:
    """module.flash_attn_func on (B, L, H, D) tensors, non-causal, scale 1/sqrt(D): its out (B, L, H, D)."""
    out = module.flash_attn_func(
        q, k, v, softmax_scale=None, causal=False, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale
    )
    return out[0] if isinstance(out, tuple) else out  # older interfaces return (out, softmax_lse)


class EmulatedFa3:
    """FA3's flash_attn_func in plain torch, for any device: float32 attention of the (dequantized) inputs, the
    output in the input dtype (bf16 for e4m3 inputs, as reference.attention_fp8_emulated). What the CPU runs of
    the fa3 paths to measure their quality cost (benchmarks/quality); not FA3's speed, and one rounding fewer than
    FA3's FP8 forward, which also rounds P to e4m3."""

    @staticmethod
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None):
        if softmax_scale is not None or causal:
            raise ValueError("EmulatedFa3 runs FLUX's attention only: softmax_scale=None, causal=False")
        if q.dtype == torch.float8_e4m3fn:
            return reference.attention_fp8_emulated(q, k, v, q_descale, k_descale, v_descale).unflatten(-1, q.shape[2:])
        out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2).to(q.dtype)


def prepass_for(device: torch.device) -> Callable:
    """The pre-pass FA3 runs after: the Triton kernel (kontext_rt.kernels.prepass) on a GPU where that module
    exists, else its reference (same signature); on the CPU, the reference."""
    if device.type != "cuda":
        return reference.attention_prepass
    try:
        from kontext_rt.kernels import prepass
    except ModuleNotFoundError as err:
        if err.name != "kontext_rt.kernels.prepass":  # the module is there but fails to import: not hidden
            raise
        return reference.attention_prepass
    return prepass.attention_prepass


# ---- the probe ----------------------------------------------------------------------------------------------------


def model_fits(head_dim: int, dtype: torch.dtype) -> None:
    """What FA3 needs of the model (Fa3Unavailable names the gap)."""
    if head_dim not in FA3_HEAD_DIMS:
        raise Fa3Unavailable(f"FA3 is built for head dim 128, this model has {head_dim}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise Fa3Unavailable(f"FA3 runs bf16 or fp16 models, this one loads as {dtype}")


def device_capable(device: torch.device) -> None:
    """What FA3 needs of the device, checked without importing it (Fa3Unavailable names the gap)."""
    if device.type != "cuda":
        raise Fa3Unavailable(f"FA3 needs a CUDA GPU of compute capability 9.0 (sm_90a, Hopper), not {device}")
    if not torch.cuda.is_available():
        raise Fa3Unavailable("FA3 needs a CUDA GPU of compute capability 9.0 (sm_90a, Hopper), and none is visible")
    if (got := torch.cuda.get_device_capability(device)) != FA3_CAPABILITY:
        raise Fa3Unavailable(
            f"FA3 is built for compute capability 9.0 (sm_90a, Hopper); {torch.cuda.get_device_name(device)} has {got}"
        )


def import_fa3(import_module: Callable = importlib.import_module) -> ModuleType:
    """The first of FA3_MODULES that imports and has flash_attn_func."""
    reasons = []
    for name in FA3_MODULES:
        try:
            module = import_module(name)
        except (ImportError, OSError) as err:  # OSError: a shared library that will not load
            reasons.append(f"{name}: {type(err).__name__}: {err}")
            continue
        if callable(getattr(module, "flash_attn_func", None)):
            return module
        reasons.append(f"{name} has no flash_attn_func")
    raise Fa3Unavailable(
        f"no FA3 module imports here ({'; '.join(reasons)}); install FlashAttention-3's Hopper build "
        "(its flash_attn_interface module)"
    )


def probe_bound(v: torch.Tensor, fp8: bool, dtype: torch.dtype) -> float:
    """How far FA3's output may be from float32 attention of the same (dequantized) inputs, from its roundings.

    FA3 computes S = QK^T and the softmax in float32 (exact products of bf16/fp16/e4m3 values, float32 sums), rounds
    P to the input type before P @ V, and rounds the output to `dtype`. Each P rounding changes a weight p by at
    most u_in * p (+ half the subnormal step for e4m3, whose normals start at 2^-6, on each of the L weights), so
    P @ V moves by at most (u_in + L * 2^-10 [e4m3 only]) * max|v|; the output rounding adds u_out * max|v| (an
    output is a convex combination of v's rows). u is half the type's eps: 2^-8 for bf16, 2^-4 for e4m3 (3
    mantissa bits). The probe allows twice that sum: float32's own rounding and the online softmax's rescaling are
    orders below it, while a wrong layout, scale or descale is off by a sizeable fraction of max|v|."""
    length, vmax = v.shape[1], v.abs().max().item()
    u_out = torch.finfo(dtype).eps / 2
    if not fp8:
        return 2 * (2 * u_out) * vmax
    u_p = torch.finfo(torch.float8_e4m3fn).eps / 2
    return 2 * (u_p + length * E4M3_SUBNORMAL_STEP / 2 + u_out) * vmax


def probe_inputs(device: torch.device, dtype: torch.dtype, fp8: bool):
    """(q, k, v, descales) for the probe: (B, L, H, D) from a fixed seed, q large enough that each row's softmax
    is peaked (a wrong key or head then moves the output by about max|v|), in `dtype` or e4m3 per head."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(PROBE_SHAPE, generator=gen) * s for s in (3.0, 1.0, 1.0))
    if fp8:
        (q, qd), (k, kd), (v, vd) = (reference.quantize_per_head(t) for t in (q, k, v))
        return [t.to(device) for t in (q, k, v)], [d.to(device) for d in (qd, kd, vd)]
    return [t.to(device, dtype) for t in (q, k, v)], [None, None, None]


def forward_agrees(module, device: torch.device, fp8: bool, dtype: torch.dtype = torch.bfloat16) -> None:
    """One tiny forward of module's FA3 on `device` against float32 SDPA of the same values (dequantized with the
    descales for fp8), within probe_bound; Fa3Unavailable with the numbers when it fails or disagrees."""
    out_dtype = torch.bfloat16 if fp8 else dtype  # FA3's FP8 forward writes bf16
    (q, k, v), descales = probe_inputs(device, dtype, fp8)
    what = "FA3's FP8 forward" if fp8 else f"FA3's {dtype} forward"
    try:
        out = fa3_forward(module, q, k, v, *descales)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # whatever the extension raises (no kernel image for this GPU, ...): the reason
        raise Fa3Unavailable(f"{what} failed on {device} ({type(err).__name__}: {err})") from err
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != out_dtype:
        got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__
        raise Fa3Unavailable(f"{what} returned {got}, not a {out_dtype} tensor of shape {tuple(q.shape)}")
    exact = [
        t.float() if d is None else t.float() * d[:, None, :, None] for t, d in zip((q, k, v), descales, strict=True)
    ]
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in exact)).transpose(1, 2)
    err, bound = (out.float() - want).abs().max().item(), probe_bound(exact[2], fp8, out_dtype)
    if not err <= bound:  # NaN fails too
        raise Fa3Unavailable(
            f"{what} disagrees with SDPA on {device}: max error {err:.3g} > {bound:.3g} (the bound of its roundings)"
        )


# ---- the choice ---------------------------------------------------------------------------------------------------


def probe(kind: Attention, device: torch.device, head_dim: int, dtype: torch.dtype, import_module=None):
    """(module, prepass) for an FA3 kind that can run here, or Fa3Unavailable: capability, import, forward."""
    model_fits(head_dim, dtype)
    device_capable(device)
    module = import_fa3(import_module or importlib.import_module)
    forward_agrees(module, device, kind is Attention.FA3_FP8, dtype)
    return module, prepass_for(device)


def choose(requested, device: torch.device, head_dim: int, dtype: torch.dtype, import_module=None) -> AttentionChoice:
    """The attention a triton-backend load runs. sdpa as asked; fa3 / fa3-fp8 as asked or an InputError naming
    why not; auto: the first of AUTO_PREFERS that passes the probe on a CUDA device, else sdpa, with a
    RuntimeWarning giving each reason when it passed any over."""
    requested = Attention(requested)
    if requested is Attention.SDPA:
        return AttentionChoice(Attention.SDPA)
    if requested is not Attention.AUTO:
        try:
            return AttentionChoice(requested, *probe(requested, device, head_dim, dtype, import_module))
        except Fa3Unavailable as err:
            raise InputError(f"attention={requested.value!r} cannot run here: {err}; use attention='sdpa'") from err
    reasons = []
    for kind in AUTO_PREFERS if device.type == "cuda" else ():
        try:
            return AttentionChoice(kind, *probe(kind, device, head_dim, dtype, import_module), tuple(reasons))
        except Fa3Unavailable as err:
            reasons.append(f"{kind.value}: {err}")
    if reasons:
        warnings.warn(f"attention 'auto' runs sdpa: {'; '.join(reasons)}", RuntimeWarning, stacklevel=2)
    return AttentionChoice(Attention.SDPA, passed_over=tuple(reasons))


def refuse_fa3(optimize, backend: str) -> None:
    """The eager and tensorrt backends run no FA3: an fa3 request there is an InputError naming the one that does."""
    if optimize.attention in (Attention.FA3, Attention.FA3_FP8):
        raise InputError(
            f"attention={optimize.attention.value!r} runs FlashAttention-3, which only backend='triton' loads; "
            f"backend {backend!r} runs its own attention: use backend='triton', or attention='auto'"
        )
