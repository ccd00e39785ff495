"""Speed options of a pipeline, chosen once at load (Pipeline.from_pretrained(..., optimize=Optimizations(...)))."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

from kontext_rt.errors import InputError
from kontext_rt.model.fp8_linear import Fp8Mode

FP8_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores


class Attention(StrEnum):
    """The attention kernel of the triton backend (Optimizations.attention, which also takes the strings).

    auto     today's choice, SDPA: FA3 (bf16) may become auto's first choice once a GPU run shows it faster, not
             before; FP8 attention stays opt-in until its quality cost on the GPU is measured and stated
    sdpa     the norm+RoPE kernel, then torch's scaled_dot_product_attention (what every backend ran before)
    fa3      the attention pre-pass (norm, RoPE, the (B, L, H, D) layout), then FlashAttention-3's forward in bf16
    fa3-fp8  the same with q, k, v in FP8 e4m3, one scale per (batch, head): lossy (docs/quality.md)
    """

    AUTO = "auto"
    SDPA = "sdpa"
    FA3 = "fa3"
    FA3_FP8 = "fa3-fp8"

    def __repr__(self) -> str:  # as the string it stands for, as Fp8Mode's: reprs of options (and docs) read so
        return repr(self.value)


@dataclass(frozen=True)
class Optimizations:
    """
    hoist           compute every step's modulation vectors before the loop (exactly the per-step values with
                    backend='triton'; float32-rounding-close with 'eager', whose cuBLAS/BLAS is not row-invariant)
    cuda_graphs     capture one denoising step per shape bucket and replay it (CUDA only; implies hoist)
    fp8             None, "dynamic" (per-token activation scales at run time) or "static" (per-layer scales from
                    the export stage's calibration file, fp8_calibration): the blocks' large linears in FP8 e4m3
                    through torch._scaled_mm. bfloat16 models; CUDA compute capability 8.9+ (the CPU runs it too,
                    slowly, for tests: through fp8.scaled_mm_dequantized where its torch lacks row-wise scales).
                    A string or a model.fp8_linear.Fp8Mode: each mode's string is kept as its Fp8Mode member, and
                    check() refuses any other value
    compile         torch.compile each transformer block (regional): True for inductor, or a backend name
    max_graphs      CUDA graphs kept (one per shape bucket), least recently used dropped
    attention       "auto", "sdpa", "fa3" or "fa3-fp8" (an Attention; see its docstring): fa3 and fa3-fp8 need
                    backend='triton', a CUDA GPU of compute capability 9.0 (sm_90a), head dim 128 and an FA3
                    module (flash_attn_interface); fa3 runs bf16 or fp16 models, fa3-fp8 bfloat16 ones. Refused
                    at load, with the reason, where it cannot run; only "auto" falls back (to sdpa)
    """

    hoist: bool = True
    cuda_graphs: bool = False
    fp8: Fp8Mode | str | None = None
    fp8_calibration: str | Path | None = None
    compile: bool | str = False
    max_graphs: int = 8
    attention: Attention | str = Attention.AUTO

    def __post_init__(self):
        if isinstance(self.fp8, str) and self.fp8 in {m.value for m in Fp8Mode}:
            object.__setattr__(self, "fp8", Fp8Mode(self.fp8))
        if isinstance(self.attention, str) and self.attention in {m.value for m in Attention}:
            object.__setattr__(self, "attention", Attention(self.attention))

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Refuse combinations that cannot run, naming the fix (before any weights are read); what a backend
        cannot take is its own check (kontext_rt.backends)."""
        if self.cuda_graphs and device.type != "cuda":
            raise InputError(f"cuda_graphs needs a CUDA device, not {device}; use Optimizations(cuda_graphs=False)")
        if self.cuda_graphs and not self.hoist:
            raise InputError(
                "cuda_graphs replays one step whose modulation comes from the hoisted table: it needs hoist=True"
            )
        if self.fp8 is not None:
            if not isinstance(self.fp8, Fp8Mode):  # __post_init__ made each allowed string its member
                raise InputError(f"fp8 must be None or one of {', '.join(Fp8Mode)}, got {self.fp8!r}")
            if dtype != torch.bfloat16:
                raise InputError(f"fp8 linears produce bfloat16: load with dtype=torch.bfloat16, not {dtype}")
            if device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
                name = torch.cuda.get_device_name(device)
                raise InputError(
                    f"fp8 needs compute capability {FP8_CAPABILITY} or newer (FP8 tensor cores); "
                    f"{name} has {torch.cuda.get_device_capability(device)}"
                )
            if (self.fp8 is Fp8Mode.STATIC) != (self.fp8_calibration is not None):
                raise InputError(
                    "fp8='static' needs fp8_calibration=FILE (the export stage's calibration "
                    "safetensors), and only it uses one"
                )
        if not isinstance(self.attention, Attention):  # __post_init__ made each allowed string its member
            raise InputError(f"attention must be one of {', '.join(Attention)}, got {self.attention!r}")
        if self.attention is Attention.FA3 and dtype not in (torch.bfloat16, torch.float16):
            raise InputError(f"attention='fa3' runs FA3 in bf16 or fp16: load with dtype=torch.bfloat16, not {dtype}")
        if self.attention is Attention.FA3_FP8 and dtype != torch.bfloat16:
            raise InputError(
                f"attention='fa3-fp8' gives bfloat16 outputs (FA3's FP8 forward): load with dtype=torch.bfloat16, "
                f"not {dtype}"
            )
        if not isinstance(self.compile, (bool, str)):
            raise InputError(f"compile must be a bool or a torch.compile backend name, got {self.compile!r}")
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise InputError(f"max_graphs must be a positive integer, got {self.max_graphs!r}")
