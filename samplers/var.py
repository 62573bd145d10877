"""VAR (next-scale prediction): a class-conditional transformer that predicts a whole token map per
step, coarse to fine, over the multi-scale VQVAE of ``samplers.var_vae``.

State-dict compatible with VAR's files (``var_d16.pth`` ... ``var_d30.pth``) and their CCA tunes.
Read top to bottom:
- the input of scale 0 is the class embedding + ``pos_start``; of scale k + 1 the running f_hat
  area-downsampled to that scale, through ``word_embed`` (continuous features, not token
  embeddings); every position adds its level and position embeddings;
- each block is AdaLN self-attention: LayerNorm without affine, modulated by six vectors from the
  class embedding (gamma1, gamma2, scale1, scale2, shift1, shift2); attention with q and k
  l2-normalised and a learned per-head scale, biases on q and v only; a tanh-GELU MLP;
- teacher forcing (``forward``) masks block-causally: a token sees its own and earlier scales;
- sampling (``VARDecoder``) keeps a key/value cache across scales, one step per scale.

Guidance: one convention across families, ``s = 1`` unguided, logits ``s c - (s - 1) u`` (VAR's
``(1 + t) c - t u`` with t = s - 1). VAR ramps it over the scales by default:
``s_k = 1 + (s - 1) k / (K - 1)``, so VAR's ``cfg=1.5`` is ``cfg_scale=2.5``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .generate import ImageJob, uniform_noise
from .gpt import Linear, check_float_field, check_int_field
from .modes import InvalidRequest, SamplingOptions, check_class, check_seed
from .var_vae import DEFAULT_PATCH_NUMS, VARVAE

# The CCA paper's VAR presets: depth -> (width 64 * depth, heads = depth); 256 px, 10 scales
VAR_DEPTHS = (16, 20, 24, 30)


@dataclass
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae, the VAE's code width
    patch_nums: list[int] = field(default_factory=lambda: list(DEFAULT_PATCH_NUMS))
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    shared_aln: bool = False
    cond_drop_rate: float = 0.1  # training only: labels become the null class with this probability
    drop_path_rate: float = 0.0  # training only (VAR: 0.1 * depth / 24)

    def __post_init__(self) -> None:
        for name, (low, high) in {"depth": (1, 256), "embed_dim": (1, 16384), "num_heads": (1, 256),
                                  "num_classes": (1, 1 << 20), "vocab_size": (1, 1 << 20),
                                  "z_channels": (1, 4096)}.items():
            check_int_field("VAR", name, getattr(self, name), low, high)
        check_float_field("VAR", "mlp_ratio", self.mlp_ratio, 0.0, 64.0, low_open=True)
        check_float_field("VAR", "norm_eps", self.norm_eps, 0.0, 1.0, low_open=True)
        check_float_field("VAR", "cond_drop_rate", self.cond_drop_rate, 0.0, 1.0)
        check_float_field("VAR", "drop_path_rate", self.drop_path_rate, 0.0, 1.0)
        if not isinstance(self.patch_nums, list | tuple) or not 1 <= len(self.patch_nums) <= 16:
            raise ValueError("VAR config field 'patch_nums' must be a list of 1 to 16 integers")
        for pn in self.patch_nums:
            check_int_field("VAR", "patch_nums", pn, 1, 256)
        self.patch_nums = [int(p) for p in self.patch_nums]
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def block_size(self) -> int:
        """Tokens per image (all scales): 680 at 256 px."""
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def has_null_class(self) -> bool:
        return True  # VAR's label table always has the null row

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def scale_starts(self) -> list[int]:
        starts, at = [], 0
        for pn in self.patch_nums:
            starts.append(at)
            at += pn * pn
        return starts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VARConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown VAR config fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_depth(cls, depth: int, **overrides: Any) -> VARConfig:
        """VAR's build_vae_var: width 64 * depth, depth heads, drop-path 0.1 * depth / 24."""
        base = {"depth": depth, "embed_dim": 64 * depth, "num_heads": depth, "drop_path_rate": 0.1 * depth / 24}
        return cls(**{**base, **overrides})


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        c, h = config.embed_dim, config.num_heads
        self.num_heads, self.head_dim = h, config.head_dim
        self.l2_norm = config.attn_l2_norm
        if self.l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, h, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
            self.scale = 1.0
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        self.proj = Linear(c, c)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, l, C] -> q, k, v [B, H, l, head_dim], q and k normalised when the model does."""
        b, length, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = (self.mat_qkv(x) + bias).view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            k = F.normalize(k, dim=-1)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        b, _, length, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, length, -1))


class FFN(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        hidden = round(config.embed_dim * config.mlp_ratio)
        self.fc1 = Linear(config.embed_dim, hidden)
        self.fc2 = Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class AdaLNBlock(nn.Module):
    def __init__(self, config: VARConfig, drop_path: float = 0.0):
        super().__init__()
        c = config.embed_dim
        self.attn = SelfAttention(config)
        self.ffn = FFN(config)
        self.norm_eps = config.norm_eps
        self.drop_path = drop_path
        if config.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), Linear(c, 6 * c))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, C] (the class embedding, or the shared AdaLN's [B, 1, 6, C]) -> [B, 1, 6, C]:
        gamma1, gamma2, scale1, scale2, shift1, shift2."""
        c = self.attn.proj.weight.shape[0]
        if hasattr(self, "ada_gss"):
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, c)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attend: Any,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        """``attend(q, k, v)`` does the attention itself: masked (teacher forcing) or against the
        cache (sampling). ``modulation`` [B, 1, 6, C], when given, replaces ``modulation(cond)`` (the
        sampler computes it once per image: it depends on the class only)."""
        mods = self.modulation(cond) if modulation is None else modulation
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)
        ln = F.layer_norm(x, x.shape[-1:], eps=self.norm_eps)
        x = x + _drop_path(attend(*self.attn.qkv(ln * (scale1 + 1) + shift1)) * gamma1, self.drop_path,
                           self.training)
        ln = F.layer_norm(x, x.shape[-1:], eps=self.norm_eps)
        return x + _drop_path(self.ffn(ln * (scale2 + 1) + shift2) * gamma2, self.drop_path, self.training)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        self.norm_eps = config.norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(config.embed_dim, 2 * config.embed_dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, C] -> [B, 1, 2, C]: scale, shift."""
        return self.ada_lin(cond).view(len(cond), 1, 2, -1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, modulation: torch.Tensor | None = None) -> torch.Tensor:
        scale, shift = (self.modulation(cond) if modulation is None else modulation).unbind(2)
        return F.layer_norm(x, x.shape[-1:], eps=self.norm_eps) * (scale + 1) + shift


class SharedAdaLin(Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class VAR(nn.Module):
    def __init__(self, config: VARConfig, vae: VARVAE | None = None):
        super().__init__()
        self.config = config
        c, lengths = config.embed_dim, config.patch_nums
        first = lengths[0] ** 2
        self.word_embed = Linear(config.z_channels, c)
        self.class_emb = nn.Embedding(config.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.zeros(1, first, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, config.block_size, c))
        self.lvl_embed = nn.Embedding(config.num_scales, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c)) if config.shared_aln else nn.Identity()
        depth = config.depth  # drop-path grows linearly with the block index, as VAR
        rates = [config.drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(AdaLNBlock(config, rates[i]) for i in range(config.depth))
        level = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(lengths)])
        # Stored in VAR's files: the scale of each position, and the block-causal mask (0 / -inf)
        self.register_buffer("lvl_1L", level.view(1, -1).clone())
        mask = torch.where(level[:, None] >= level[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, config.block_size, config.block_size))
        self.head_nm = AdaLNBeforeHead(config)
        self.head = Linear(c, config.vocab_size)
        self._vae = (vae,)  # held, not a submodule: its weights are another file

    @property
    def vae(self) -> VARVAE:
        if self._vae[0] is None:
            raise ValueError("this VAR model has no tokenizer attached; load it with samplers.load_var(path, vae)")
        return self._vae[0]

    def attach_vae(self, vae: VARVAE) -> None:
        if vae.patch_nums != self.config.patch_nums or vae.config.vocab_size != self.config.vocab_size \
                or vae.config.z_channels != self.config.z_channels:
            raise ValueError(f"the VAE (scales {vae.patch_nums}, vocab {vae.config.vocab_size}, Cvae "
                             f"{vae.config.z_channels}) does not fit this VAR (scales {self.config.patch_nums}, "
                             f"vocab {self.config.vocab_size}, Cvae {self.config.z_channels})")
        self._vae = (vae,)

    @property
    def device(self) -> torch.device:
        return self.class_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.class_emb.weight.dtype

    def level_pos(self) -> torch.Tensor:
        """Level + position embedding of every position [1, L, C]."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids [B] -> (class embedding [B, C], what the blocks' AdaLN takes)."""
        cond = self.class_emb(labels)
        return cond, self.shared_ada_lin(cond)

    def first_input(self, cond: torch.Tensor) -> torch.Tensor:
        """Scale 0's input [B, first, C] (without the level/position embedding)."""
        return cond[:, None] + self.pos_start

    def logits(self, x: torch.Tensor, cond: torch.Tensor, modulation: torch.Tensor | None = None) -> torch.Tensor:
        # the final norm in fp32, as VAR; the head in the weights' dtype, logits back to fp32
        return self.head(self.head_nm(x.float(), cond, modulation).to(self.head.weight.dtype)).float()

    def row_modulations(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything a row's class fixes for the whole image, computed once: (class embedding [R, C],
        block modulations [R, depth, 6, C], head modulation [R, 2, C])."""
        emb, ada = self.condition(labels)
        blocks = torch.stack([block.modulation(ada)[:, 0] for block in self.blocks], dim=1)
        return emb, blocks, self.head_nm.modulation(emb)[:, 0]

    def forward(self, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher forcing (VAR's ``forward``). cond [B] class ids (the null class is
        ``num_classes``), x [B, L - first, Cvae] the next-scale inputs (``vae.idx_to_var_input``).
        Returns fp32 logits [B, L, V]. Labels are swapped for the null class with probability
        ``cond_drop_rate`` only while training."""
        b = x.shape[0]
        if self.training and self.config.cond_drop_rate > 0:
            drop = torch.rand(b, device=cond.device) < self.config.cond_drop_rate
            cond = torch.where(drop, torch.full_like(cond, self.config.num_classes), cond)
        emb, ada = self.condition(cond)
        h = torch.cat([self.first_input(emb), self.word_embed(x.float())], dim=1) + self.level_pos()
        mask = self.attn_bias_for_masking.to(h.dtype)
        for block in self.blocks:
            h = block(h, ada, lambda q, k, v, blk=block: blk.attn.attend(q, k, v, mask))
        return self.logits(h, emb)


def build_var(config: VARConfig | dict[str, Any] | int = 16, vae: VARVAE | None = None, **overrides: Any) -> VAR:
    """A VAR from a depth (16, 20, 24, 30: VAR's presets), a VARConfig or a config dict."""
    if isinstance(config, int):
        config = VARConfig.from_depth(config, **overrides)
    elif isinstance(config, dict):
        config = VARConfig.from_dict({**config, **overrides})
    elif overrides:
        config = VARConfig.from_dict({**config.to_dict(), **overrides})
    model = VAR(config)
    if vae is not None:
        model.attach_vae(vae)
    return model


# --------------------------------------------------------------------------------------------
# Sampling: logits -> tokens, VAR's filtering rules
# --------------------------------------------------------------------------------------------
def scale_guidance(cfg_scale: float, scale: int, num_scales: int, schedule: str) -> float:
    """The guidance scale used at one scale: VAR's linear ramp from 1 (unguided) at scale 0 to
    ``cfg_scale`` at the last, or ``cfg_scale`` throughout."""
    if schedule == "constant" or num_scales == 1:
        return cfg_scale
    return 1.0 + (cfg_scale - 1.0) * scale / (num_scales - 1)


def sample_scale(logits: torch.Tensor, key: int, first_token: int, options: SamplingOptions) -> torch.Tensor:
    """One image's tokens for one scale: logits [l, V] -> ids [l], with VAR's top-k / top-p rules,
    from the image's own seeded noise (a hash of seed and token index), so the draw never depends
    on the batch. Works on the top-k candidates only (sorted once), not the whole vocabulary."""
    if options.top_k == 1 or options.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / max(options.temperature, 1e-5)
    if 0 < options.top_k < logits.shape[-1]:
        kth = logits.topk(options.top_k, dim=-1).values[:, -1:]
        kept = int((logits >= kth).sum(dim=-1).max())  # ties at the k-th value stay, as VAR keeps them
        values, order = logits.topk(kept, dim=-1)  # descending
        values = values.masked_fill(values < kth, -torch.inf)
    else:
        values, order = logits.sort(dim=-1, descending=True)
    if options.top_p < 1.0:
        probs = values.softmax(dim=-1)
        mass_up_to = probs.flip(-1).cumsum(dim=-1).flip(-1)  # VAR's ascending cumulative probability
        remove = mass_up_to <= (1 - options.top_p)
        remove[:, 0] = False  # never the most likely token
        values = values.masked_fill(remove, -torch.inf)
    cdf = values.softmax(dim=-1).cumsum(dim=-1)
    index = torch.arange(first_token, first_token + len(logits), device=logits.device)
    u = uniform_noise(torch.full((len(logits),), key, dtype=torch.int64, device=logits.device), index)
    pick = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)
    return order.gather(1, pick).squeeze(1)


def smooth_embedding(logits: torch.Tensor, key: int, first_token: int, scale: int, num_scales: int,
                     book: torch.Tensor) -> torch.Tensor:
    """VAR's ``more_smooth``: a soft Gumbel mix of the codebook instead of the sampled entries
    (display only; the tokens are unchanged). Noise from the image's seed, as for sampling."""
    ratio = scale / max(1, num_scales - 1)
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    length, vocab = logits.shape
    index = (torch.arange(first_token, first_token + length, device=logits.device)[:, None] * vocab
             + torch.arange(vocab, device=logits.device)[None, :] + (1 << 40))  # apart from the sampling draws
    u = uniform_noise(torch.full_like(index, key), index)
    gumbel = -(-u.log()).log()
    return torch.softmax((logits * (1 + ratio) + gumbel) / tau, dim=-1) @ book


# --------------------------------------------------------------------------------------------
# The decoding loop: one step = one scale for every image in it
# --------------------------------------------------------------------------------------------
class _VARImage:
    """Per-image state between steps: its scale, running f_hat and next input."""

    def __init__(self, job: ImageJob, f_hat_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        self.job = job
        self.scale = 0
        self.f_hat = torch.zeros(f_hat_shape, device=device, dtype=torch.float32)
        self.next_input: torch.Tensor | None = None  # [l, C] word-embedded input of the coming scale
        # per row of the image (cond, then uncond): class embedding, block and head modulations
        self.rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class VARDecoder:
    """Rows of one VAR model's static KV cache, decoded a scale per step.

    Images join with ``add`` between steps and leave when their last scale is sampled. Guided
    images take two rows (class and null), guidance-free ones one. Each step runs one forward pass
    per group of images at the same scale (same length, same cache span); ``generate()`` starts all
    images together, so there it is one pass. Row slots are kept, not compacted: a group whose
    slots are contiguous reads the cache as a view.
    """

    def __init__(self, var: VAR, max_rows: int, compile: bool = False):
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.var = var
        self.vae = var.vae
        self.max_rows = max_rows
        c = var.config
        self.num_tokens = c.block_size
        shape = (max_rows, c.num_heads, c.block_size, c.head_dim)
        # empty, not zeros: a slot's span is always written before it is read
        self.k_cache = [torch.empty(shape, device=var.device, dtype=var.dtype) for _ in var.blocks]
        self.v_cache = [torch.empty(shape, device=var.device, dtype=var.dtype) for _ in var.blocks]
        self.free_slots = list(range(max_rows))
        self.jobs: list[ImageJob] = []
        self._state: dict[int, _VARImage] = {}
        self.steps = 0
        self.rows_log: deque[int] = deque(maxlen=1 << 16)
        self.level_pos = None
        self.sample_fn = sample_scale  # tests swap it to force tokens
        self.compiled = compile
        # compile=True (meant for CUDA): the trunk of a step under torch.compile with static shapes.
        # The eager trunk is not stored as a bound method: that would be a reference cycle, and the
        # KV cache of every finished decoder would wait for the cycle collector (an evaluation
        # loop ran out of memory that way).
        self._compiled_trunk = torch.compile(self._trunk_eager, dynamic=False) if compile else None
        for module in var.modules():
            if isinstance(module, Linear):
                module.pack()

    @property
    def rows_in_use(self) -> int:
        return self.max_rows - len(self.free_slots)

    def free_rows(self) -> int:
        return len(self.free_slots)

    def add(self, class_id: int, seed: int, options: SamplingOptions, tag: object = None) -> ImageJob:
        config = self.var.config
        class_id = check_class(class_id, config.num_classes, allow_null=True)
        seed = check_seed(seed)
        check_var_options(options)
        if options.rows > self.free_rows():
            raise RuntimeError(f"no room: the image needs {options.rows} rows, {self.free_rows()} free")
        job = ImageJob(class_id, seed, options, tag=tag)
        job.cond_row = self.free_slots.pop(0)
        if options.guided:
            job.uncond_row = self.free_slots.pop(0)
        state = _VARImage(job, (self.vae.config.z_channels, config.patch_nums[-1], config.patch_nums[-1]),
                          self.var.device, self.var.dtype)
        self._state[id(job)] = state
        self.jobs.append(job)
        return job

    def cancel(self, job: ImageJob) -> None:
        if job in self.jobs:
            self._release(job)

    def _release(self, job: ImageJob) -> None:
        self.jobs.remove(job)
        self._state.pop(id(job), None)
        for row in (job.cond_row, job.uncond_row):
            if row >= 0:
                self.free_slots.append(row)
        self.free_slots.sort()
        job.uncond_row = -1

    @torch.inference_mode()
    def step(self) -> list[ImageJob]:
        """Advance every image by one scale; return the images that are now complete."""
        if not self.jobs:
            return []
        var, config = self.var, self.var.config
        if self.level_pos is None or self.level_pos.device != var.device:
            self.level_pos = var.level_pos()
        groups: dict[int, list[_VARImage]] = {}
        for job in self.jobs:
            state = self._state[id(job)]
            groups.setdefault(state.scale, []).append(state)
        self.steps += 1
        self.rows_log.append(self.rows_in_use)
        finished = []
        for scale, states in sorted(groups.items()):
            for state, logits in zip(states, self._forward(scale, states), strict=True):
                job = state.job
                job.rows_x_steps += job.rows
                self._advance(state, scale, logits)
                if state.scale == config.num_scales:
                    finished.append(job)
        for job in finished:
            self._release(job)
        return finished

    def _forward(self, scale: int, states: list[_VARImage]) -> list[torch.Tensor]:
        """One pass over a group at the same scale; returns each image's guided logits [l, V]."""
        var, config = self.var, self.var.config
        start = config.scale_starts[scale]
        end = start + config.patch_nums[scale] ** 2
        rows = []
        for state in states:
            job = state.job
            rows += [job.cond_row] + ([job.uncond_row] if job.uncond_row >= 0 else [])
            if state.rows is None:  # what the class fixes, once per image (VAR recomputes it every scale)
                labels = [job.class_id] + ([config.null_class] if job.uncond_row >= 0 else [])
                state.rows = var.row_modulations(torch.tensor(labels, device=var.device))
        emb = torch.cat([state.rows[0] for state in states])
        block_mods = torch.cat([state.rows[1] for state in states])[:, :, None]  # [R, depth, 1, 6, C]
        head_mods = torch.cat([state.rows[2] for state in states])[:, None]  # [R, 1, 2, C]
        if scale == 0:
            h = var.first_input(emb)
        else:
            per_row = []
            for state in states:
                per_row += [state.next_input] * state.job.rows
            h = torch.stack(per_row)
        h = h + self.level_pos[:, start:end]
        if rows == list(range(rows[0], rows[0] + len(rows))):  # slots in a run: the cache is read as a view
            trunk = self._compiled_trunk or self._trunk_eager
            logits = trunk(h, emb, block_mods, head_mods, rows[0], rows[0] + len(rows), start, end)
        else:
            row_index = torch.tensor(rows, device=var.device)
            for i, block in enumerate(var.blocks):
                h = block(h, None, lambda q, k, v, i=i, blk=block: blk.attn.attend(
                    q, *self._cache(i, rows, row_index, k, v, start, end), None), block_mods[:, i])
            logits = var.logits(h, emb, head_mods)
        out, at = [], 0
        for state in states:
            job = state.job
            cond = logits[at]
            if job.uncond_row >= 0:
                schedule = job.options.cfg_schedule or "linear"  # VAR's ramp unless the request says otherwise
                s = scale_guidance(job.options.cfg_scale, scale, config.num_scales, schedule)
                cond = s * cond - (s - 1) * logits[at + 1]  # VAR's (1 + t) c - t u
            out.append(cond)
            at += job.rows
        return out

    def _trunk_eager(self, h: torch.Tensor, emb: torch.Tensor, block_mods: torch.Tensor, head_mods: torch.Tensor,
                     lo: int, hi: int, start: int, end: int) -> torch.Tensor:
        """The blocks and the head over cache rows lo..hi-1 at positions start..end-1 (static shapes:
        what ``compile=True`` captures, one graph per scale and row count)."""
        var = self.var
        for i, block in enumerate(var.blocks):
            kc, vc = self.k_cache[i], self.v_cache[i]

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk: AdaLNBlock = block,
                       kc: torch.Tensor = kc, vc: torch.Tensor = vc) -> torch.Tensor:
                kc[lo:hi, :, start:end] = k
                vc[lo:hi, :, start:end] = v
                return blk.attn.attend(q, kc[lo:hi, :, :end], vc[lo:hi, :, :end], None)

            h = block(h, None, attend, block_mods[:, i])
        return var.logits(h, emb, head_mods)

    def _cache(self, layer: int, rows: list[int], row_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in any slots: write this scale's keys and values; gather every key and value up to its end."""
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc[row_index, :, start:end] = k
        vc[row_index, :, start:end] = v
        return kc[:, :, :end].index_select(0, row_index), vc[:, :, :end].index_select(0, row_index)

    def _advance(self, state: _VARImage, scale: int, logits: torch.Tensor) -> None:
        """Sample the scale, fold it into f_hat, prepare the next scale's input (per image: the
        VAE-side convolutions must not depend on the batch)."""
        var, config, job = self.var, self.var.config, state.job
        first = config.scale_starts[scale]
        ids = self.sample_fn(logits, job.seed_key, first, job.options)
        job.tokens.extend(ids.tolist())
        quant = self.vae.quantize
        pn, last = config.patch_nums[scale], config.patch_nums[-1]
        if job.options.more_smooth:
            h = smooth_embedding(logits, job.seed_key, first, scale, config.num_scales, quant.embedding.weight)
        else:
            h = quant.embedding(ids)
        h = h.T.reshape(1, -1, pn, pn).float()
        if scale != config.num_scales - 1:
            h = F.interpolate(h, size=(last, last), mode="bicubic")
        state.f_hat = state.f_hat + quant.phi(scale)(h)[0]
        state.scale = scale + 1
        if state.scale < config.num_scales:
            nxt = quant.next_input(state.f_hat[None], state.scale)[0]
            state.next_input = var.word_embed(nxt.to(var.dtype))


def check_var_options(options: SamplingOptions) -> None:
    """What VAR cannot honour (the schedule's values SamplingOptions checks itself)."""
    if options.cfg_interval != -1:
        raise InvalidRequest("cfg_interval", "cfg_interval has no meaning for VAR (guidance ramps over the scales; "
                             "use cfg_schedule)", allowed="-1")


__all__ = ["VAR", "VARConfig", "VARDecoder", "build_var", "scale_guidance", "sample_scale", "VAR_DEPTHS"]
