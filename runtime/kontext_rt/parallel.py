"""Sequence parallelism as a load option: Pipeline.from_pretrained(..., parallel=N) (docs/python-api.md,
Sequence parallelism).

One edit on N ranks of an initialized torch.distributed process group (torchrun; the CLI's --sequence-parallel
initializes it), Ulysses-style (kontext_rt.model.ulysses). The process group is given here (Parallel.group) or
taken from torch.distributed when the load is checked; nothing is kept in module state.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

import torch

from kontext_rt.errors import InputError


@dataclass(frozen=True)
class Parallel:
    """size ranks, each holding 1/size of the image tokens. group: a torch.distributed ProcessGroup of exactly size
    ranks; None: the default (world) group."""

    size: int
    group: object = None

    @classmethod
    def parse(cls, value) -> Parallel | None:
        """parallel= as given: None or 1 (one process), a rank count, or a Parallel. None for one process."""
        if value is None:
            return None
        p = value if isinstance(value, Parallel) else None
        if p is None and isinstance(value, int) and not isinstance(value, bool):
            p = cls(value)
        if p is None or not isinstance(p.size, int) or isinstance(p.size, bool):
            raise InputError(f"parallel must be a number of ranks or a kontext_rt.Parallel, got {value!r}")
        if p.size < 1:
            raise InputError(f"parallel must be at least 1 (ranks), got {p.size}")
        return None if p.size == 1 and p.group is None else p

    def check_group(self, device: torch.device) -> Parallel:
        """This Parallel with its process group resolved; refused unless one of `size` ranks is initialized and its
        backend moves tensors of `device` (gloo on the CPU, nccl on CUDA)."""
        import torch.distributed as dist

        n = self.size
        if not dist.is_available():
            raise InputError(f"parallel={n} needs torch.distributed, which this torch build does not have")
        if not dist.is_initialized():
            raise InputError(
                f"parallel={n} needs an initialized torch.distributed process group: launch {n} processes with "
                f"`torchrun --nproc-per-node {n}` and call torch.distributed.init_process_group in each (the CLI's "
                "--sequence-parallel does both from torchrun's environment)"
            )
        group = self.group if self.group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if world != n:
            raise InputError(f"parallel={n} but the process group has {world} ranks: they must be equal")
        backend = str(dist.get_backend(group))
        if device.type == "cuda" and backend != "nccl":
            raise InputError(f"parallel={n} on {device}: the process group's backend is {backend}, CUDA needs nccl")
        if device.type == "cpu" and backend == "nccl":
            raise InputError(f"parallel={n} on the CPU: the process group's backend is nccl, the CPU needs gloo")
        return replace(self, group=group)

    def check_model(self, num_heads: int) -> None:
        """Attention is sharded by heads: N must divide them (24 heads: 2, 3, 4, 6, 8, 12 or 24 ranks)."""
        if num_heads % self.size:
            fits = [d for d in range(2, num_heads + 1) if num_heads % d == 0]
            raise InputError(
                f"parallel={self.size} does not divide the model's {num_heads} attention heads (attention is "
                f"split by heads across ranks): use one of {fits}"
            )

    def check_backend(self, backend_name: str, engines: bool) -> None:
        if engines:
            raise InputError(
                f"parallel={self.size} cannot run backend {backend_name!r} (TensorRT engines): they run the whole "
                "transformer as one graph per GPU, with no place for the all-to-alls between ranks; use "
                "backend='eager' or 'triton'"
            )

    def random_seed(self, device: torch.device) -> int:
        """One random seed for every rank (rank 0's): the state must start the same everywhere."""
        import torch.distributed as dist

        seed = torch.tensor([secrets.randbits(63)], dtype=torch.int64, device=device)
        dist.broadcast(seed, src=dist.get_global_rank(self.group, 0), group=self.group)
        return int(seed.item())
