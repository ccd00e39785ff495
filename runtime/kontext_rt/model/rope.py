"""Position ids and RoPE tables for the [text | target | context...] sequence (docs/model.md, Positions)."""

from __future__ import annotations

import torch


def image_ids(rows: int, cols: int, index: int = 0, device=None) -> torch.Tensor:
    """Ids (index, r, c) of a packed rows x cols grid, row-major: (rows*cols, 3) float32."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.flatten(0, 1)


def sequence_ids(text_len: int, grids: list[tuple[int, int]], device=None) -> torch.Tensor:
    """Ids of the whole sequence: text (all zero), then grid i with axis-0 id i (target 0, context image i)."""
    parts = [torch.zeros(text_len, 3, device=device)]
    parts += [image_ids(r, c, i, device) for i, (r, c) in enumerate(grids)]
    return torch.cat(parts)


def rope_table(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (L, sum(axes_dim)/2), float32: one angle per interleaved pair, axes concatenated.

    Frequencies are computed in float64 as diffusers' FluxPosEmbed does, then the table is cast to float32.
    """
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, axis].to(torch.float64)[:, None] * freqs[None, :])
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()
