"""The transformer under a placement that streams part of it (kontext_rt.placement: transformer="offload",
modulation="staged"): place_transformer moves those parts to host memory and gives the model a StreamedResidency,
which brings each block or modulation layer to the device for its turn (kontext_rt.streaming); OnePass makes every
denoising loop one pass of the streamed blocks."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from kontext_rt.model.residency import Residency
from kontext_rt.placement import Placement
from kontext_rt.sampling.loop import Denoiser
from kontext_rt.streaming import HostTensors, Streamed, tensor_slots


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
        with self.blocks.one_pass(), self.inner.prepare(sigmas, cond, x) as velocity:
            yield velocity

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
    for owner, name, is_param in tensor_slots(model):
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
