"""Debiaser networks F(x; c_noise): the raw network inside the EDM preconditioning.

- `unet`: DDPM/ADM-style U-Net. Residual blocks (GroupNorm, SiLU, dropout), self-attention at
  chosen resolutions, a noise embedding added in every block, skip connections from encoder to
  decoder. DDPM's CIFAR-10 net is channels=128, channel_mult=(1,2,2,2), num_blocks=2,
  attn_resolutions=(16,), dropout=0.1 (35.7M parameters).
- `dae`: the same encoder/decoder without the skip connections (the paper's DAE ablation).
- `mlp`: residual MLP for 2-D points (the swiss roll).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dkgm.errors import DKGMError

ARCHS = ("unet", "dae", "mlp")


@dataclass(frozen=True)
class NetworkConfig:
    arch: str = "unet"
    channels: int = 32  # base width (unet/dae channels, mlp hidden units)
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution level
    num_blocks: int = 1  # residual blocks per level (mlp: hidden layers)
    attn_resolutions: tuple[int, ...] = (8,)  # feature-map sizes with self-attention
    dropout: float = 0.0
    embedding: str = "positional"  # positional | fourier
    shape: tuple[int, ...] = field(default=(1, 32, 32))  # data shape (C, H, W) or (D,)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "NetworkConfig":
        return NetworkConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------- embeddings


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of c_noise (scaled so that c_noise in [-2, 2] spans many periods)."""

    def __init__(self, dim: int, max_positions: int = 10000, scale: float = 250.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half))
        self.scale = scale

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = (c.float() * self.scale)[:, None] * self.freqs[None]
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise (NCSN++ style; fixed, not trained)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2, generator=torch.Generator().manual_seed(0)) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = (2 * math.pi * c.float())[:, None] * self.freqs[None]
        return torch.cat([x.cos(), x.sin()], dim=1)


def _embedding(kind: str, dim: int) -> nn.Module:
    if kind == "positional":
        return PositionalEmbedding(dim)
    if kind == "fourier":
        return FourierEmbedding(dim)
    raise DKGMError(f"unknown noise embedding {kind!r}: expected positional or fourier")


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0 and ch // g >= 2 or g == 1:
            return g
    return 1


# ----------------------------------------------------------------------------- U-Net parts


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = Attention(cout) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        # SiLU before the per-block projection (as DDPM and EDM): without it this Linear and the
        # embedding MLP's last Linear compose into one affine map of the same features
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        x = self.skip(x) + h
        return self.attn(x) if self.attn is not None else x


class Attention(nn.Module):
    def __init__(self, ch: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Encoder-decoder over (C, H, W) images; `skips=False` gives the DAE ablation."""

    def __init__(self, cfg: NetworkConfig, skips: bool = True):
        super().__init__()
        in_ch, res, _ = cfg.shape
        c = cfg.channels
        emb_dim = 4 * c
        levels = len(cfg.channel_mult)
        if res % (2 ** (levels - 1)):
            raise DKGMError(f"image size {res} is not divisible by 2^{levels - 1} (channel_mult has {levels} levels)")
        self.skips = skips
        self.embed = nn.Sequential(_embedding(cfg.embedding, c), nn.Linear(c, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_ch, c, 3, padding=1)
        self.down = nn.ModuleList()
        skip_ch = [c]
        ch = c
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_blocks):
                self.down.append(ResBlock(ch, c * mult, emb_dim, cfg.dropout, res in cfg.attn_resolutions))
                ch = c * mult
                skip_ch.append(ch)
            if i < levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_ch.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, cfg.dropout, True), ResBlock(ch, ch, emb_dim, cfg.dropout, False)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_blocks + 1):
                extra = skip_ch.pop() if skips else 0
                self.up.append(ResBlock(ch + extra, c * mult, emb_dim, cfg.dropout, res in cfg.attn_resolutions))
                ch = c * mult
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)
        h = self.conv_in(x)
        stack = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            stack.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                if self.skips:
                    h = torch.cat([h, stack.pop()], dim=1)
                h = layer(h, emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLP(nn.Module):
    """Residual MLP for points: the noise embedding is added to every hidden layer. The input
    goes in with fixed random Fourier features (Tancik et al. 2020): a plain coordinate MLP
    needs ~1,000 steps before it starts to resolve the swiss roll's arms, with them ~100."""

    def __init__(self, cfg: NetworkConfig, fourier_features: int = 64, fourier_scale: float = 1.0):
        super().__init__()
        (d,) = cfg.shape
        w = cfg.channels
        self.embed = nn.Sequential(_embedding(cfg.embedding, w), nn.Linear(w, w), nn.SiLU())
        gen = torch.Generator().manual_seed(1)
        self.register_buffer("freqs", torch.randn(d, fourier_features, generator=gen) * fourier_scale)
        self.inp = nn.Linear(d + 2 * fourier_features, w)
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"emb": nn.Linear(w, w), "fc1": nn.Linear(w, w), "fc2": nn.Linear(w, w)}) for _ in range(cfg.num_blocks)]
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(w, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)
        proj = 2 * math.pi * x @ self.freqs
        h = self.inp(torch.cat([x, proj.sin(), proj.cos()], dim=1))
        for b in self.blocks:
            h = h + b["fc2"](self.dropout(F.silu(b["fc1"](F.silu(h + b["emb"](emb))))))
        return self.out(F.silu(h))


def build_network(cfg: NetworkConfig) -> nn.Module:
    if cfg.arch not in ARCHS:
        raise DKGMError(f"unknown architecture {cfg.arch!r}: expected one of {', '.join(ARCHS)}")
    if cfg.arch == "mlp":
        if len(cfg.shape) != 1:
            raise DKGMError(f"arch mlp is for points (shape (D,)), got data of shape {tuple(cfg.shape)}: use unet or dae")
        return MLP(cfg)
    if len(cfg.shape) != 3 or cfg.shape[1] != cfg.shape[2]:
        raise DKGMError(f"arch {cfg.arch} needs square images (C, H, H), got shape {tuple(cfg.shape)}: use mlp for points")
    return UNet(cfg, skips=cfg.arch == "unet")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
