"""A memory plan before the work: the bytes a request needs on the device, from the configs alone (no weights).

    p = plan(cfg, vae_cfg, torch.bfloat16, fp8=False, text_tokens=512, target_tokens=4096, context_tokens=4096,
             width=1024, height=1024, text_encoders=text_encoder_bytes(folder, torch.bfloat16))
    print(p)          # the breakdown in GiB
    p.budget          # what must fit: resident weights + largest transient + the stated margin

Weights are exact: counted from the models built on the meta device, in the dtype they are loaded in (and, with fp8,
from the model converted by model.fp8_linear.convert on the meta device: e4m3 weight, float32 scales, bias).
Transients are traced, not guessed: one denoising step (FluxTransformer.velocity) and one VAE encode and decode run
on the meta device inside LiveBytes, a dispatch mode that adds each new storage's size when an op creates it and
takes it off when the storage dies; the plan keeps the highest point above the start. Meta tensors hold no memory,
so this costs a fraction of a second at full size.

What the trace cannot see: the CUDA caching allocator's rounding and fragmentation, cuBLAS and attention workspaces
(an attention op is one dispatch: only its output is seen), the CUDA context, the text encoders' own transient (T5
over a few hundred tokens, far below the transformer step's) and the memory a fused backend saves (the trace runs the
eager op table, the plain-torch reference; the triton kernels need less). `MARGIN` covers these, shown as its own
line, never folded into the traced numbers.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kontext_rt.config import FluxConfig, VAEConfig

MARGIN = 0.10  # of the traced peak: allocator rounding and fragmentation, workspaces, the CUDA context
GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of the storages that ops create while the mode is active; `peak` is the highest total.

    A storage is counted once however many views share it, from the op that creates it until its last tensor dies
    (weakref finalizers on each tensor that holds it). Tensors made before the mode (weights, inputs) are the
    starting point and not counted, nor are views of them (an output sharing an input's untracked storage)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._holders: dict[int, list] = {}  # storage key -> [nbytes, ids of the tensors holding it]

    def _release(self, key: int, holder: int) -> None:
        entry = self._holders.get(key)
        if entry is None:
            return
        entry[1].discard(holder)
        if not entry[1]:
            self.live -= entry[0]
            del self._holders[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            entry = self._holders.get(key)
            if entry is None and key in given:
                continue  # a view of (or an in-place op on) memory that was there before the mode: nothing new
            if entry is None:
                entry = self._holders[key] = [storage.nbytes(), set()]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            if id(t) not in entry[1]:
                entry[1].add(id(t))
                weakref.finalize(t, self._release, key, id(t))
        return out


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer, each in its own dtype (shared tensors once)."""
    seen = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def meta_transformer(cfg: FluxConfig, dtype: torch.dtype, fp8: bool) -> nn.Module:
    """The transformer on the meta device as it is loaded: in dtype, then FP8-converted when fp8."""
    from kontext_rt.model import fp8_linear
    from kontext_rt.model.transformer import FluxTransformer

    with torch.device("meta"):
        model = FluxTransformer(cfg).to(dtype).eval().requires_grad_(False)
    if fp8:
        fp8_linear.convert(model, matmul=torch._scaled_mm)  # the GPU's matmul: its meta kernel gives the shapes
    return model


def meta_vae(cfg: VAEConfig, dtype: torch.dtype) -> nn.Module:
    from kontext_rt.model.vae import AutoEncoder

    with torch.device("meta"):
        return AutoEncoder(cfg).to(dtype).eval().requires_grad_(False)


def trace_peak(fn) -> int:
    """The peak bytes of the storages `fn` creates on the meta device, above what exists when it starts."""
    with torch.inference_mode(), torch.device("meta"), LiveBytes() as live:
        fn()
    return live.peak


def step_transient(model: nn.Module, dtype, text_tokens: int, grids: list[tuple[int, int]], batch: int) -> int:
    """Peak of one denoising step, its inputs included: the latents (float32, cast to dtype), context tokens, text,
    one row of the modulation table, the RoPE table, then FluxTransformer.velocity."""
    from kontext_rt.model.rope import rope_table, sequence_ids

    cfg = model.cfg
    target = grids[0][0] * grids[0][1]

    def step():
        state = torch.empty(batch, target, cfg.in_channels, dtype=torch.float32)
        img = state.to(dtype)
        ctx = None
        if len(grids) > 1:
            ctx = torch.empty(batch, sum(r * c for r, c in grids[1:]), cfg.in_channels, dtype=dtype)
        txt = torch.empty(batch, text_tokens, cfg.context_in_dim, dtype=dtype)
        mod = torch.empty(batch, sum(model.mod_widths), dtype=dtype)
        cos, sin = rope_table(sequence_ids(text_tokens, grids), cfg.axes_dim, cfg.theta)
        v = model.velocity(img, ctx, txt, mod, cos, sin)
        state.add_(v.float(), alpha=-0.1)  # the Euler update, as the loop does

    return trace_peak(step)


def vae_transients(vae: nn.Module, dtype, width: int, height: int, batch: int, context: bool) -> tuple[int, int]:
    """(encode peak, decode peak): an image (B, 3, H, W) to its latent, a latent back to the image."""
    down = vae.cfg.downscale
    z_ch = vae.cfg.z_channels

    def encode():
        vae.encode(torch.empty(batch, 3, height, width, dtype=dtype))

    def decode():
        vae.decode(torch.empty(batch, z_ch, height // down, width // down, dtype=dtype))

    return (trace_peak(encode) if context else 0), trace_peak(decode)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on the device for one request. The text encoders are their own line (0 when they are not there)."""

    transformer_weights: int
    vae_weights: int
    text_encoders: int
    denoise_transient: int
    vae_transient: int
    request: str = ""
    margin_fraction: float = MARGIN

    @property
    def resident(self) -> int:
        return self.transformer_weights + self.vae_weights + self.text_encoders

    @property
    def largest_transient(self) -> int:
        return max(self.denoise_transient, self.vae_transient)

    @property
    def peak(self) -> int:
        """Resident weights (text encoders included) + the largest transient: what the trace sees."""
        return self.resident + self.largest_transient

    @property
    def peak_without_text_encoders(self) -> int:
        return self.peak - self.text_encoders

    @property
    def margin(self) -> int:
        return int(self.peak * self.margin_fraction)

    @property
    def budget(self) -> int:
        """The planned peak plus the margin for what the trace cannot see: what must be free on the device."""
        return self.peak + self.margin

    def table(self) -> str:
        unit, name = (GIB, "GiB") if self.budget >= GIB else (2**20, "MiB")

        def gib(n: int) -> str:
            return f"{n / unit:9.2f} {name}"

        rows = [
            ("transformer weights", self.transformer_weights),
            ("VAE weights", self.vae_weights),
            ("text encoders (T5 + CLIP)", self.text_encoders),
            ("denoising step transient", self.denoise_transient),
            ("VAE encode/decode transient", self.vae_transient),
            ("peak without text encoders", self.peak_without_text_encoders),
            ("peak (weights + largest transient)", self.peak),
            (f"margin ({self.margin_fraction:.0%}: allocator, workspaces)", self.margin),
            ("planned total", self.budget),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"memory plan: {self.request}"] if self.request else []
        lines += [f"  {name:<{width}}  {gib(n)}" for name, n in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def plan(
    cfg: FluxConfig,
    vae_cfg: VAEConfig,
    dtype: torch.dtype,
    fp8: bool,
    text_tokens: int,
    target_tokens: int,
    context_tokens: int,
    width: int,
    height: int,
    batch: int = 1,
    text_encoders: int = 0,
) -> MemoryPlan:
    """The plan of one request: target_tokens = (height/16)*(width/16); context_tokens of one context image of the
    same size (0 for text-to-image); text_encoders: their bytes on the device (0 when elsewhere)."""
    if target_tokens != (height // 16) * (width // 16):
        raise ValueError(f"target_tokens {target_tokens} does not match a {width}x{height} image")
    rows, cols = height // 16, width // 16
    grids = [(rows, cols)]
    if context_tokens:
        if context_tokens % target_tokens:
            raise ValueError(f"context_tokens {context_tokens} is not a whole number of {width}x{height} images")
        grids += [(rows, cols)] * (context_tokens // target_tokens)
    model = meta_transformer(cfg, dtype, fp8)
    vae = meta_vae(vae_cfg, dtype)
    encode, decode = vae_transients(vae, dtype, width, height, batch, bool(context_tokens))
    dtype_name = str(dtype).removeprefix("torch.") + (" + fp8 linears" if fp8 else "")
    request = f"{width}x{height}, {dtype_name}, {text_tokens} text tokens, {len(grids) - 1} context image(s)"
    return MemoryPlan(
        transformer_weights=tensor_bytes(model),
        vae_weights=tensor_bytes(vae),
        text_encoders=text_encoders,
        denoise_transient=step_transient(model, dtype, text_tokens, grids, batch),
        vae_transient=max(encode, decode),
        request=request + ("" if batch == 1 else f", batch {batch}"),
    )


def text_encoder_bytes(folder, dtype: torch.dtype) -> int:
    """Bytes of CLIP-L and T5 loaded in dtype, from the safetensors headers of text_encoder/ and text_encoder_2/."""
    from pathlib import Path

    from kontext_rt.weights.loading import component_files

    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for sub in ("text_encoder", "text_encoder_2"):
        files = component_files(Path(folder) / sub, "model")
        total += sum(math.prod(shape) for shape in files.shapes.values()) * size
    return total


def standard_text_encoder_bytes(dtype: torch.dtype) -> int:
    """Bytes of the FLUX.1 text encoders (CLIP ViT-L/14 text model, T5 v1.1 XXL encoder) in dtype, counted from the
    models built on the meta device from their published configs: for a plan without a checkpoint."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
    )
    t5 = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    size = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        models = (CLIPTextModel(clip), T5EncoderModel(t5))
    return sum(sum(p.numel() for p in m.parameters()) for m in models) * size


def check_max_memory(max_memory) -> None:
    """max_memory: None, or a positive int of bytes (InputError otherwise)."""
    from kontext_rt.errors import InputError

    if max_memory is not None and (not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory <= 0):
        raise InputError(f"max_memory must be a positive number of bytes, got {max_memory!r}")


def check_budget(p: MemoryPlan, device: torch.device, max_memory=None, fp8: bool = False) -> None:
    """Refuse a plan over max_memory (bytes, any device) or, on CUDA without it, over the device's free memory:
    an OutOfMemoryPlan naming the breakdown and what would help. Nothing to check on a CPU without max_memory."""
    from kontext_rt.errors import OutOfMemoryPlan

    if max_memory is not None:
        check_max_memory(max_memory)
        budget, what = max_memory, "max_memory="
    elif device.type == "cuda":
        budget, what = torch.cuda.mem_get_info(device)[0], f"the free memory of {device}"
    else:
        return
    if p.budget <= budget:
        return
    helps = [] if fp8 else ["FP8 linears (optimize=Optimizations(fp8='dynamic') with dtype=torch.bfloat16)"]
    helps += [
        "a smaller plan_size=(width, height) when the edits will be smaller",
        "a GPU with more free memory",
    ]
    raise OutOfMemoryPlan(
        f"the memory plan needs {p.budget / GIB:.2f} GiB, more than {what} ({budget / GIB:.2f} GiB). {p.table()}\n"
        f"What would help: {'; '.join(helps)}. `kontext-rt plan` prints the plan of other settings."
    )
