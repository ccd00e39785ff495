"""The FLUX autoencoder (docs/model.md, The autoencoder), LDM parameter names as in ae.safetensors.

Images are (B, 3, H, W) in [-1, 1]; latents are (B, 16, H/8, W/8) already scaled and shifted
(z = scale * (mean - shift)), so encode/decode are exact inverses of the pipeline's conventions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kontext_rt.config import VAEConfig

GN_EPS = 1e-6


def _norm(cfg: VAEConfig, ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, ch, eps=GN_EPS, affine=True)


def _conv_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on the CPU: oneDNN's NHWC convolutions are faster than NCHW at the VAE's channel counts (and
    diffusers' image tensors arrive channels-last, so its VAE runs NHWC); every later op keeps the layout."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cfg, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cfg, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        # in-place SiLU and residual add: each overwrites a temporary of this block, so no new buffer (fresh buffers
        # cost page faults on the CPU); bit for bit the out-of-place result
        x = _conv_layout(x)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs as in the LDM checkpoint."""

    def __init__(self, cfg: VAEConfig, ch: int):
        super().__init__()
        self.norm = _norm(cfg, ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, 1, HW, C) with unit stride along C (a view for channels-last x): SDPA's fused CPU kernel needs it,
        # else it falls back to the math path and materializes the (HW, HW) scores
        q, k, v = (m(n).flatten(2).transpose(1, 2)[:, None].contiguous() for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return self.proj_out(_conv_layout(out)).add_(x)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[-1] == 2:
            # torch 2.13's oneDNN bfloat16 convolution reads past a 3-column input (this stride-2 conv with one
            # output column: a tile or image 8 px wide) and returns NaN or garbage at random. Two more zero columns
            # give it a second output column, which is cropped; the first is the same sum.
            return self.conv(F.pad(x, (0, 3, 0, 1)))[..., :1]
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(_conv_layout(F.interpolate(x, scale_factor=2.0, mode="nearest")))


def _mid(cfg: VAEConfig, ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(cfg, ch, ch)
    mid.attn_1 = AttnBlock(cfg, ch)
    mid.block_2 = ResnetBlock(cfg, ch, ch)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, cout in enumerate(chs):
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(cfg, cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)
            )
            if i < len(chs) - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = _mid(cfg, cin)
        self.norm_out = _norm(cfg, cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(_conv_layout(x))
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        cin = chs[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cfg, cin)
        levels = [None] * len(chs)
        for i in reversed(range(len(chs))):  # built top-down, stored by level index as in the LDM names
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(cfg, cin if j == 0 else chs[i], chs[i]) for j in range(cfg.num_res_blocks + 1)
            )
            if i > 0:
                level.upsample = Upsample(chs[i])
            levels[i] = level
            cin = chs[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, cin)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(_conv_layout(z)))))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent of the posterior mean (no sampling)."""
        mean = self.encoder(x.to(self.encoder.conv_in.weight.dtype)).chunk(2, dim=1)[0]
        return self.cfg.scale_factor * (mean - self.cfg.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z / self.cfg.scale_factor + self.cfg.shift_factor)
