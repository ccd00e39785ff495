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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn

from kontext_rt.errors import InputError
from kontext_rt.sampling.loop import Denoiser

CHOICES = {
    "text_encoders": ("device", "staged", "cpu"),
    "transformer": ("resident", "offload"),
    "modulation": ("resident", "staged"),
    "vae": ("resident", "staged"),
}


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


PRESETS = {
    "resident": Placement(),
    # the transformer's blocks resident; everything used once per run (or less) off the device between uses
    "lean": Placement(text_encoders="cpu", modulation="staged", vae="staged"),
    # the least device memory: lean, with the blocks streamed from host memory as well
    "offload": Placement(text_encoders="cpu", transformer="offload", modulation="staged", vae="staged"),
}


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


class HostTensors:
    """A module's tensors moved to host memory (pinned when the device is a GPU: copies from it are asynchronous);
    `copy_to_device` makes the device copies, `attach` puts them in the module, `detach` puts the host ones back.

    The module's own Parameter objects keep the host tensors, so whatever writes the weights while they are detached
    (a LoRA fuse) writes the host copy, and the next visit copies the new values."""

    def __init__(self, module: nn.Module, device: torch.device, skip: tuple[nn.Module, ...] = ()):
        self.device = device
        self.slots = _slots(module, skip)
        self.host: list[torch.Tensor] = []  # each distinct tensor once (tied weights are one tensor)
        self.index: list[int] = []  # slot -> its tensor in self.host
        self._is_param: list[bool] = []
        seen: dict[int, int] = {}
        for owner, name, is_param in self.slots:
            table = owner._parameters if is_param else owner._buffers
            tensor = table[name]
            if id(tensor) not in seen:
                seen[id(tensor)] = len(self.host)
                host = tensor.detach().to("cpu")
                if device.type == "cuda":
                    host = host.pin_memory()
                if is_param:
                    tensor.data = host
                self.host.append(tensor if is_param else host)
                self._is_param.append(is_param)
            self.index.append(seen[id(tensor)])
            if not is_param:
                table[name] = self.host[self.index[-1]]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.host)

    def copy_to_device(self) -> list[torch.Tensor]:
        return [t.detach().to(self.device, non_blocking=True, copy=True) for t in self.host]

    def attach(self, tensors: list[torch.Tensor]) -> None:
        made = [nn.Parameter(t, requires_grad=False) if p else t for t, p in zip(tensors, self._is_param, strict=True)]
        for (owner, name, is_param), i in zip(self.slots, self.index, strict=True):
            (owner._parameters if is_param else owner._buffers)[name] = made[i]

    def detach(self) -> None:
        for (owner, name, is_param), i in zip(self.slots, self.index, strict=True):
            (owner._parameters if is_param else owner._buffers)[name] = self.host[i]


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
    copied meanwhile (on a side stream on CUDA, then waited on by the compute stream). At most two units are on the
    device. One pass at a time: the caller holds `lock` for a whole pass (a sampling loop)."""

    def __init__(self, units: list[HostTensors], device: torch.device, cyclic: bool = False):
        self.units, self.device, self.cyclic = units, device, cyclic
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.lock = threading.RLock()
        self._pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.max_on_device = 0  # the most units on the device at once (attached + copying), for tests and reports
        self._attached = 0
        self._released: torch.cuda.Event | None = None  # recorded after the last released unit's work

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
        self.max_on_device = max(self.max_on_device, self._attached + len(self._pending))

    def acquire(self, i: int) -> None:
        self._fetch(i)
        tensors, event = self._pending.pop(i)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in tensors:
                t.record_stream(compute)  # made on the copy stream, used on this one: freed only after its use
        self.units[i].attach(tensors)
        self._attached += 1
        nxt = i + 1 if i + 1 < len(self.units) else (0 if self.cyclic else None)
        if nxt is not None:
            if self._released is not None:
                # the host may run far ahead of the GPU, and each unit it releases stays allocated until the GPU has
                # run it: wait until the previous unit has run, so that at most two units hold device memory
                self._released.synchronize()
                self._released = None
            self._fetch(nxt)

    def release(self, i: int) -> None:
        self.units[i].detach()
        self._attached -= 1
        if self.copy_stream is not None:
            self._released = torch.cuda.Event()
            self._released.record(torch.cuda.current_stream(self.device))

    @contextmanager
    def visit(self, i: int):
        self.acquire(i)
        try:
            yield
        finally:
            self.release(i)

    def drop_pending(self) -> None:
        """Free the copies made ahead (the next step's first unit) when a pass ends."""
        self._pending.clear()
        self._released = None


class Residency:
    """What the model asks before it uses a group of its tensors (FluxTransformer.residency): the default has every
    tensor resident and does nothing; a placement that keeps some in host memory brings them in for the visit."""

    def block(self, i: int):
        """Around double block i (0..depth-1) or single block depth+i."""
        return _NOTHING

    def modulation_layer(self, i: int):
        """Around the modulation layer i (FluxTransformer.modulation_layers order) while the table is built."""
        return _NOTHING


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NOTHING = _Nothing()
RESIDENT = Residency()


class StreamedResidency(Residency):
    def __init__(self, blocks: Streamed | None, modulation: Streamed | None):
        self.blocks, self.modulation = blocks, modulation

    def block(self, i: int):
        return _NOTHING if self.blocks is None else self.blocks.visit(i)

    def modulation_layer(self, i: int):
        return _NOTHING if self.modulation is None else self.modulation.visit(i)

    @contextmanager
    def one_pass(self) -> Iterator[None]:
        """Held around a whole sampling loop: one loop at a time streams the weights."""
        streams = [s for s in (self.blocks, self.modulation) if s is not None]
        for s in streams:
            s.lock.acquire()
        try:
            yield
        finally:
            for s in reversed(streams):
                s.drop_pending()
                s.lock.release()

    def denoiser(self, inner: Denoiser) -> Denoiser:
        return OnePass(inner, self)


class OnePass(Denoiser):
    """A denoiser whose loops each hold the streamed weights for the whole loop (one loop at a time)."""

    def __init__(self, inner: Denoiser, residency: StreamedResidency):
        self.inner, self.residency, self.dtype = inner, residency, inner.dtype

    @contextmanager
    def prepare(self, sigmas, cond, x):
        with self.residency.one_pass(), self.inner.prepare(sigmas, cond, x) as step:
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
