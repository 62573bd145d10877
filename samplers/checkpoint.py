"""Loading and converting checkpoints: LlamaGen/CCA ``.pt`` files and safetensors directories.

A checkpoint is untrusted input. Pickles load with ``torch.load(weights_only=True)``, which refuses
any object that is not a tensor or a plain container, so a malicious file cannot run code; the one
extra type allowed is ``argparse.Namespace`` (LlamaGen training checkpoints store their args),
whose unpickling only sets attributes.

Layouts understood: weights under ``"model"`` (DDP), ``"module"`` (DeepSpeed), ``"state_dict"``,
or at the top level (FSDP, used for XXL and 3B); a ``freqs_cis`` entry and ``module.`` /
``_orig_mod.`` prefixes are dropped. The safetensors form is a directory with
``model.safetensors`` and ``config.json`` (``{"kind": "gpt" | "vq", "config": {...}}``).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .gpt import GPT, GPT_PRESETS, GPTConfig, build_gpt, image_size_to_block_size
from .var import VAR, VARConfig
from .var_vae import DEFAULT_PATCH_NUMS, VARVAE, VARVAEConfig
from .vq import VQ_PRESETS, VQConfig, VQModel, build_vq

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_LAYOUT_KEYS = ("model", "module", "state_dict")
_DROPPED_KEYS = ("freqs_cis",)
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is meant for."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Return (state dict, config JSON or None) from a .pt/.pth/.bin pickle, a .safetensors file,
    or a directory holding model.safetensors + config.json."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    config = None
    if path.is_dir():
        weights, config_path = path / WEIGHTS_FILE, path / CONFIG_FILE
        if not weights.exists():
            raise CheckpointError(f"{path}: directory has no {WEIGHTS_FILE}")
        config = _read_config(config_path) if config_path.exists() else None
        state = _read_safetensors(weights)
    elif path.suffix == ".safetensors":
        state = _read_safetensors(path)
        sibling = path.with_name(CONFIG_FILE)
        config = _read_config(sibling) if sibling.exists() else None
    else:
        state = _state_dict_from_pickle(path)
    return _clean(state), config


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:  # the header is checked against the file's size before any tensor is read
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: one line naming the file
        raise CheckpointError(f"{path}: not a valid safetensors file ({_first_line(e)})") from None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a readable JSON config ({_first_line(e)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _state_dict_from_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # mmap: tensors stay in the file's pages until used, no second copy in memory
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: the file is not a plain weights pickle and was not loaded "
            f"(weights_only=True; nothing in it was executed). Detail: {reason[:300]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    trainer = obj.get("trainer")
    if isinstance(trainer, dict):  # VAR's training files: ['trainer']['var_wo_ddp']; CCA's: ['trainer']
        obj = trainer.get("var_wo_ddp") if isinstance(trainer.get("var_wo_ddp"), dict) else trainer
    for key in _LAYOUT_KEYS:
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj  # FSDP: the state dict itself
    raise CheckpointError(
        f"{path}: found no weights: expected a state dict under one of {list(_LAYOUT_KEYS)} or at the top "
        f"level; top-level keys are {sorted(obj)[:10]}"
    )


def _clean(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        if key in _DROPPED_KEYS:
            continue
        out[key] = value
    return out


def checkpoint_kind(state: dict[str, torch.Tensor]) -> str:
    """``gpt`` / ``vq`` (LlamaGen) or ``var`` / ``var_vae`` (VAR), from the keys."""
    if "tok_embeddings.weight" in state:
        return "gpt"
    if "class_emb.weight" in state and "pos_1LC" in state:
        return "var"
    if "quantize.embedding.weight" in state:
        return "var_vae" if "encoder.down.0.block.0.conv1.weight" in state else "vq"
    raise CheckpointError(
        "not a LlamaGen GPT (tok_embeddings.weight) or VQ (quantize.embedding.weight), nor a VAR transformer "
        f"(class_emb.weight, pos_1LC) or VAE (encoder.down.*); first keys: {sorted(state)[:8]}"
    )


# --------------------------------------------------------------------------------------------
# Inferring configurations from tensor shapes
# --------------------------------------------------------------------------------------------
def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    return tuple(state[key].shape) if key in state else None


def fitting_gpt_presets(state: dict[str, torch.Tensor]) -> list[str]:
    """Presets whose (n_layer, dim) match the checkpoint's tensors."""
    emb = _shape(state, "tok_embeddings.weight")
    if emb is None:
        return []
    n_layer = _count_indexed(state, r"layers\.(\d+)\.")
    return [name for name, p in GPT_PRESETS.items() if p["dim"] == emb[1] and p["n_layer"] == n_layer]


def _count_indexed(state: dict[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_gpt_config(state: dict[str, torch.Tensor], preset: str | None = None,
                     block_size: int | None = None) -> GPTConfig:
    """A GPTConfig that fits the tensors: dims from shapes, n_head from the preset table."""
    emb = _shape(state, "tok_embeddings.weight")
    cls = _shape(state, "cls_embedding.embedding_table.weight")
    if emb is None or cls is None:
        raise CheckpointError("not a class-conditional LlamaGen GPT: tok_embeddings / cls_embedding missing")
    vocab, dim = emb
    n_layer = _count_indexed(state, r"layers\.(\d+)\.")
    if preset is None:
        fits = fitting_gpt_presets(state)
        if not fits:
            raise CheckpointError(
                f"no preset has dim={dim} and n_layer={n_layer}; known presets: "
                + ", ".join(f"{k} (dim {v['dim']}, {v['n_layer']} layers)" for k, v in GPT_PRESETS.items())
                + ". Pass a config.json (safetensors directory) for custom models."
            )
        preset = fits[0]
    overrides: dict[str, Any] = {"vocab_size": vocab, "num_classes": cls[0] - 1}
    wqkv = _shape(state, "layers.0.attention.wqkv.weight")
    head_dim = GPT_PRESETS[preset]["dim"] // GPT_PRESETS[preset]["n_head"] if preset in GPT_PRESETS else None
    if wqkv is not None and head_dim and wqkv[0] != 3 * dim and (wqkv[0] - dim) % (2 * head_dim) == 0:
        overrides["n_kv_head"] = (wqkv[0] - dim) // (2 * head_dim)
    if block_size is not None:
        overrides["block_size"] = block_size
    try:
        config = GPTConfig.from_preset(preset, **overrides)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    w1 = _shape(state, "layers.0.feed_forward.w1.weight")
    if w1 is not None and w1[0] != config.ffn_hidden:
        # a custom SwiGLU rounding: find the multiple_of that gives the stored hidden size
        for multiple in (128, 64, 32, 16, 8, 1):
            config.multiple_of = multiple
            if config.ffn_hidden == w1[0]:
                break
        else:
            config.multiple_of = 256
    return config


def infer_vq_config(state: dict[str, torch.Tensor]) -> VQConfig:
    """Every VQ hyper-parameter is visible in the tensor shapes."""
    book = _shape(state, "quantize.embedding.weight")
    conv_in = _shape(state, "encoder.conv_in.weight")
    quant = _shape(state, "quant_conv.weight")
    if book is None or conv_in is None or quant is None:
        raise CheckpointError("not a LlamaGen VQ tokenizer: quantize.embedding / encoder.conv_in / quant_conv missing")
    ch = conv_in[0]

    def mults(part: str) -> list[int]:
        levels = _count_indexed(state, rf"{part}\.conv_blocks\.(\d+)\.")
        widths = [state[f"{part}.conv_blocks.{i}.res.0.conv2.weight"].shape[0] for i in range(levels)]
        return [w // ch for w in (widths if part == "encoder" else widths[::-1])]

    num_res = _count_indexed(state, r"encoder\.conv_blocks\.0\.res\.(\d+)\.")
    norm_groups = 32 if ch % 32 == 0 else _largest_divisor(ch, 32)
    return VQConfig(
        codebook_size=book[0], codebook_embed_dim=book[1], z_channels=quant[1], ch=ch,
        encoder_ch_mult=mults("encoder"), decoder_ch_mult=mults("decoder"), num_res_blocks=num_res,
        codebook_show_usage="quantize.codebook_used" in state, norm_groups=norm_groups,
    )


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


# --------------------------------------------------------------------------------------------
# Fitting a state dict to a model, with errors that say what is wrong
# --------------------------------------------------------------------------------------------
def _fit(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, hint: str) -> None:
    """Check the state dict against the model's keys and shapes (works on a meta-device model)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)}, model {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"checkpoint does not fit {what}"]
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. " + "; ".join(shapes[:3]))
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
        if hint:
            parts.append(hint)
        raise CheckpointError(". ".join(parts))


def _materialize(build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], what: str, hint: str,
                 dtype: torch.dtype | None) -> torch.nn.Module:
    """Build the model on the meta device (no random init, no memory), check the state dict fits,
    and adopt its tensors (``assign=True``): peak memory is about one copy of the weights."""
    with torch.device("meta"):
        model = build()
    _fit(model, state, what, hint)
    dtype = dtype or torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _image_size_hint(path: Path) -> int | None:
    m = re.search(r"(?<!\d)(256|384|512)(?!\d)", path.name)
    return int(m.group(1)) if m else None


def load_gpt(path: str | Path, preset: str | None = None, image_size: int | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load a LlamaGen/CCA class-conditional GPT from any supported checkpoint format.

    The preset is inferred from tensor shapes when not given. ``image_size`` (256/384/512 with the
    16x downsampling tokenizer) sets the token grid; when omitted it comes from config.json, else
    from a 256/384/512 in the file name, else 256.
    """
    path = Path(path)
    state, meta = read_checkpoint(path)
    if checkpoint_kind(state) != "gpt":
        raise CheckpointError(f"{path}: this is a VQ tokenizer checkpoint, not a GPT")
    block_size = image_size_to_block_size(image_size) if image_size else None
    if meta is not None and preset is None:
        body = _config_body(meta, "gpt", path)
        if block_size is not None:
            body = {**body, "block_size": block_size}
        config = _config_from(GPTConfig, body, path)
        _check_gpt_config_fits(config, state, path)
    else:
        if block_size is None:
            block_size = image_size_to_block_size(_image_size_hint(path) or 256)
        config = infer_gpt_config(state, preset, block_size)
    fits = fitting_gpt_presets(state)
    hint = f"Its shapes fit preset(s) {fits}" if fits else "Its shapes fit none of the presets"
    model = _materialize(lambda: GPT(config, init=False), state,
                         f"{preset or 'the inferred config'} (dim {config.dim}, {config.n_layer} layers)",
                         f"{hint} (tok_embeddings {list(state['tok_embeddings.weight'].shape)})", dtype)
    return model.to(device=device).eval()


def load_vq(path: str | Path, preset: str | None = None, device: str | torch.device = "cpu") -> VQModel:
    """Load a LlamaGen VQ tokenizer; its configuration is read off the tensor shapes when no
    preset or config.json is given."""
    path = Path(path)
    state, meta = read_checkpoint(path)
    if checkpoint_kind(state) != "vq":
        raise CheckpointError(f"{path}: this is a GPT checkpoint, not a VQ tokenizer")
    if preset is not None:
        book = _shape(state, "quantize.embedding.weight")
        config = VQConfig.from_preset(preset, codebook_size=book[0], codebook_embed_dim=book[1],
                                      codebook_show_usage="quantize.codebook_used" in state)
    elif meta is not None:
        config = _config_from(VQConfig, _config_body(meta, "vq", path), path)
        book = _shape(state, "quantize.embedding.weight")
        if book != (config.codebook_size, config.codebook_embed_dim):
            raise CheckpointError(f"{path}: config.json says codebook {config.codebook_size} x "
                                  f"{config.codebook_embed_dim}, the weights hold {list(book)}")
    else:
        config = infer_vq_config(state)
    fits = [name for name, p in VQ_PRESETS.items() if p["encoder_ch_mult"] == infer_vq_config(state).encoder_ch_mult]
    model = _materialize(lambda: VQModel(config), state, preset or "the inferred VQ config",
                         f"Its shapes fit preset(s) {fits}" if fits else "", None)
    return model.to(device).eval()


def _config_body(meta: dict[str, Any], kind: str, path: Path) -> dict[str, Any]:
    if meta.get("kind", kind) != kind:
        raise CheckpointError(f"{path}: config.json says kind {str(meta.get('kind'))[:40]!r}, expected {kind!r}")
    body = meta.get("config", meta)
    if not isinstance(body, dict):
        raise CheckpointError(f"{path}: config.json's \"config\" must be an object")
    return body


def _config_from(cls: type, body: dict[str, Any], path: Path) -> Any:
    try:
        return cls.from_dict(body)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config.json: {_first_line(e)}") from None


def _check_gpt_config_fits(config: GPTConfig, state: dict[str, torch.Tensor], path: Path) -> None:
    """The config against the weights' shapes, before a model is built from it."""
    emb = _shape(state, "tok_embeddings.weight")
    cls = _shape(state, "cls_embedding.embedding_table.weight")
    n_layer = _count_indexed(state, r"layers\.(\d+)\.")
    problems = []
    if emb is not None and emb != (config.vocab_size, config.dim):
        problems.append(f"vocab_size x dim {config.vocab_size} x {config.dim} vs tok_embeddings {list(emb)}")
    if cls is not None and cls[0] != config.num_classes + config.has_null_class:
        problems.append(f"num_classes {config.num_classes} vs a label table of {cls[0]} rows")
    if n_layer != config.n_layer:
        problems.append(f"n_layer {config.n_layer} vs {n_layer} layers of weights")
    if problems:
        raise CheckpointError(f"{path}: config.json does not fit the weights: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# VAR: the multi-scale VQVAE and the next-scale transformer
# --------------------------------------------------------------------------------------------
def infer_var_vae_config(state: dict[str, torch.Tensor]) -> VARVAEConfig:
    """The VAE's hyper-parameters from its tensors; the scales from ``ema_vocab_hit_SV`` (10 rows:
    VAR's 1..16; K rows: the first K of them)."""
    book = _shape(state, "quantize.embedding.weight")
    conv_in = _shape(state, "encoder.conv_in.weight")
    if book is None or conv_in is None:
        raise CheckpointError("not a VAR VAE: quantize.embedding / encoder.conv_in missing")
    ch = conv_in[0]
    levels = _count_indexed(state, r"encoder\.down\.(\d+)\.")
    mult = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
    hits = _shape(state, "quantize.ema_vocab_hit_SV")
    scales = hits[0] if hits else len(DEFAULT_PATCH_NUMS)
    patch_nums = list(DEFAULT_PATCH_NUMS[:scales]) if scales <= len(DEFAULT_PATCH_NUMS) else None
    if patch_nums is None:
        raise CheckpointError(f"{scales} scales: pass a config.json with patch_nums")
    shared = _count_indexed(state, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")
    if shared == 0:
        shared = 1 if "quantize.quant_resi.qresi.weight" in state else 0
    quant = _shape(state, "quant_conv.weight")
    return VARVAEConfig(
        vocab_size=book[0], z_channels=book[1], ch=ch, ch_mult=mult,
        num_res_blocks=_count_indexed(state, r"encoder\.down\.0\.block\.(\d+)\."),
        decoder_num_res_blocks=_count_indexed(state, r"decoder\.up\.0\.block\.(\d+)\."),
        using_sa=f"encoder.down.{levels - 1}.attn.0.qkv.weight" in state,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in state, patch_nums=patch_nums,
        share_quant_resi=shared, quant_conv_ks=quant[-1] if quant else 3,
    )


def infer_var_config(state: dict[str, torch.Tensor], vae: VARVAE | None = None, depth: int | None = None) -> VARConfig:
    """The transformer's hyper-parameters from its tensors: depth (blocks), width (class_emb),
    heads (``scale_mul_1H11``, else head dim 64), classes, vocabulary; scales from the VAE."""
    cls = _shape(state, "class_emb.weight")
    head = _shape(state, "head.weight")
    word = _shape(state, "word_embed.weight")
    pos = _shape(state, "pos_1LC")
    if cls is None or head is None or word is None or pos is None:
        raise CheckpointError("not a VAR transformer: class_emb / head / word_embed / pos_1LC missing")
    blocks = _count_indexed(state, r"blocks\.(\d+)\.")
    if depth is not None and depth != blocks:
        raise CheckpointError(f"depth {depth} asked for, the weights have {blocks} blocks")
    width = cls[1]
    scale_mul = _shape(state, "blocks.0.attn.scale_mul_1H11")
    heads = scale_mul[1] if scale_mul else max(1, width // 64)
    fc1 = _shape(state, "blocks.0.ffn.fc1.weight")
    patch_nums = vae.patch_nums if vae is not None else list(DEFAULT_PATCH_NUMS)
    if sum(p * p for p in patch_nums) != pos[1]:
        raise CheckpointError(f"pos_1LC has {pos[1]} positions; the scales {patch_nums} give "
                              f"{sum(p * p for p in patch_nums)}")
    return VARConfig(depth=blocks, embed_dim=width, num_heads=heads, num_classes=cls[0] - 1, vocab_size=head[0],
                     z_channels=word[1], patch_nums=list(patch_nums),
                     mlp_ratio=(fc1[0] / width) if fc1 else 4.0, attn_l2_norm=scale_mul is not None,
                     shared_aln="shared_ada_lin.1.weight" in state, cond_drop_rate=0.0,
                     drop_path_rate=0.1 * blocks / 24)


def _read_var_part(path: Path, kind: str, what: str, config_cls: type, config: Any,
                   infer: Callable[[dict[str, torch.Tensor]], Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """A VAR file's state dict, refused unless it is ``kind``, and its config: the one given (object
    or dict), else its config.json, else inferred from the tensor shapes."""
    state, meta = read_checkpoint(path)
    found = checkpoint_kind(state)
    if found != kind:
        raise CheckpointError(f"{path}: this is a {found} checkpoint, not {what}")
    if isinstance(config, dict):
        return state, _config_from(config_cls, config, path)
    if config is not None:
        return state, config
    if meta is not None:
        return state, _config_from(config_cls, _config_body(meta, kind, path), path)
    return state, infer(state)


def load_var_vae(path: str | Path, config: VARVAEConfig | dict[str, Any] | None = None,
                 device: str | torch.device = "cpu") -> VARVAE:
    """VAR's multi-scale VQVAE (``vae_ch160v4096z32.pth``, a safetensors dir, or a custom one); its
    configuration comes from ``config``, config.json or the tensor shapes."""
    path = Path(path)
    state, config = _read_var_part(path, "var_vae", "a VAR VAE", VARVAEConfig, config,
                                   infer_var_vae_config)
    hits = state.get("quantize.ema_vocab_hit_SV")
    if hits is not None and hits.shape[0] != len(config.patch_nums):  # as VAR: a usage statistic, not a weight
        state["quantize.ema_vocab_hit_SV"] = torch.zeros(len(config.patch_nums), config.vocab_size)
    model = _materialize(lambda: VARVAE(config), state, "the VAR VAE config", "", None)
    return model.to(device).eval()


def load_var(path: str | Path, vae: VARVAE, depth: int | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, config: VARConfig | dict[str, Any] | None = None) -> VAR:
    """A VAR transformer (``var_d16.pth`` ... ``var_d30.pth``, ``VAR_d16_CCA.pth`` ..., training files,
    safetensors dirs); depth and width from the tensor shapes. The model holds ``vae``: its next-scale
    inputs are built from it."""
    path = Path(path)
    state, config = _read_var_part(path, "var", "a VAR transformer", VARConfig, config,
                                   lambda st: infer_var_config(st, vae, depth))
    model = _materialize(lambda: VAR(config), state, f"VAR (depth {config.depth}, width {config.embed_dim})",
                         "", dtype)
    try:
        model.attach_vae(vae)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.to(device=device).eval()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def save_pretrained(model: GPT | VQModel | VAR | VARVAE, out_dir: str | Path,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` to out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = {GPT: "gpt", VQModel: "vq", VAR: "var", VARVAE: "var_vae"}[type(model)]
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    meta = {"kind": kind, "config": model.config.to_dict(), **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def convert(in_path: str | Path, out_dir: str | Path, preset: str | None = None,
            image_size: int | None = None, vae: str | Path | None = None) -> tuple[str, Path]:
    """Convert a LlamaGen/CCA .pt (GPT or VQ) or a VAR .pth (transformer, with ``vae``, or VAE) into a
    safetensors directory; returns (kind, dir)."""
    state, _ = read_checkpoint(in_path)
    kind = checkpoint_kind(state)
    if kind == "var":
        if vae is None:
            raise CheckpointError(f"{in_path} is a VAR transformer: give its VAE too (--vae)")
        model = load_var(in_path, load_var_vae(vae))
    elif kind == "var_vae":
        model = load_var_vae(in_path)
    else:
        model = load_gpt(in_path, preset, image_size) if kind == "gpt" else load_vq(in_path, preset)
    return kind, save_pretrained(model, out_dir, {"converted_from": Path(in_path).name})


__all__ = [
    "CheckpointError", "read_checkpoint", "load_gpt", "load_vq", "load_var", "load_var_vae", "save_pretrained",
    "convert", "infer_var_config", "infer_var_vae_config",
    "infer_gpt_config", "infer_vq_config", "fitting_gpt_presets", "build_gpt", "build_vq",
]
