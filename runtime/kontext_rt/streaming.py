"""Module tensors kept in host memory and copied to the device for their use: the mechanics behind the placement
modes (kontext_rt.placement) that keep a part off the device between uses.

    HostTensors(module, device)     a module's tensors in one flat host buffer (pinned on a GPU), attachable copies
    Staged(module, device)          a whole module on the device for the length of a `with staged.on_device():`
    Streamed(units, device)         units visiting the device in order, the next one's copy overlapped (two at most)

A visit changes where tensors are, never their values: the device copies are bit-for-bit the host tensors.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from contextlib import contextmanager

import torch
from torch import nn


def tensor_slots(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> list[tuple[nn.Module, str, bool]]:
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
        self.slots = tensor_slots(module, skip)
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
