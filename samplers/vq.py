"""The LlamaGen VQ tokenizer (VQ-16 / VQ-8), state-dict compatible with the public checkpoints.

A conv encoder/decoder (taming-transformers style: GroupNorm, swish, ResNet blocks, one
self-attention stage at the lowest resolution) around an l2-normalised codebook. Decoding maps
codes [B, h*w] to images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gpt import check_float_field, check_int_field

VQ_PRESETS: dict[str, dict[str, Any]] = {
    "VQ-16": {"encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4]},
    "VQ-8": {"encoder_ch_mult": [1, 2, 2, 4], "decoder_ch_mult": [1, 2, 2, 4]},
}


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # keeps LlamaGen's `quantize.codebook_used` buffer
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    # Fixed in LlamaGen; configurable here for small custom tokenizers.
    ch: int = 128
    num_res_blocks: int = 2
    norm_groups: int = 32

    def __post_init__(self) -> None:
        # A config.json is untrusted input: types and sane bounds before anything is allocated.
        for name, (low, high) in {"codebook_size": (1, 1 << 20), "codebook_embed_dim": (1, 4096),
                                  "z_channels": (1, 4096), "ch": (1, 1024), "num_res_blocks": (0, 16),
                                  "norm_groups": (1, 1024)}.items():
            check_int_field("VQ", name, getattr(self, name), low, high)
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mults = getattr(self, name)
            if not isinstance(mults, list | tuple) or not 1 <= len(mults) <= 8:
                raise ValueError(f"VQ config field {name!r} must be a list of 1 to 8 channel multipliers")
            for m in mults:
                check_int_field("VQ", name, m, 1, 64)
            setattr(self, name, [int(m) for m in mults])
        for name in ("commit_loss_beta", "entropy_loss_ratio", "dropout_p"):
            check_float_field("VQ", name, getattr(self, name), 0.0, 1e6)
        for width in {self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult}:
            if width % self.norm_groups:
                raise ValueError(f"channel width {width} is not divisible by norm_groups {self.norm_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown VQ config fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> VQConfig:
        if preset not in VQ_PRESETS:
            raise ValueError(f"unknown VQ preset {preset!r}; choose from {sorted(VQ_PRESETS)}")
        return cls(**{**VQ_PRESETS[preset], **overrides})


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1 conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [b, 1, hw, c]
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in taming


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run_level(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One resolution level: its ResNet blocks, each followed by attention where the level has it."""
    for i, res in enumerate(block.res):
        h = res(h)
        if len(block.attn):
            h = block.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, config: VQConfig, in_channels: int = 3):
        super().__init__()
        ch, mult, groups, n_res = config.ch, config.encoder_ch_mult, config.norm_groups, config.num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n_res):
                block.res.append(ResnetBlock(block_in, ch * m, config.dropout_p, groups))
                block_in = ch * m
                if level == len(mult) - 1:
                    block.attn.append(AttnBlock(block_in, groups))
            if level != len(mult) - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([
            ResnetBlock(block_in, block_in, config.dropout_p, groups),
            AttnBlock(block_in, groups),
            ResnetBlock(block_in, block_in, config.dropout_p, groups),
        ])
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VQConfig, out_channels: int = 3):
        super().__init__()
        ch, mult, groups, n_res = config.ch, config.decoder_ch_mult, config.norm_groups, config.num_res_blocks
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList([
            ResnetBlock(block_in, block_in, config.dropout_p, groups),
            AttnBlock(block_in, groups),
            ResnetBlock(block_in, block_in, config.dropout_p, groups),
        ])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n_res + 1):
                block.res.append(ResnetBlock(block_in, ch * mult[level], config.dropout_p, groups))
                block_in = ch * mult[level]
                if level == len(mult) - 1:
                    block.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.l2_norm = config.codebook_l2_norm
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.codebook_size, 1.0 / config.codebook_size)
        if self.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if config.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] -> code ids [N] of the nearest (cosine, when l2-normalised) entries."""
        book = self.codebook()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        dist = z.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * z @ book.t()
        return dist.argmin(dim=1)

    def lookup(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """codes [B, h*w] -> quantised latents [B, D, h, w]."""
        h, w = grid
        z = self.codebook()[codes]  # [B, h*w, D]
        return z.reshape(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> pre-quantisation latents [B, D, H/ds, W/ds]."""
        return self.quant_conv(self.encoder(images))

    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> code ids [B, h*w] (row-major grid)."""
        z = self.encode_latents(images)
        b, d, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h * w)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def decode_code(self, codes: torch.Tensor, grid: tuple[int, int] | None = None,
                    clamp: bool = True) -> torch.Tensor:
        """codes [B, h*w] -> images [B, 3, H, W], clamped to [-1, 1] unless ``clamp=False``.

        ``grid`` is (h, w); a square grid is assumed when it is omitted.
        """
        if codes.dim() != 2:
            raise ValueError(f"codes must be [B, h*w], got shape {tuple(codes.shape)}")
        if grid is None:
            side = int(round(codes.shape[1] ** 0.5))
            grid = (side, side)
        if grid[0] * grid[1] != codes.shape[1]:
            raise ValueError(f"grid {tuple(grid)} does not hold {codes.shape[1]} codes")
        if int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size:
            raise ValueError(f"code ids must be in [0, {self.config.codebook_size - 1}]")
        images = self.decode_latents(self.quantize.lookup(codes, grid))
        return images.clamp(-1, 1) if clamp else images


def build_vq(preset_or_config: str | VQConfig | dict[str, Any] = "VQ-16", **overrides: Any) -> VQModel:
    """A VQ tokenizer from a preset ("VQ-16", "VQ-8"), a VQConfig or a config dict."""
    if isinstance(preset_or_config, str):
        config = VQConfig.from_preset(preset_or_config, **overrides)
    elif isinstance(preset_or_config, VQConfig):
        config = VQConfig.from_dict({**preset_or_config.to_dict(), **overrides})
    elif isinstance(preset_or_config, dict):
        config = VQConfig.from_dict({**preset_or_config, **overrides})
    else:
        raise TypeError(f"expected a preset name, VQConfig or dict, got {type(preset_or_config).__name__}")
    return VQModel(config)
