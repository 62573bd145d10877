"""Score a few sampling settings of a registry model on the validation seeds, one JSON line each.

A quick probe between full `ccaserve eval` runs: each setting is a mode with optional cfg scale,
temperature and top-k, sampled from the same class-balanced validation seeds the evaluation uses
and scored with the model's evaluation network. ``--cca DIR`` swaps in another fine-tune (a
work folder's ``model.safetensors``) as the cca model.

    python scripts/score_settings.py --model shapes1k --out runs/temperature.jsonl \
        --setting free:T=0.9 --setting cca:T=1.1 --setting cfg:s=2:T=1.15
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from cli.evaluate import load_evalnet_for, load_tuned
from evaluation import evaluate
from samplers.pipeline import Pipeline

_KEYS = {"s": ("cfg_scale", float), "T": ("temperature", float), "k": ("top_k", int)}


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``mode[:s=SCALE][:T=TEMPERATURE][:k=TOP_K]`` -> (mode, sampling options)."""
    mode, *fields = text.split(":")
    options: dict[str, Any] = {}
    for field in fields:
        key, _, value = field.partition("=")
        if key not in _KEYS or not value:
            raise argparse.ArgumentTypeError(f"bad field {field!r} in {text!r}: use s=, T= or k=")
        name, kind = _KEYS[key]
        options[name] = kind(value)
    return mode, options


def add_scoring_args(ap: argparse.ArgumentParser) -> None:
    """The options every probe here shares: which cca model, how many images on which seeds, where to."""
    ap.add_argument("--cca", default=None, help="fine-tune folder to use as the cca model")
    ap.add_argument("--n", type=int, default=2000, help="images per setting")
    ap.add_argument("--split", choices=["validation", "test"], default="validation",
                    help="seed split: validation for choices; test only for a setting already chosen")
    ap.add_argument("--seed-set", type=int, default=0, help="test seed set (as `ccaserve eval --test-repeats`)")
    ap.add_argument("--n-ref", type=int, default=10000, help="held-out real images for the reference")
    ap.add_argument("--out", required=True, help="JSON-lines file the scores are appended to")
    ap.add_argument("--threads", type=int, default=None)


def load_for_scoring(args: argparse.Namespace) -> tuple[Pipeline, Any, Any]:
    """The registry model (with ``--cca`` swapped in), its evaluation network and the real images'
    reference statistics."""
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.from_registry(args.model)
    if args.cca:
        pipe.models["cca"] = load_tuned(args.cca, pipe)
    net = load_evalnet_for(args.model)
    return pipe, net, evaluate.reference_stats(net, args.n_ref, progress=False)


def score(pipe: Pipeline, net: Any, ref: Any, args: argparse.Namespace, mode: str, options: dict[str, Any],
          **record: Any) -> dict[str, Any]:
    """Sample and score one setting on the split's seeds; print its JSON line and append it to --out."""
    start = time.perf_counter()
    row = evaluate.evaluate_mode(pipe, net, ref, mode, args.n, seed_base=evaluate.split_seed_base(
        args.split, args.seed_set), progress=False, **options)
    row.update(model=pipe.name, cca=args.cca, split=args.split, seed_set=args.seed_set, **record,
               wall_s=round(time.perf_counter() - start, 1))
    line = json.dumps(row)
    print(line, flush=True)
    with Path(args.out).open("a") as f:
        f.write(line + "\n")
    return row


def add_setting_args(ap: argparse.ArgumentParser) -> None:
    """Which registry model, and the sampling settings to score (repeatable ``--setting``)."""
    ap.add_argument("--model", default=None, help="registry name (default: the registry's default)")
    ap.add_argument("--setting", action="append", required=True, type=parse_setting,
                    help="mode[:s=SCALE][:T=TEMPERATURE][:k=TOP_K]; repeatable")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setting_args(ap)
    add_scoring_args(ap)
    args = ap.parse_args()
    pipe, net, ref = load_for_scoring(args)
    for mode, options in args.setting:
        score(pipe, net, ref, args, mode, options)


if __name__ == "__main__":
    main()
