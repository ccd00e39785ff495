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

This module is the setting only. What carries it out: kontext_rt.streaming (tensors kept in host memory and copied
to the device for their use), kontext_rt.transformer_placement (the transformer's streamed blocks and modulation
layers) and kontext_rt.vae_runner (the staged VAE); kontext_rt.text stages the text encoders.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType

from kontext_rt.errors import InputError

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
