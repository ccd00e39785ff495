"""The runtime's model made ready to run, after its weights are read: LoRAs fused, FP8 quantization, regional
compile, in the order each needs."""

from __future__ import annotations

from pathlib import Path

from kontext_rt.backends.base import LoadRequest
from kontext_rt.errors import InputError
from kontext_rt.model.op_table import Ops
from kontext_rt.weights.lora import LoRAStack


def lora_path(item) -> Path:
    """A loras= entry is a path or (path, strength)."""
    if isinstance(item, (str, Path)):
        return Path(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, Path)):
        return Path(item[0])
    raise InputError(f"each LoRA is a path or (path, strength), got {item!r}")


def prepare(transformer, ops: Ops, req: LoadRequest, device, amax=None, park=None) -> LoRAStack:
    """LoRAs fused, then FP8 quantization (each linear moved to `device` first, each block to `park` after, when
    given), then regional compile: the order each needs."""
    from kontext_rt.model import fp8_linear as fp8

    optimize = req.optimize
    stack = LoRAStack(transformer)
    for item in req.loras:
        stack.load(lora_path(item), 1.0 if isinstance(item, (str, Path)) else item[1])
    if optimize.fp8 is not None:
        fp8.convert(transformer, ops.quantize_rows, amax, fp8.matmul_for(device), device=device, park=park)
        stack.forget_originals()  # unloading is refused on FP8 pipelines
    if optimize.compile:
        backend = "inductor" if optimize.compile is True else optimize.compile
        for block in (*transformer.double_blocks, *transformer.single_blocks):
            block.compile(backend=backend, fullgraph=True, dynamic=False)
    return stack
