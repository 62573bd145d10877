"""``ccaserve sample-fid`` (one process or torchrun) and ``ccaserve fid``.

    torchrun --nproc_per_node=8 --no-python ccaserve sample-fid --gpt-ckpt c2i_L_384.pt --vq-ckpt vq_ds16_c2i.pt \\
        --mode cfg --cfg-scale 2.0 --num-images 50000 --resize 256 --out samples/L_cfg2
    ccaserve fid samples/L_cfg2.npz VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import distributed
from .pipeline import normalize_mode


def cmd_sample_fid(args: argparse.Namespace) -> int:
    from .cli import pipeline_from_args
    from .sample_fid import sample_fid

    env = distributed.init(args.device)
    args.device = str(env.device)
    pipe = pipeline_from_args(args)
    args.mode = normalize_mode(args.mode)
    if args.mode not in pipe.modes:
        raise ValueError(f"mode {args.mode!r} is not offered by this model (modes: {pipe.modes})")
    model = {k: getattr(args, k) for k in ("model", "gpt_ckpt", "cca_ckpt", "cca_cfg_ckpt", "vq_ckpt", "gpt_model",
                                           "vq_model", "image_size", "precision") if getattr(args, k) is not None}
    out = sample_fid(pipe, args.out, mode=args.mode, num_images=args.num_images, batch_size=args.per_proc_batch_size,
                     global_seed=args.global_seed, resize=args.resize, pack=not args.no_npz, npz=args.npz, env=env,
                     progress=not args.quiet, settings={"model": model or {"model": pipe.name}},
                     cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p)
    if env.is_main:
        print(f"{args.num_images} images in {args.out}" + (f", packed to {out}" if out else ""))
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    from .fid import batch_metrics, load_batch
    from .inception import load_inception

    device = args.device
    net = load_inception(args.inception, device)
    result = batch_metrics(net, load_batch(args.samples), load_batch(args.reference), batch_size=args.batch_size,
                           pr_n=args.pr_n, progress=not args.quiet)
    result.update(samples=str(args.samples), reference=str(args.reference), inception=str(args.inception))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


def add_fid_commands(sub: argparse._SubParsersAction) -> None:
    from .cli import add_model_args

    p = sub.add_parser("sample-fid", help="sample an evaluation set (PNG folder + ADM .npz); resumable, torchrun-ready",
                       description="Image i has class i %% num_classes and a seed from (--global-seed, i), so "
                       "any number of ranks writes the same images; a rerun draws only the missing ones. "
                       "Under torchrun each rank takes every WORLD_SIZE-th missing index (NCCL on GPUs, gloo "
                       "on CPU).")
    p.add_argument("--mode", default="cca", help="free, cfg, cca or cca+cfg")
    p.add_argument("--num-images", type=int, default=50000)
    p.add_argument("--per-proc-batch-size", type=int, default=32, help="images per decoding batch on each rank")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--out", required=True, help="PNG folder ({i:06d}.png); the npz goes to OUT.npz")
    p.add_argument("--npz", default=None, help="npz path (default: OUT.npz)")
    p.add_argument("--no-npz", action="store_true", help="write the PNGs only")
    p.add_argument("--resize", type=int, default=None, help="resize samples (bicubic), e.g. 256 for 384-px models")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale of cfg modes (default: model's)")
    p.add_argument("--cfg-interval", type=int, default=-1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--quiet", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_sample_fid)

    p = sub.add_parser("fid", help="FID / IS / precision / recall of a sample npz against a reference npz "
                       "(ADM layout) with a local FID Inception-v3 weights file")
    p.add_argument("samples", help=".npz with arr_0 uint8 [N, H, W, 3] (e.g. from sample-fid)")
    p.add_argument("reference", help=".npz with arr_0 and/or mu, sigma (e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--inception", required=True,
                   help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth); never downloaded")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--pr-n", type=int, default=10000, help="images per side for precision/recall (0: skip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fid)
