"""Flags every command shares, declared once: model selection and sampling options."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from samplers.pipeline import Pipeline

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model selection flags shared by every command that loads a pipeline (LlamaGen's names)."""
    g = p.add_argument_group("model (a registry name, or real checkpoints)")
    g.add_argument("--model", default=None, help="registry name from weights/registry.json (default: its default)")
    g.add_argument("--gpt-ckpt", help="base GPT checkpoint (.pt or safetensors dir)")
    g.add_argument("--cca-ckpt", help="CCA fine-tuned GPT checkpoint")
    g.add_argument("--cca-cfg-ckpt", help="a separate fine-tune for the cca+cfg mode (default: --cca-ckpt)")
    g.add_argument("--vq-ckpt", help="VQ tokenizer checkpoint")
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
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off, 1 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold in (0, 1]; 1 = off")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags as keyword arguments of ``Pipeline.__call__`` / ``options_for``."""
    keys = ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


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
        pipe = Pipeline.from_registry(args.model, device=device, dtype=dtype)
    pipe.compile = args.compile
    return pipe
