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

import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kontext_rt.config import FluxConfig, VAEConfig
from kontext_rt.placement import PRESETS, Placement

RESIDENT = PRESETS["resident"]
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
    """Bytes on the device for one request with a placement (kontext_rt.placement): each part's weights, each stage's
    transient, and the stages' peaks. The parts' sizes never depend on the placement; where they are does."""

    transformer_weights: int  # all of it: blocks + modulation linears + the rest
    block_weights: int  # the blocks without their modulation linears
    largest_block: int
    modulation_weights: int
    largest_modulation_layer: int
    vae_weights: int
    text_encoders: int
    denoise_transient: int
    vae_transient: int
    table: int  # the hoisted modulation table of every step, alive through the loop
    vae_tiled_transient: int | None = None  # the VAE's transient in tiles (vae_tiling), None when it does not tile
    placement: Placement = Placement()
    request: str = ""
    margin_fraction: float = MARGIN

    def placed(self, placement: Placement) -> MemoryPlan:
        """The same request with another placement."""
        return replace(self, placement=placement)

    @property
    def resident(self) -> int:
        """What stays on the device through every stage."""
        pl = self.placement
        total = self.transformer_weights
        total -= self.block_weights if pl.offloads_blocks else 0
        total -= self.modulation_weights if pl.modulation == "staged" else 0
        total += self.vae_weights if pl.vae == "resident" else 0
        return total + (self.text_encoders if pl.text_encoders == "device" else 0)

    @property
    def stages(self) -> dict[str, int]:
        """Bytes on the device at each stage's highest point."""
        pl, base = self.placement, self.resident
        vae = self.vae_weights if pl.vae == "staged" else 0
        streamed_mod = 2 * self.largest_modulation_layer if pl.modulation == "staged" else 0
        streamed_blocks = 2 * self.largest_block if pl.offloads_blocks else 0  # the running block + the next one
        return {
            "text encode": base + (self.text_encoders if pl.text_encoders == "staged" else 0),
            "VAE encode/decode": base + vae + self.vae_stage_transient,
            "modulation table": base + streamed_mod + self.table,
            "denoising step": base + streamed_blocks + self.table + self.denoise_transient,
        }

    @property
    def vae_stage_transient(self) -> int:
        """The VAE's transient as the pipeline runs it: in tiles when it may tile (the smaller of the two)."""
        if self.vae_tiled_transient is None:
            return self.vae_transient
        return min(self.vae_transient, self.vae_tiled_transient)

    @property
    def peak(self) -> int:
        """The highest stage: what the trace sees."""
        return max(self.stages.values())

    @property
    def margin(self) -> int:
        return int(self.peak * self.margin_fraction)

    @property
    def budget(self) -> int:
        """The planned peak plus the margin for what the trace cannot see: what must be free on the device."""
        return self.peak + self.margin

    def table_text(self) -> str:
        unit, name = (GIB, "GiB") if self.budget >= GIB else (2**20, "MiB")

        def size(n: int) -> str:
            return f"{n / unit:9.2f} {name}"

        pl = self.placement
        where = {
            "device": "on the device",
            "resident": "on the device",
            "staged": "host memory, on the device for its stage",
            "cpu": "on the CPU, run there",
        }
        rest = self.transformer_weights - self.block_weights - self.modulation_weights
        blocks_at = "host memory, 2 blocks on the device at a time" if pl.offloads_blocks else where["resident"]
        mod_at = "host memory, 2 layers on the device at a time" if pl.modulation == "staged" else where["resident"]
        rows = [
            ("transformer blocks", self.block_weights, blocks_at),
            ("modulation linears", self.modulation_weights, mod_at),
            ("transformer embedders, final layer", rest, where["resident"]),
            ("VAE weights", self.vae_weights, where[pl.vae]),
            ("text encoders (T5 + CLIP)", self.text_encoders, where[pl.text_encoders]),
            ("always on the device", self.resident, ""),
            ("denoising step transient", self.denoise_transient, ""),
            ("VAE encode/decode transient", self.vae_transient, ""),
            *(
                [("VAE transient in tiles", self.vae_tiled_transient, "vae_tiling: used when the image needs it")]
                if self.vae_tiled_transient is not None
                else []
            ),
            ("modulation table (every step)", self.table, ""),
            *((f"stage: {k}", v, "") for k, v in self.stages.items()),
            ("peak (the highest stage)", self.peak, ""),
            (f"margin ({self.margin_fraction:.0%}: allocator, workspaces)", self.margin, ""),
            ("planned total", self.budget, ""),
        ]
        width = max(len(n) for n, _, _ in rows)
        lines = [f"memory plan: {self.request}", f"  placement: {pl.describe()}"] if self.request else []
        lines += [f"  {n:<{width}}  {size(v)}  {w}".rstrip() for n, v, w in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table_text()


def _parts(model: nn.Module) -> tuple[int, int, int, int]:
    """(block bytes, largest block, modulation bytes, largest modulation layer): blocks without their modulation."""
    mod = model.modulation_layers()
    mod_ids = {id(t) for lin in mod for t in (*lin.parameters(), *lin.buffers())}
    blocks = [
        sum(t.numel() * t.element_size() for t in (*b.parameters(), *b.buffers()) if id(t) not in mod_ids)
        for b in (*model.double_blocks, *model.single_blocks)
    ]
    mods = [tensor_bytes(lin) for lin in mod]
    return sum(blocks), max(blocks), sum(mods), max(mods)


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
    placement: Placement = RESIDENT,
    steps: int = 28,
    vae_tile: int | None = None,
) -> MemoryPlan:
    """The plan of one request: target_tokens = (height/16)*(width/16); context_tokens of one context image of the
    same size (0 for text-to-image); text_encoders: their bytes (placed by `placement`); steps: rows of the hoisted
    modulation table; vae_tile: the tile of a pipeline that may tile the VAE (None: it never does)."""
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
    tiled = None
    if vae_tile is not None and max(width, height) > vae_tile:
        from kontext_rt.model.vae_tiling import tile_shape

        tiled = max(vae_transients(vae, dtype, *tile_shape(width, height, vae_tile), batch, bool(context_tokens)))
    dtype_name = str(dtype).removeprefix("torch.") + (" + fp8 linears" if fp8 else "")
    request = f"{width}x{height}, {dtype_name}, {text_tokens} text tokens, {len(grids) - 1} context image(s)"
    blocks, largest_block, mods, largest_mod = _parts(model)
    table = steps * batch * sum(model.mod_widths) * torch.empty((), dtype=dtype).element_size()
    return MemoryPlan(
        transformer_weights=tensor_bytes(model),
        block_weights=blocks,
        largest_block=largest_block,
        modulation_weights=mods,
        largest_modulation_layer=largest_mod,
        vae_weights=tensor_bytes(vae),
        text_encoders=text_encoders,
        denoise_transient=step_transient(model, dtype, text_tokens, grids, batch),
        vae_transient=max(encode, decode),
        table=table,
        vae_tiled_transient=tiled,
        placement=placement,
        request=request + ("" if batch == 1 else f", batch {batch}"),
    )


def _text_encoders_bytes(clip_config, t5_config, dtype: torch.dtype) -> int:
    """Bytes of CLIP's text model and T5's encoder as loaded: built on the meta device from their configs, cast to
    dtype (integer buffers such as CLIP's position ids keep theirs; tied weights count once)."""
    from transformers import CLIPTextModel, T5EncoderModel

    with torch.device("meta"):
        models = (CLIPTextModel(clip_config).to(dtype), T5EncoderModel(t5_config).to(dtype))
    return sum(tensor_bytes(m) for m in models)


def text_encoder_bytes(folder, dtype: torch.dtype) -> int:
    """Bytes of CLIP-L and T5 loaded in dtype, from the configs of text_encoder/ and text_encoder_2/."""
    from pathlib import Path

    from transformers import CLIPTextConfig, T5Config

    folder = Path(folder)
    clip = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    t5 = T5Config.from_pretrained(folder / "text_encoder_2", local_files_only=True)
    return _text_encoders_bytes(clip, t5, dtype)


def standard_text_encoder_bytes(dtype: torch.dtype) -> int:
    """Bytes of the FLUX.1 text encoders (CLIP ViT-L/14 text model, T5 v1.1 XXL encoder) in dtype, from their
    published configs: for a plan without a checkpoint."""
    from transformers import CLIPTextConfig, T5Config

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
    return _text_encoders_bytes(clip, t5, dtype)


def check_max_memory(max_memory) -> None:
    """max_memory: None, or a positive int of bytes (InputError otherwise)."""
    from kontext_rt.errors import InputError

    if max_memory is not None and (not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory <= 0):
        raise InputError(f"max_memory must be a positive number of bytes, got {max_memory!r}")


def check_budget(p: MemoryPlan, device: torch.device, max_memory=None, fp8_plan=None, allowed=None) -> None:
    """Refuse a plan over max_memory (bytes, any device) or, on CUDA without it, over the device's free memory:
    an OutOfMemoryPlan naming the breakdown and the options that would fit (the placement presets, and FP8 linears
    when fp8_plan, a callable giving the same request's plan with them, is given; allowed(placement) -> bool keeps
    only the placements the pipeline's options can run with). Nothing to check on a CPU without max_memory."""
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

    fp8 = "FP8 linears (optimize=Optimizations(fp8='dynamic'), dtype=torch.bfloat16) with "
    presets = [(name, pl) for name, pl in PRESETS.items() if allowed is None or allowed(pl)]
    options = [(f"placement={name!r}", p.placed(pl)) for name, pl in presets]
    if fp8_plan is not None:
        q = fp8_plan()
        options += [(f"{fp8}placement={name!r}", q.placed(pl)) for name, pl in presets]
    fits = [f"{name} ({o.budget / GIB:.2f} GiB)" for name, o in options if o.budget <= budget]
    if fits:
        helps = "What would fit: " + "; ".join(fits)
    else:
        name, least = min(options, key=lambda o: o[1].budget)
        helps = (
            f"Nothing fits: the least is {name} ({least.budget / GIB:.2f} GiB); plan for smaller images "
            "(plan_size=(width, height)) or use a GPU with more free memory"
        )
    raise OutOfMemoryPlan(
        f"the memory plan needs {p.budget / GIB:.2f} GiB, more than {what} ({budget / GIB:.2f} GiB).\n{p}\n"
        f"{helps}. `kontext-rt plan` prints the plan of other settings."
    )
