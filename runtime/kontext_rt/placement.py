"""Placement: where each part of a pipeline lives, chosen at load (Pipeline.from_pretrained(..., placement=...)).

    Placement()                                   # everything resident on the device (the default)
    Placement.parse("lean")                       # a preset: see PRESETS
    Placement.parse("text_encoders=cpu,vae=staged")

- text_encoders: "device" (loaded there on the first cache miss, kept), "staged" (kept in host memory, copied to the
  device for each encode and freed after) or "cpu" (kept and run on the CPU; only the embeddings cross). A text-cache
  hit never loads them, in every mode.
- transformer: "resident", or "offload": each block's tensors in (pinned) host memory, copied to the device for its
  turn; the next block's copy runs on a side stream while the current block computes, so at most two blocks are on
  the device. The blocks' modulation linears are not part of this (below), nor the small embedders and final layer.
- modulation: "resident", or "staged": the modulation linears (3.2B parameters at full size) stay in host memory and
  visit the device one layer at a time (the next one's copy overlapped) while the modulation table is built. With
  hoisting that is once per run, before the loop.
- vae: "resident", or "staged": copied to the device for each encode or decode, freed after.

A mode changes where tensors are, never the arithmetic: on the same device every mode gives the same pixels, bit for
bit (tests/test_placement.py), except text_encoders="cpu", which runs the encoders on the CPU's arithmetic.
On a CPU device "host" and "device" are the same memory; the modes still copy, so they cost time there and save
nothing. kontext_rt.memory plans the device memory of each mode.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from types import MappingProxyType

import torch
from torch import nn

from kontext_rt.errors import InputError
from kontext_rt.model.residency import Residency
from kontext_rt.sampling.loop import Denoiser

CHOICES = MappingProxyType(
    {
        "text_encoders": ("device", "staged", "cpu"),
        "transformer": ("resident", "offload"),
        "modulation": ("resident", "staged"),
        "vae": ("resident", "staged"),
    }
)


@dataclass(frozen=True)
class Placement:
    text_encoders: str = "device"
    transformer: str = "resident"
    modulation: str = "resident"
    vae: str = "resident"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value not in CHOICES[f.name]:
                raise InputError(f"placement {f.name} must be one of {', '.join(CHOICES[f.name])}, got {value!r}")

    @classmethod
    def parse(cls, spec: str | Placement | None) -> Placement:
        """A Placement, None (everything resident), a preset name, or "part=mode,part=mode" (the rest resident)."""
        if spec is None:
            return cls()
        if isinstance(spec, Placement):
            return spec
        if not isinstance(spec, str):
            raise InputError(f"placement must be a Placement, a preset name or 'part=mode,...', got {spec!r}")
        spec = spec.strip()
        if spec in PRESETS:
            return PRESETS[spec]
        if "=" not in spec:
            raise InputError(f"unknown placement {spec!r}: a preset ({', '.join(PRESETS)}) or 'part=mode,...'")
        given = {}
        for item in spec.split(","):
            part, _, mode = item.partition("=")
            part, mode = part.strip(), mode.strip()
            if part not in CHOICES:
                raise InputError(f"placement: unknown part {part!r} (parts: {', '.join(CHOICES)})")
            if part in given:
                raise InputError(f"placement: {part} given twice")
            given[part] = mode
        return cls(**given)

    @property
    def offloads_blocks(self) -> bool:
        return self.transformer == "offload"

    def describe(self) -> str:
        name = next((k for k, v in PRESETS.items() if v == self), None)
        parts = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return f"{name} ({parts})" if name else parts

    def check(self, optimize) -> None:
        """Refuse what cannot run with the speed options (before any weights are read)."""
        if self.offloads_blocks and optimize.cuda_graphs:
            raise InputError(
                "transformer='offload' copies each block's weights in at its turn, which a CUDA graph cannot replay; "
                "use cuda_graphs=False, or keep the transformer resident"
            )
        if self.offloads_blocks and optimize.compile:
            raise InputError("transformer='offload' swaps the blocks' weights, which compiled blocks cannot follow")


PRESETS = MappingProxyType(
    {
        "resident": Placement(),
        # the transformer's blocks resident; everything used once per run (or less) off the device between uses
        "lean": Placement(text_encoders="cpu", modulation="staged", vae="staged"),
        # the least device memory: lean, with the blocks streamed from host memory as well
        "offload": Placement(text_encoders="cpu", transformer="offload", modulation="staged", vae="staged"),
    }
)


def _slots(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> list[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) of every tensor of module outside the skipped submodules."""
    skipped = {id(m) for s in skip for m in s.modules()}
    out = []
    for owner in module.modules():
        if id(owner) in skipped:
            continue
        out += [(owner, name, True) for name, p in owner._parameters.items() if p is not None]
        out += [(owner, name, False) for name, b in owner._buffers.items() if b is not None]
    return out


ALIGN = 256  # bytes: every tensor's offset in a unit's flat buffer (any dtype's alignment, and the GPU's)


def _pin(flat: torch.Tensor) -> None:
    """Page-lock a host buffer as it is (cudaHostRegister: pinned_memory() would round it up to a power of two), so
    copies from it run asynchronously; unpinned when the buffer dies. Without it the copies are synchronous."""
    cudart = torch.cuda.cudart()
    ptr = flat.data_ptr()
    if int(cudart.cudaHostRegister(ptr, flat.numel(), 0)) != 0:
        warnings.warn(
            f"could not pin {flat.numel() / 2**30:.2f} GiB of host memory (cudaHostRegister failed: the lockable "
            "memory limit?); copies from it to the GPU will not overlap with compute",
            RuntimeWarning,
            stacklevel=4,
        )
        return
    weakref.finalize(flat, cudart.cudaHostUnregister, ptr)


class HostTensors:
    """A module's tensors kept in one flat host buffer (pinned when the device is a GPU) as views of it;
    `copy_to_device` copies the buffer in one go and returns the device views, `attach` puts them in the module,
    `detach` puts the host ones back.

    The module's own Parameter objects keep the host views, so whatever writes the weights while they are detached
    (a LoRA fuse) writes the host copy, and the next visit copies the new values. Tied weights are one tensor."""

    def __init__(self, module: nn.Module, device: torch.device, skip: tuple[nn.Module, ...] = ()):
        self.device = device
        self.slots = _slots(module, skip)
        unique: list[torch.Tensor] = []
        self.index: list[int] = []  # slot -> its tensor in unique / self.host
        self._is_param: list[bool] = []
        seen: dict[int, int] = {}
        for owner, name, is_param in self.slots:
            tensor = (owner._parameters if is_param else owner._buffers)[name]
            if id(tensor) not in seen:
                seen[id(tensor)] = len(unique)
                unique.append(tensor)
                self._is_param.append(is_param)
            self.index.append(seen[id(tensor)])
        self.offsets, total = [], 0
        for t in unique:
            total = -(-total // ALIGN) * ALIGN
            self.offsets.append(total)
            total += t.numel() * t.element_size()
        self.nbytes = sum(t.numel() * t.element_size() for t in unique)  # the tensors' own bytes (what a plan counts)
        self.flat = torch.empty(total, dtype=torch.uint8)
        if device.type == "cuda" and total:
            _pin(self.flat)
        self.attached: list[torch.Tensor] | None = None  # the device copies in the module now, if any
        self.host: list[torch.Tensor] = []
        for t, offset, is_param in zip(unique, self.offsets, self._is_param, strict=True):
            view = self._view(self.flat, offset, t)
            view.copy_(t.detach())
            if is_param:
                t.data = view
            self.host.append(t if is_param else view)
        for (owner, name, is_param), i in zip(self.slots, self.index, strict=True):
            if not is_param:
                owner._buffers[name] = self.host[i]

    @staticmethod
    def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
        n = like.numel() * like.element_size()
        return flat[offset : offset + n].view(like.dtype).view(like.shape)

    def copy_to_device(self) -> list[torch.Tensor]:
        """The unit on the device: one allocation and one copy (asynchronous from pinned memory), as views."""
        flat = torch.empty(self.flat.numel(), dtype=torch.uint8, device=self.device)
        flat.copy_(self.flat, non_blocking=True)
        return [self._view(flat, offset, t) for t, offset in zip(self.host, self.offsets, strict=True)]

    def attach(self, tensors: list[torch.Tensor]) -> None:
        self.attached = tensors  # held until detach (the Parameters below alias them outside torch's dispatch)
        made = [nn.Parameter(t, requires_grad=False) if p else t for t, p in zip(tensors, self._is_param, strict=True)]
        for (owner, name, is_param), i in zip(self.slots, self.index, strict=True):
            (owner._parameters if is_param else owner._buffers)[name] = made[i]

    def detach(self) -> None:
        for (owner, name, is_param), i in zip(self.slots, self.index, strict=True):
            (owner._parameters if is_param else owner._buffers)[name] = self.host[i]
        self.attached = None


class Staged:
    """A whole module visiting the device: `with staged.on_device():` copies it in (once for all the threads
    inside) and frees the device copy when the last one leaves."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module = module
        self.tensors = HostTensors(module, device)
        self._lock = threading.Lock()
        self._users = 0

    @contextmanager
    def on_device(self):
        with self._lock:
            if self._users == 0:
                self.tensors.attach(self.tensors.copy_to_device())  # on the current stream: ordered before its use
            self._users += 1
        try:
            yield self.module
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self.tensors.detach()


class Streamed:
    """Units (each a module's HostTensors) visiting the device in order: unit i attached while it computes, unit i+1
    copied meanwhile (on a side stream on CUDA, waited on by the compute stream before its use). At most two units
    hold device memory. One pass at a time: the caller holds `lock` for a whole pass, and ends it with `end_pass`.

    On CUDA the host runs ahead of the GPU, and a released unit's memory stays allocated until the GPU has run it
    (record_stream). So when unit i is released (its work queued), the host first waits for unit i-1's work to
    finish, then queues unit i+1's copy: the GPU always has unit i's work queued while the host waits, and unit
    i+1's copy overlaps it."""

    def __init__(self, units: list[HostTensors], device: torch.device, cyclic: bool = False):
        self.units, self.device, self.cyclic = units, device, cyclic
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.lock = threading.RLock()
        self._pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self._attached: set[int] = set()
        self._released: torch.cuda.Event | None = None  # recorded after the last released unit's work
        self.max_on_device = 0  # the most units holding device memory at once, for tests and reports

    @property
    def largest_unit(self) -> int:
        return max(u.nbytes for u in self.units)

    def _fetch(self, i: int) -> None:
        if i in self._pending:
            return
        if self.copy_stream is None:
            self._pending[i] = (self.units[i].copy_to_device(), None)
        else:
            with torch.cuda.stream(self.copy_stream):
                tensors = self.units[i].copy_to_device()
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self._pending[i] = (tensors, event)
        self.max_on_device = max(self.max_on_device, len(self._attached) + len(self._pending))

    def acquire(self, i: int) -> None:
        self._fetch(i)  # already copied ahead, except for a pass's first unit
        tensors, event = self._pending.pop(i)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            tensors[0].record_stream(compute)  # the views share one buffer, made on the copy stream, used on this one
        self.units[i].attach(tensors)
        self._attached.add(i)

    def release(self, i: int) -> None:
        try:
            if self.copy_stream is not None:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                if self._released is not None:
                    self._released.synchronize()  # unit i-1 has run: its memory is free again
                self._released = done
            nxt = i + 1 if i + 1 < len(self.units) else (0 if self.cyclic else None)
            if nxt is not None:
                self._fetch(nxt)
        finally:
            self.units[i].detach()
            self._attached.discard(i)

    @contextmanager
    def visit(self, i: int):
        self.acquire(i)
        try:
            yield
        finally:
            self.release(i)

    def end_pass(self) -> None:
        """Put every unit's host tensors back (after an error too) and free the copies made ahead."""
        for i in list(self._attached):
            self.units[i].detach()
        self._attached.clear()
        self._pending.clear()
        self._released = None

    @contextmanager
    def one_pass(self):
        with self.lock:
            try:
                yield
            finally:
                self.end_pass()


class StreamedResidency(Residency):
    def __init__(self, blocks: Streamed | None, modulation: Streamed | None):
        self.blocks, self.modulation = blocks, modulation

    def block(self, i: int):
        return nullcontext() if self.blocks is None else self.blocks.visit(i)

    def modulation_table(self):
        """One table at a time streams the modulation layers (its own pass: loops over resident blocks run
        concurrently, and only their tables take turns)."""
        return nullcontext() if self.modulation is None else self.modulation.one_pass()

    def modulation_layer(self, i: int):
        return nullcontext() if self.modulation is None else self.modulation.visit(i)

    def denoiser(self, inner: Denoiser) -> Denoiser:
        """The denoiser to run: streamed blocks take a whole loop per pass (one loop at a time)."""
        return inner if self.blocks is None else OnePass(inner, self.blocks)


class OnePass(Denoiser):
    """A denoiser whose every loop is one pass of the streamed blocks (one loop at a time)."""

    def __init__(self, inner: Denoiser, blocks: Streamed):
        self.inner, self.blocks, self.dtype = inner, blocks, inner.dtype

    @contextmanager
    def prepare(self, sigmas, cond, x):
        with self.blocks.one_pass(), self.inner.prepare(sigmas, cond, x) as step:
            yield step

    def weights_changed(self) -> None:
        self.inner.weights_changed()


def place_transformer(model, placement: Placement, device: torch.device) -> StreamedResidency | None:
    """Move the transformer's offloaded parts to host memory and give it the residency that brings them back;
    the rest goes to the device. None when everything is resident (the model is only moved to the device)."""
    blocks = [*model.double_blocks, *model.single_blocks]
    mod_layers = model.modulation_layers()
    streamed_mod = None
    if placement.modulation == "staged":
        streamed_mod = Streamed([HostTensors(lin, device) for lin in mod_layers], device)
    streamed_blocks = None
    if placement.offloads_blocks:  # the modulation layers are not the blocks' to move: the table reads them
        streamed_blocks = Streamed([HostTensors(b, device, tuple(mod_layers)) for b in blocks], device, cyclic=True)
    if streamed_mod is None and streamed_blocks is None:
        model.to(device)
        return None
    host = {id(t) for s in (streamed_mod, streamed_blocks) if s is not None for u in s.units for t in u.host}
    for owner, name, is_param in _slots(model):
        table = owner._parameters if is_param else owner._buffers
        tensor = table[name]
        if id(tensor) in host:
            continue
        if is_param:
            tensor.data = tensor.data.to(device)
        else:
            table[name] = tensor.to(device)
    residency = StreamedResidency(streamed_blocks, streamed_mod)
    model.residency = residency
    return residency


class StagedVAE:
    """The VAE copied to the device for each encode and decode (Placement.vae='staged')."""

    def __init__(self, vae: nn.Module, device: torch.device):
        self.staged = Staged(vae, device)
        self.module = vae
        self.cfg = vae.cfg

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with self.staged.on_device() as vae:
            return vae.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with self.staged.on_device() as vae:
            return vae.decode(z)
