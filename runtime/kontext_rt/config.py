"""Frozen model configs and named presets (docs/model.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class FluxConfig:
    """Architecture of the FLUX MMDiT. Sizes in features; depth in blocks."""

    in_channels: int = 64  # 16 latent channels x 2x2 patch
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL hidden
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, int, int] = (16, 56, 56)  # RoPE dims per id axis, sum = head dim
    theta: int = 10_000
    guidance_embed: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"sum of axes_dim {self.axes_dim} must equal the head dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis dim must be even, got {self.axes_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class VAEConfig:
    """The FLUX autoencoder (docs/model.md, The autoencoder)."""

    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # encoder; the decoder has one more per level
    z_channels: int = 16
    norm_groups: int = 32
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class Variant:
    """Sampling defaults of a checkpoint family (docs/model.md, Sampling)."""

    name: str
    shift_schedule: bool = True  # exponential time shift with mu from the target token count
    max_sequence_length: int = 512  # T5 tokens
    steps: int = 28
    edit_guidance: float = 2.5
    generate_guidance: float = 3.5


VARIANTS: Mapping[str, Variant] = MappingProxyType(
    {
        "flux-kontext-dev": Variant("flux-kontext-dev"),
        "flux-dev": Variant("flux-dev"),
        "flux-schnell": Variant("flux-schnell", shift_schedule=False, max_sequence_length=256, steps=4),
    }
)

_FULL = FluxConfig()

PRESETS: Mapping[str, FluxConfig] = MappingProxyType(
    {
        "flux-kontext-dev": _FULL,
        "flux-dev": _FULL,
        "flux-schnell": dataclasses.replace(_FULL, guidance_embed=False),
        # Small configs for tests and the demo: the same code paths at a size a CPU runs in milliseconds.
        "tiny": FluxConfig(
            vec_in_dim=32,
            context_in_dim=48,
            hidden_size=64,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=(4, 14, 14),
        ),
        "tiny-schnell": FluxConfig(
            vec_in_dim=32,
            context_in_dim=48,
            hidden_size=64,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=(4, 14, 14),
            guidance_embed=False,
        ),
    }
)

VAE_PRESETS: Mapping[str, VAEConfig] = MappingProxyType(
    {
        "flux": VAEConfig(),
        "tiny": VAEConfig(ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4),
    }
)


def infer_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes for a head dim when a checkpoint does not say: FLUX's 1/8 : 7/16 : 7/16 split (128 -> 16,56,56)."""
    if head_dim % 32:
        raise ValueError(
            f"cannot infer the RoPE axes for head dim {head_dim}: FLUX splits it 1/8 : 7/16 : 7/16, which needs a "
            "multiple of 32"
        )
    return (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
