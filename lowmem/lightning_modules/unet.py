"""A small U-Net for noise prediction: (noisy image, timestep) -> predicted noise.

Sinusoidal timestep embedding -> MLP; residual blocks with GroupNorm and an added time projection;
``len(channels)`` resolution levels (stride-2 down, nearest-neighbour up) with skip connections.
Image sides must be divisible by ``2 ** (len(channels) - 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowmem.lightning_modules.validation import check_group_norm, check_int_list, check_positive_int, config_error

__all__ = ["UNet", "timestep_embedding", "check_unet_args", "norm_widths"]


def norm_widths(channels: tuple[int, ...] | list[int]) -> list[int]:
    """The channel counts of the GroupNorms :class:`UNet` builds for ``channels`` (a level's width,
    and on the way up a level's width plus its skip connection)."""
    widths, ch = [], channels[0]
    for c in channels:
        widths += [ch, c]
        ch = c
    widths += [ch, ch]  # mid block
    for i, c in reversed(list(enumerate(channels))):
        widths += [ch + c, c]
        ch = channels[i - 1] if i > 0 else c
    return widths + [ch]


def check_unet_args(prefix: str, in_channels: int, channels: list[int], time_dim: int) -> None:
    """The U-Net's arguments, each error naming ``prefix + name`` (``model.init_args.``, ``UNet.``)."""
    check_positive_int(prefix + "in_channels", in_channels, fix="set the image channels, e.g. 1 for digits, 3 for RGB")
    check_int_list(prefix + "channels", channels, 1, fix="give the channels of each resolution level, e.g. [32, 64]")
    check_group_norm(prefix + "channels", channels, norm_widths(channels),
                     fix="use multiples of 8 (or widths below 8), e.g. [32, 64]")  # fmt: skip
    check_positive_int(prefix + "time_dim", time_dim, fix="set an even width, e.g. 128")
    if time_dim % 2:
        raise config_error(prefix + "time_dim", time_dim, "must be even (the timestep embedding is cos and sin "
                           "halves)", f"set {time_dim + 1}")  # fmt: skip


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): cos/sin at frequencies max_period^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time_proj(temb)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64), time_dim: int = 128) -> None:
        super().__init__()
        check_unet_args("UNet.", in_channels, channels, time_dim)
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = channels[0]
        for i, c in enumerate(channels):
            self.down_blocks.append(ResBlock(ch, c, time_dim))
            ch = c
            if i < len(channels) - 1:
                self.downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = ResBlock(ch, ch, time_dim)
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            self.up_blocks.append(ResBlock(ch + c, c, time_dim))
            ch = c
            if i > 0:
                self.upsamples.append(nn.Conv2d(ch, channels[i - 1], 3, padding=1))
                ch = channels[i - 1]
        self.out_norm = _norm(ch)
        self.out_conv = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.time_dim))
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, temb)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        h = self.mid(h, temb)
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if i < len(self.upsamples):
                h = self.upsamples[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out_conv(F.silu(self.out_norm(h)))
