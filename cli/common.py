"""Flags every command shares, declared once: model selection and sampling options."""

from __future__ import annotations

import argparse
import ctypes
import sys
from typing import Any

import torch

from samplers.pipeline import Pipeline
from samplers.registry import Registry

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the kernel.

    A training step on CPU frees and reallocates the same large activations every time; with glibc's
    defaults each comes back as fresh pages that the kernel faults in and zeroes. Measured on the
    2-core machine (12 VAR CCA steps of 64): 6.3 s per step with 25 s of kernel time, 5.0 s with 6 s
    under these settings, the same losses. Allocation only: no effect on any result. False where it
    does not apply."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all([mallopt(m_mmap_threshold, 32 << 20),  # glibc's largest: blocks below it reuse the heap
                mallopt(m_trim_threshold, 1 << 30), mallopt(m_top_pad, 256 << 20)])


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser, *, multiple_models: bool = False) -> None:
    """Model selection flags shared by every command that loads a pipeline (LlamaGen's names)."""
    g = p.add_argument_group("model (a registry name, or real checkpoints: LlamaGen or VAR, told apart by their keys)")
    if multiple_models:
        g.add_argument("--model", action="append", default=None,
                       help="registry name from weights/registry.json; repeat to serve several (default: its default)")
    else:
        g.add_argument("--model", default=None, help="registry name from weights/registry.json (default: its default)")
    g.add_argument("--gpt-ckpt", "--var-ckpt", dest="gpt_ckpt",
                   help="base transformer: a LlamaGen GPT (.pt or safetensors dir) or a VAR (var_d16.pth ...)")
    g.add_argument("--cca-ckpt", "--cca-var-ckpt", dest="cca_ckpt",
                   help="its CCA fine-tune (LlamaGen's or VAR_d16_CCA.pth ...)")
    g.add_argument("--cca-cfg-ckpt", help="a separate fine-tune for the cca+cfg mode (default: --cca-ckpt)")
    g.add_argument("--vq-ckpt", "--vae-ckpt", dest="vq_ckpt",
                   help="the tokenizer: LlamaGen's VQ (vq_ds16_c2i.pt) or VAR's VQVAE (vae_ch160v4096z32.pth)")
    g.add_argument("--gpt-model", default=None, help="GPT preset (GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B); inferred "
                   "from the weights when omitted")
    g.add_argument("--vq-model", default=None, help="VQ preset (VQ-16, VQ-8); inferred when omitted")
    g.add_argument("--image-size", type=int, choices=[256, 384, 512], default=None,
                   help="image size of a LlamaGen checkpoint (sets its token grid; default: from the file name)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--precision", choices=list(PRECISIONS), default=None,
                   help="GPT weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decoding step (for CUDA)")


def add_sampling_args(p: argparse.ArgumentParser, *, guidance: bool = True) -> None:
    """Sampling options (LlamaGen's names and meanings); ``guidance=False`` for commands that sweep the
    scale themselves."""
    g = p.add_argument_group("sampling")
    if guidance:
        g.add_argument("--cfg-scale", type=float, default=None,
                       help="guidance scale of the cfg modes, 1 = unguided (default: the model's)")
        g.add_argument("--cfg-interval", type=int, default=-1, help="guide image tokens 0..N+1 only; -1 = all")
        g.add_argument("--cfg-schedule", choices=["linear", "constant"], default=None,
                       help="VAR models: ramp the scale from 1 at the first scale to --cfg-scale at the last (linear, "
                            "their default) or use it throughout (constant)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0,
                   help="keep the k most likely tokens; 0 = off, 1 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold in (0, 1]; 1 = off")
    v = p.add_argument_group("VAR's own flag names (translated; see also --top_k)")
    if guidance:
        v.add_argument("--cfg", type=float, default=None,
                       help="VAR's guidance: logits (1+t)c - t u with t ramping to CFG; equals --cfg-scale 1+CFG "
                            "(VAR's cfg 1.5 = --cfg-scale 2.5; cfg 0 = unguided)")
    v.add_argument("--top_p", dest="var_top_p", type=float, default=None, help="VAR's top-p: 0 = off (our --top-p 1)")
    v.add_argument("--more_smooth", "--more-smooth", dest="more_smooth", action="store_true",
                   help="VAR's display option: a soft Gumbel mix of codes per scale (not for FID)")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags as keyword arguments of ``Pipeline.__call__`` / ``options_for``, VAR's
    names translated to the one convention (cfg_scale = 1 + VAR's cfg; top_p 1 = off)."""
    keys = ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p", "cfg_schedule", "more_smooth")
    out = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    if getattr(args, "cfg", None) is not None:
        if out.get("cfg_scale") is not None:
            raise SystemExit("error: give --cfg-scale or VAR's --cfg, not both")
        out["cfg_scale"] = 1.0 + args.cfg
    if getattr(args, "var_top_p", None) is not None:
        out["top_p"] = args.var_top_p if args.var_top_p > 0 else 1.0
    return out


def pipeline_from_args(args: argparse.Namespace) -> Pipeline:
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = PRECISIONS[precision]
    if args.gpt_ckpt or args.vq_ckpt or args.cca_ckpt:
        if not (args.gpt_ckpt and args.vq_ckpt):
            raise SystemExit("error: real checkpoints need at least --gpt-ckpt and --vq-ckpt")
        pipe = Pipeline.from_checkpoints(args.gpt_ckpt, args.vq_ckpt, args.cca_ckpt, gpt_model=args.gpt_model,
                                         vq_model=args.vq_model, image_size=args.image_size, device=device,
                                         dtype=dtype, cca_cfg_ckpt=args.cca_cfg_ckpt)
    else:
        name = args.model[0] if isinstance(args.model, list) else args.model
        pipe = Pipeline.from_registry(name, device=device, dtype=dtype)
    pipe.compile = args.compile
    return pipe


def pipelines_from_args(args: argparse.Namespace) -> list[Pipeline]:
    """Every model a command was given: the checkpoints, or each ``--model`` (repeatable); with
    neither, the registry's served models (the shipped families, default first)."""
    names = args.model if isinstance(args.model, list) else [args.model]
    if names == [None] and not (args.gpt_ckpt or args.vq_ckpt or args.cca_ckpt):
        names = Registry().served or [None]
    if args.gpt_ckpt or args.vq_ckpt or args.cca_ckpt or len(names) <= 1:
        return [pipeline_from_args(args)]
    out = []
    for name in dict.fromkeys(names):
        args_one = argparse.Namespace(**{**vars(args), "model": name})
        out.append(pipeline_from_args(args_one))
    return out
