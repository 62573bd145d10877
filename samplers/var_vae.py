"""VAR's multi-scale VQVAE (``vae_ch160v4096z32.pth``): a conv encoder / decoder around a residual
quantiser that writes an image as token maps of growing size (1x1, 2x2, ... 16x16 at 256 px).

State-dict compatible with VAR's files. The quantiser, scale k of K:
  - area-downsample the residual to pn_k x pn_k, take each position's nearest codebook entry;
  - upsample their embeddings to the last scale's size (bicubic; the last scale as is), apply
    phi_k, add to the running reconstruction f_hat, subtract from the residual.
phi(h) = (1 - r) h + r conv3x3(h), r = 0.5; four convs shared over the K scales, scale k using the
one whose tick (linspace(1/12, 11/12, 4)) is nearest to k / (K - 1).

The transformer reads the same f_hat: its input for scale k + 1 is f_hat (after scales 0..k)
area-downsampled to pn_{k+1} (``idx_to_var_input`` for teacher forcing, ``next_input`` while
sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .gpt import check_float_field, check_int_field

DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass
class VARVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: the codebook entries' width
    ch: int = 160
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2  # encoder; the decoder has one more per level
    decoder_num_res_blocks: int | None = None  # None: num_res_blocks + 1, as VAR
    using_sa: bool = True  # self-attention at the lowest resolution
    using_mid_sa: bool = True
    patch_nums: list[int] = field(default_factory=lambda: list(DEFAULT_PATCH_NUMS))
    quant_resi: float = 0.5
    share_quant_resi: int = 4  # 0: one phi per scale, 1: one phi shared, K: K phis shared by nearest tick
    quant_conv_ks: int = 3

    def __post_init__(self) -> None:
        for name, (low, high) in {"vocab_size": (1, 1 << 20), "z_channels": (1, 4096), "ch": (1, 1024),
                                  "num_res_blocks": (1, 16), "share_quant_resi": (0, 64),
                                  "quant_conv_ks": (1, 7)}.items():
            check_int_field("VAR VAE", name, getattr(self, name), low, high)
        if self.decoder_num_res_blocks is not None:
            check_int_field("VAR VAE", "decoder_num_res_blocks", self.decoder_num_res_blocks, 1, 17)
        check_float_field("VAR VAE", "quant_resi", self.quant_resi, -1.0, 1.0)
        for name, high in (("ch_mult", 64), ("patch_nums", 256)):
            values = getattr(self, name)
            if not isinstance(values, list | tuple) or not 1 <= len(values) <= 16:
                raise ValueError(f"VAR VAE config field {name!r} must be a list of 1 to 16 integers")
            for v in values:
                check_int_field("VAR VAE", name, v, 1, high)
            setattr(self, name, [int(v) for v in values])
        if sorted(self.patch_nums) != self.patch_nums or len(set(self.patch_nums)) != len(self.patch_nums):
            raise ValueError(f"patch_nums must grow strictly, got {self.patch_nums}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    @property
    def tokens(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VARVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown VAR VAE config fields: {sorted(unknown)}")
        return cls(**data)


def phi_index_per_scale(num_scales: int, num_phis: int) -> list[int]:
    """Which shared phi conv each scale uses: the tick nearest to k / (K - 1). Computed exactly as
    VAR does (numpy float64 linspace and argmin), which settles the exact ties (k = 2 and k = 7 of
    10 scales) the same way."""
    if num_phis <= 1:
        return [0] * num_scales
    ticks = np.linspace(1 / 3 / num_phis, 1 - 1 / 3 / num_phis, num_phis) if num_phis == 4 \
        else np.linspace(1 / 2 / num_phis, 1 - 1 / 2 / num_phis, num_phis)
    return [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) if num_scales > 1 else 0 for k in range(num_scales)]


# --------------------------------------------------------------------------------------------
# Encoder / decoder (taming-style)
# --------------------------------------------------------------------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over positions; q, k, v from one 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c ** -0.5, dim=2)  # [b, hw_q, hw_k]
        out = torch.bmm(v, weights.transpose(1, 2)).view(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom, as VAR


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution: resnet blocks, attention after each (lowest resolution only), a resampler."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            setattr(self, name, resample)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels) if attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, config: VARVAEConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            blocks, attn = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if i == levels - 1 and config.using_sa:
                    attn.append(AttnBlock(cin))
            self.down.append(_Level(blocks, attn, Downsample(cin) if i != levels - 1 else None, "downsample"))
        self.mid = _Mid(cin, config.using_mid_sa)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, config: VARVAEConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        blocks_per_level = config.decoder_num_res_blocks or config.num_res_blocks + 1
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin, config.using_mid_sa)
        up: list[_Level] = []
        for i in reversed(range(levels)):
            blocks, attn = [], []
            for _ in range(blocks_per_level):
                blocks.append(ResnetBlock(cin, ch * mult[i]))
                cin = ch * mult[i]
                if i == levels - 1 and config.using_sa:
                    attn.append(AttnBlock(cin))
            up.insert(0, _Level(blocks, attn, Upsample(cin) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(up)  # index 0 = the finest level, as VAR stores it
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------
# The multi-scale residual quantiser
# --------------------------------------------------------------------------------------------
class Phi(nn.Conv2d):
    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class _PhiShared(nn.Module):
    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi


class _PhiPartiallyShared(nn.Module):
    def __init__(self, phis: list[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)


class Quantizer(nn.Module):
    def __init__(self, config: VARVAEConfig):
        super().__init__()
        self.patch_nums = list(config.patch_nums)
        self.embedding = nn.Embedding(config.vocab_size, config.z_channels)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), config.vocab_size))

        def phi() -> nn.Module:
            return Phi(config.z_channels, config.quant_resi) if abs(config.quant_resi) > 1e-6 else nn.Identity()

        scales, share = len(self.patch_nums), config.share_quant_resi
        if share == 0:  # one phi per scale (VAR's PhiNonShared is itself the ModuleList)
            self.quant_resi = nn.ModuleList(phi() for _ in range(scales))
            self._phis = list(self.quant_resi)
            index = phi_index_per_scale(scales, scales)
        elif share == 1:
            self.quant_resi = _PhiShared(phi())
            self._phis, index = [self.quant_resi.qresi], [0] * scales
        else:
            self.quant_resi = _PhiPartiallyShared([phi() for _ in range(share)])
            self._phis, index = list(self.quant_resi.qresi_ls), phi_index_per_scale(scales, share)
        self.phi_index = index

    def phi(self, scale: int) -> nn.Module:
        return self._phis[self.phi_index[scale]]

    def _upsampled(self, scale: int, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, pn*pn] of a scale -> their phi'd contribution to f_hat [B, Cvae, H, W]."""
        pn, last = self.patch_nums[scale], self.patch_nums[-1]
        h = self.embedding(ids).transpose(1, 2).reshape(len(ids), -1, pn, pn)
        if scale != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(last, last), mode="bicubic")
        return self.phi(scale)(h)

    def features_to_ids(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features [B, Cvae, H, W] -> token ids per scale, LongTensor [B, pn*pn] each."""
        b, c, h, w = f.shape
        if (h, w) != (self.patch_nums[-1],) * 2:
            raise ValueError(f"features are {h}x{w}, the last scale is {self.patch_nums[-1]}")
        rest, out = f.clone(), []
        book = self.embedding.weight
        book_sq = book.square().sum(dim=1)
        for scale, pn in enumerate(self.patch_nums):
            z = rest if scale == len(self.patch_nums) - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, c)
            dist = torch.addmm(z.square().sum(dim=1, keepdim=True) + book_sq, z, book.T, alpha=-2, beta=1)
            ids = dist.argmin(dim=1).view(b, pn * pn)
            rest = rest - self._upsampled(scale, ids)
            out.append(ids)
        return out

    def train_forward(self, f: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass (VAR's ``VectorQuantizer2.forward``): the residual quantised scale by scale;
        returns (f_hat with a straight-through gradient to f, the VQ loss averaged over the scales:
        beta * |sg(f_hat) - f|^2 + |f_hat - sg(f)|^2, every scale's ids concatenated [B, L])."""
        b, c, h, w = f.shape
        f_detached = f.detach()
        rest, f_hat = f_detached.clone(), torch.zeros_like(f_detached)
        book = self.embedding.weight
        loss, ids_all = f.new_zeros(()), []
        for scale, pn in enumerate(self.patch_nums):
            z = rest if scale == len(self.patch_nums) - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, c)
            with torch.no_grad():
                dist = torch.addmm(z.square().sum(1, keepdim=True) + book.square().sum(1), z, book.T, alpha=-2, beta=1)
                ids = dist.argmin(dim=1).view(b, pn * pn)
            h_up = self._upsampled(scale, ids)  # carries gradients to the codebook and the phi convs
            f_hat = f_hat + h_up
            rest = rest - h_up.detach()
            loss = loss + beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_detached)
            ids_all.append(ids)
        straight_through = f + (f_hat - f).detach()
        return straight_through, loss / len(self.patch_nums), torch.cat(ids_all, dim=1)

    def ids_to_fhat(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token ids per scale -> f_hat [B, Cvae, H, W] after all of them."""
        f_hat = None
        for scale, scale_ids in enumerate(ids):
            h = self._upsampled(scale, scale_ids)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def next_input(self, f_hat: torch.Tensor, scale: int) -> torch.Tensor:
        """f_hat -> the transformer's input for ``scale``: [B, pn*pn, Cvae] (area-downsampled)."""
        pn = self.patch_nums[scale]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)


class VARVAE(nn.Module):
    def __init__(self, config: VARVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = Quantizer(config)
        pad = config.quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, config.quant_conv_ks, padding=pad)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, config.quant_conv_ks, padding=pad)

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def patch_nums(self) -> list[int]:
        return self.config.patch_nums

    def split_scales(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Tokens [B, L] (scales concatenated coarse to fine) -> one [B, pn*pn] per scale."""
        if tokens.shape[1] != self.config.tokens:
            raise ValueError(f"expected {self.config.tokens} tokens per image, got {tokens.shape[1]}")
        return list(tokens.split([pn * pn for pn in self.patch_nums], dim=1))

    @torch.no_grad()
    def img_to_idx(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images [B, 3, H, W] in [-1, 1] -> token ids per scale (VAR's ``img_to_idxBl``)."""
        return self.quantize.features_to_ids(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def idx_to_var_input(self, idx: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token ids per scale -> the transformer's teacher-forcing input [B, L - first, Cvae]
        (VAR's ``idxBl_to_var_input``): for scale k + 1, f_hat after scales 0..k, area-downsampled."""
        inputs, f_hat = [], None
        for scale in range(len(self.patch_nums) - 1):
            h = self.quantize._upsampled(scale, idx[scale])
            f_hat = h if f_hat is None else f_hat + h
            inputs.append(self.quantize.next_input(f_hat, scale + 1))
        return torch.cat(inputs, dim=1)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def decode_code(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L] (scales concatenated coarse to fine) -> images [B, 3, H, W] in [-1, 1]."""
        return self.fhat_to_img(self.quantize.ids_to_fhat(self.split_scales(tokens.to(self.device))))


def build_var_vae(config: VARVAEConfig | dict[str, Any] | None = None, **overrides: Any) -> VARVAE:
    if config is None:
        config = VARVAEConfig(**overrides)
    elif isinstance(config, dict):
        config = VARVAEConfig.from_dict({**config, **overrides})
    elif overrides:
        config = VARVAEConfig.from_dict({**config.to_dict(), **overrides})
    return VARVAE(config)


__all__ = ["VARVAE", "VARVAEConfig", "build_var_vae", "phi_index_per_scale", "DEFAULT_PATCH_NUMS"]
