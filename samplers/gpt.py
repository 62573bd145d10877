"""The LlamaGen class-conditional transformer ("c2i" GPT), state-dict compatible.

Read top to bottom: config and presets, the building blocks (RMSNorm, SwiGLU, 2-D rotary
embedding, attention with an optional static KV cache), then the model with its two entry
points: ``forward`` (teacher forcing, no cache) and ``decode_step`` (one token per row, cached).

Parameter names match the public LlamaGen checkpoints exactly (``cls_embedding.embedding_table``,
``layers.N.attention.wqkv`` ...), so their state dicts load unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .validation import interval, is_int_in, is_number_in, short

# (n_layer, n_head, dim) of the public class-conditional models.
GPT_PRESETS: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}

# LlamaGen ModelArgs fields that do not change a class-conditional model's inference.
_IGNORED_LLAMAGEN_FIELDS = {
    "caption_dim", "initializer_range", "max_batch_size", "max_seq_len", "attn_dropout_p",
    "drop_path_rate",
}


# Far above every published model (GPT-3B: 24 layers, dim 3200; 24x24 tokens), far below what
# would exhaust memory: a config outside them is a mistake or an attack.
_GPT_INT_BOUNDS = {"dim": (1, 16384), "n_layer": (1, 512), "n_head": (1, 1024), "vocab_size": (1, 1 << 20),
                   "num_classes": (1, 1 << 20), "block_size": (1, 1 << 14), "cls_token_num": (1, 1),
                   "multiple_of": (1, 1 << 14)}


def check_int_field(kind: str, name: str, value: Any, low: int, high: int) -> None:
    if not is_int_in(value, low, high):
        raise ValueError(f"{kind} config field {name!r} must be an integer in [{low}, {high}], got {short(value)}")


def check_float_field(kind: str, name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    if not is_number_in(value, low, high, low_open):
        raise ValueError(f"{kind} config field {name!r} must be a number in {interval(low, high, low_open)}, "
                         f"got {short(value)}")


@dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    vocab_size: int = 16384
    num_classes: int = 1000
    block_size: int = 256  # number of image tokens, a square grid
    cls_token_num: int = 1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    class_dropout_prob: float = 0.1  # > 0 means the label table has a null-class row
    token_dropout_p: float = 0.1
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    model_type: str = "c2i"

    def __post_init__(self) -> None:
        # A config.json is untrusted input: types and sane bounds before anything is allocated.
        for name, (low, high) in _GPT_INT_BOUNDS.items():
            check_int_field("GPT", name, getattr(self, name), low, high)
        if self.n_kv_head is not None:
            check_int_field("GPT", "n_kv_head", self.n_kv_head, 1, 1024)
        for name in ("rope_base", "norm_eps"):
            check_float_field("GPT", name, getattr(self, name), 0.0, 1e12, low_open=True)
        for name in ("class_dropout_prob", "token_dropout_p", "resid_dropout_p", "ffn_dropout_p"):
            check_float_field("GPT", name, getattr(self, name), 0.0, 1.0)
        if self.ffn_dim_multiplier is not None:
            check_float_field("GPT", "ffn_dim_multiplier", self.ffn_dim_multiplier, 0.0, 64.0, low_open=True)
        if self.model_type != "c2i":
            raise ValueError(f"model_type must be 'c2i' (class-conditional), got {self.model_type!r}")
        if self.cls_token_num != 1:
            raise ValueError(f"cls_token_num must be 1 for class-conditional models, got {self.cls_token_num}")
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for the 2-D rotary embedding")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square number of tokens")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def null_class(self) -> int:
        """Class id of the unconditional row used by classifier-free guidance."""
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - _IGNORED_LLAMAGEN_FIELDS
        if unknown:
            raise ValueError(f"unknown GPT config fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> GPTConfig:
        if preset not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {preset!r}; choose from {sorted(GPT_PRESETS)}")
        return cls(**{**GPT_PRESETS[preset], **overrides})


def image_size_to_block_size(image_size: int, downsample: int = 16) -> int:
    if image_size % downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the downsample factor {downsample}")
    return (image_size // downsample) ** 2


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PACK_FOR_ROWS = 8


class Linear(nn.Linear):
    """nn.Linear that can also hold a oneDNN-prepacked copy of its weight for CPU decoding.

    Two reasons, both measured on a 2-core x86 CPU: the packed GEMV reads weights about 1.5x
    faster than MKL's at batch 1, and its rows are bit-identical whatever the batch size (MKL's
    are not), so a seed gives the same image alone or in a batch. The copy is used only with
    grad disabled and is ignored once the weight changes (its storage or version counter).
    """

    packed: torch.Tensor | None = None
    _packed_key: tuple[int, int] = (0, -1)  # (storage address, version) of the weight it copies

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight behind (an opaque oneDNN tensor; rebuilt on use)."""
        state = self.__dict__.copy()
        state.pop("packed", None)
        state.pop("_packed_key", None)
        return state

    def pack(self) -> bool:
        w = self.weight
        if self.packed is not None and self._packed_key == (w.data_ptr(), w._version):
            return True
        if not (_ONEDNN and w.device.type == "cpu" and w.dtype == torch.float32):
            self.packed = None
            return False
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _PACK_FOR_ROWS)
        self._packed_key = (w.data_ptr(), w._version)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.packed is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and x.dtype == torch.float32 and self._packed_key == (self.weight.data_ptr(), self.weight._version)):
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [],
                                                     "")
            return out.view(*x.shape[:-1], out.shape[-1])
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 even when the weights are bf16, as LlamaGen does.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w1 = Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = Linear(config.ffn_hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.ffn_dropout(out) if self.training else out


def precompute_rope_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int = 1) -> torch.Tensor:
    """Complex rotations [cls_token_num + grid_size**2, head_dim // 2].

    The first half of each head's rotation pairs turns with the token's row, the second half with
    its column. The class token's entries are 0 (not 1): LlamaGen's table is all zeros there, which
    zeroes the class token's query and key. Real checkpoints were trained with that, so keep it.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles_1d = torch.outer(torch.arange(grid_size).float(), freqs)  # [grid, half // 2]
    angles = torch.cat(
        [
            angles_1d[:, None, :].expand(-1, grid_size, -1),  # row
            angles_1d[None, :, :].expand(grid_size, -1, -1),  # column
        ],
        dim=-1,
    ).flatten(0, 1)  # [grid * grid, half]
    # cos/sin rather than torch.polar: bit-identical to LlamaGen's table.
    rope = torch.complex(torch.cos(angles), torch.sin(angles))
    return torch.cat([torch.zeros(cls_token_num, half, dtype=rope.dtype), rope])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; rope complex, broadcastable to [B, T, 1, D // 2]. Computed in fp32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * rope).flatten(3)
    return out if out.dtype == x.dtype else out.to(x.dtype)


@dataclass
class StepPositions:
    """Where one decoding step writes in the KV cache, for rows 0..B-1 of it.

    ``pos`` is an int when every row is at the same position (no mask needed), else a LongTensor
    [B]. ``length`` is max(pos) + 1, the number of cache entries attended to; ``mask`` [B, 1, 1,
    length] hides each row's unfilled entries when positions differ.
    """

    pos: int | torch.Tensor
    length: int
    mask: torch.Tensor | None = None

    @classmethod
    def build(cls, positions: list[int], device: torch.device | str, static_length: int | None = None
              ) -> StepPositions:
        """From each row's position. ``static_length`` (the cache length) gives every step the same
        shapes, masks included, so a compiled step never recompiles; eager steps attend only over
        the filled prefix instead."""
        first, length = positions[0], max(positions) + 1
        if static_length is None and all(p == first for p in positions):
            return cls(first, length)
        length = static_length or length
        pos = torch.tensor(positions, device=device)
        mask = torch.arange(length, device=device)[None, :] <= pos[:, None]
        return cls(pos, length, mask[:, None, None, :])


class KVCache(nn.Module):
    """Static, preallocated keys and values [max_rows, n_kv_head, max_seq, head_dim]."""

    def __init__(self, max_rows: int, n_kv_head: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (max_rows, n_kv_head, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, step: StepPositions, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, 1, D] at each row's position; return the filled prefix of rows 0..B-1."""
        rows = k.shape[0]
        if isinstance(step.pos, int):
            self.k_cache[:rows, :, step.pos] = k[:, :, 0]
            self.v_cache[:rows, :, step.pos] = v[:, :, 0]
        else:
            index = torch.arange(rows, device=k.device)
            self.k_cache[index, :, step.pos] = k[:, :, 0]
            self.v_cache[index, :, step.pos] = v[:, :, 0]
        return self.k_cache[:rows, :, : step.length], self.v_cache[:rows, :, : step.length]

    def move_row(self, src: int, dst: int) -> None:
        self.k_cache[dst] = self.k_cache[src]
        self.v_cache[dst] = self.v_cache[src]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.wqkv = Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = Linear(config.dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, step: StepPositions | None) -> torch.Tensor:
        batch, seq, dim = x.shape
        qk_heads = self.n_head + self.n_kv_head
        qk, v = self.wqkv(x).split([qk_heads * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        # One rotation for queries and keys together: fewer small ops per decoding step.
        qk = apply_rope(qk.view(batch, seq, qk_heads, self.head_dim), rope).transpose(1, 2)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        v = v.view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        gqa = self.n_kv_head != self.n_head
        if step is None:  # teacher forcing over the whole sequence
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = self.kv_cache.update(step, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, enable_gqa=gqa)
        out = self.wo(out.transpose(1, 2).reshape(batch, seq, dim))
        return self.resid_dropout(out) if self.training else out


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, step: StepPositions | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, step)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class ids -> vectors; row ``num_classes`` is the null (unconditional) class when present."""

    def __init__(self, num_classes: int, dim: int, has_null_class: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, init: bool = True):
        """``init=False`` skips the random initialisation (a checkpoint is about to replace it; the
        loaders also build on the meta device, so no weight memory is touched before loading)."""
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.has_null_class)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        # A plain attribute, not a buffer: it must stay complex64 when the weights go to bf16, and
        # it is not part of the checkpoint format.
        with torch.device("cpu"):  # real even when the weights are built on the meta device
            self._rope = precompute_rope_2d(config.grid_size, config.head_dim, config.rope_base)
        if init:
            self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """LlamaGen's initialisation: N(0, std) for linears and embeddings, zero output layer."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.zeros_(self.output.weight)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def rope(self) -> torch.Tensor:
        if self._rope.device != self.device:
            self._rope = self._rope.to(self.device)
        return self._rope

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. cond [B] class ids, tokens [B, T] with T < block_size.

        Returns fp32 logits [B, T + 1, vocab]: row i is the distribution of image token i given the
        class and tokens[:, :i].
        """
        seq = tokens.shape[1] + 1
        if seq > self.config.block_size:
            raise ValueError(f"tokens has {seq - 1} positions; at most {self.config.block_size - 1} allowed")
        x = torch.cat([self.cls_embedding(cond)[:, None], self.tok_embeddings(tokens)], dim=1)
        if self.training:
            x = self.tok_dropout(x)
        rope = self.rope()[:seq].view(1, seq, 1, -1)
        for layer in self.layers:
            x = layer(x, rope, None)
        return self.output(self.norm(x)).float()

    # ---- cached decoding -------------------------------------------------------------------
    def setup_kv_cache(self, max_rows: int, dtype: torch.dtype | None = None) -> None:
        """Allocate each layer's static cache for ``max_rows`` rows of a full image."""
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_rows, self.config.kv_heads, self.config.block_size, self.config.head_dim,
                dtype or self.dtype, self.device,
            )

    @property
    def kv_cache_rows(self) -> int:
        cache = self.layers[0].attention.kv_cache
        return 0 if cache is None else cache.k_cache.shape[0]

    def pack_linears(self) -> bool:
        """Prepack every linear layer's weight for fast, batch-invariant CPU decoding.

        Costs a second copy of the linear weights; a no-op (False) off CPU fp32 or without oneDNN.
        """
        return all([m.pack() for m in self.modules() if isinstance(m, Linear)])

    def move_cache_row(self, src: int, dst: int) -> None:
        for layer in self.layers:
            layer.attention.kv_cache.move_row(src, dst)

    def decode_step(self, inputs: torch.Tensor, step: StepPositions) -> torch.Tensor:
        """One new position for cache rows 0..B-1. inputs [B]: the class id for rows at position 0
        (the class token), else the previous image token. Returns fp32 logits [B, vocab]."""
        x = self._embed_step(inputs, step.pos)
        rope = self.rope()[step.pos]
        rope = rope.view(1, 1, 1, -1) if isinstance(step.pos, int) else rope.view(-1, 1, 1, rope.shape[-1])
        for layer in self.layers:
            x = layer(x, rope, step)
        return self.output(self.norm(x[:, 0])).float()

    def _embed_step(self, inputs: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        if isinstance(pos, int):
            table = self.cls_embedding if pos == 0 else self.tok_embeddings
            return table(inputs)[:, None]
        is_cls = pos == 0
        cls = self.cls_embedding(inputs.masked_fill(~is_cls, 0))
        tok = self.tok_embeddings(inputs.masked_fill(is_cls, 0))
        return torch.where(is_cls[:, None], cls, tok)[:, None]


def build_gpt(preset_or_config: str | GPTConfig | dict[str, Any] = "GPT-B", **overrides: Any) -> GPT:
    """A GPT from a preset name ("GPT-B" ... "GPT-3B"), a GPTConfig or a config dict.

    Keyword overrides replace config fields, e.g. ``build_gpt("GPT-B", block_size=576)``.
    ``image_size=384`` is accepted as a shorthand for ``block_size=(384 // 16) ** 2``.
    """
    if "image_size" in overrides:
        overrides["block_size"] = image_size_to_block_size(overrides.pop("image_size"))
    if isinstance(preset_or_config, str):
        config = GPTConfig.from_preset(preset_or_config, **overrides)
    elif isinstance(preset_or_config, GPTConfig):
        config = GPTConfig.from_dict({**preset_or_config.to_dict(), **overrides})
    elif isinstance(preset_or_config, dict):
        config = GPTConfig.from_dict({**preset_or_config, **overrides})
    else:
        raise TypeError(f"expected a preset name, GPTConfig or dict, got {type(preset_or_config).__name__}")
    return GPT(config)
