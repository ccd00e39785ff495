"""How a pipeline runs its VAE: staged to the device when its placement says so, in tiles when vae_tiling asks or
("auto") when the call would not fit in the memory free after loading."""

from __future__ import annotations

import threading
from contextlib import nullcontext

import torch
from torch import nn

from kontext_rt import memory
from kontext_rt.model.vae_tiling import TiledVAE
from kontext_rt.streaming import Staged


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


class VAERunner:
    """A pipeline's encodes and decodes, staged and tiled as its load asked. vae: the backend's VAE (an AutoEncoder,
    a StagedVAE or engines); engines: True when it runs engines (never tiled); tiling: True, False or "auto";
    tile: px."""

    def __init__(self, vae, device: torch.device, dtype: torch.dtype, tiling, tile: int, engines: bool):
        self.vae, self.device, self.dtype = vae, device, dtype
        self.tiling, self.tile, self.engines = tiling, tile, engines
        self._lock = threading.Lock()
        self.decisions: dict[tuple[str, int, int], bool] = {}  # (encode/decode, width, height) -> tiled
        self.budget = self.free_after_load() if tiling == "auto" else None

    def encode(self, x: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return self.run("encode", x, width, height)

    def decode(self, z: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return self.run("decode", z, width, height)

    def tiles(self, which: str, width: int, height: int) -> bool:
        """Whether this encode or decode of a width x height image runs in tiles: always with vae_tiling=True
        (images larger than one tile), never with False or engines, and with "auto" when the call's traced transient
        (and a staged VAE's weights) plus the plan's margin exceeds the device memory that was free when the
        pipeline was loaded. Decided once per call kind and size, so the same request always gives the same pixels
        (tiling is not exact), whatever else the device holds at the time."""
        if self.tiling is False or self.engines or max(width, height) <= self.tile:
            return False
        if self.tiling is True:
            return True
        if self.budget is None:  # the CPU: its memory is the host's, no device budget to keep to
            return False
        with self._lock:
            key = (which, width, height)
            if key not in self.decisions:
                vae = memory.meta_vae(self.vae.cfg, self.dtype)
                encode, decode = memory.vae_transients(vae, self.dtype, width, height, 1, True)
                need = encode if which == "encode" else decode
                if isinstance(self.vae, StagedVAE):
                    need += self.vae.staged.tensors.nbytes
                self.decisions[key] = need * (1 + memory.MARGIN) > self.budget
            return self.decisions[key]

    def free_after_load(self) -> int | None:
        """The device memory free for the VAE's stages, measured once after loading (None on the CPU): what the
        driver reports free plus what the caching allocator holds without using."""
        if self.device.type != "cuda":
            return None
        free = torch.cuda.mem_get_info(self.device)[0]
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def run(self, which: str, x: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """The VAE's encode or decode of a width x height image, in tiles when _tiles says so (a staged VAE is
        brought to the device once for all the tiles)."""
        tiled = self.tiles(which, width, height)
        staged = self.vae.staged.on_device() if isinstance(self.vae, StagedVAE) else nullcontext(self.vae)
        with staged as vae:
            vae = TiledVAE(vae, self.tile) if tiled else vae
            return getattr(vae, which)(x)
