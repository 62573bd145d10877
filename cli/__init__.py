"""The ``ccaserve`` command line. A leaf: nothing in the project imports it.

    ccaserve sample    sample a class in several modes and write a side-by-side grid
    ccaserve serve     HTTP API + Gradio UI with a continuous-batching engine
    ccaserve convert   LlamaGen/CCA .pt -> safetensors + config.json
    ccaserve models    the models in the registry
    ccaserve train     train the default model's parts, or CCA-tune a real checkpoint
    ccaserve eval      FID / IS / precision / recall / accuracy per mode, with sweeps
    ccaserve contrast  how guidance-like a fine-tune is, per kind of class contrast
    ccaserve sample-fid / fid   evaluation sets (torchrun-ready) and their FID against ADM npz files
    ccaserve bench     latency, throughput and cost per mode and batch size (or of a server: --url)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from samplers.checkpoint import CheckpointError

from .bench import add_bench_command
from .common import keep_freed_memory
from .evaluate import add_eval_commands
from .sample import add_sample_commands
from .train import add_train_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccaserve", description="Sample, serve, train, evaluate and benchmark class-conditional AR image "
        "models, with CCA and CFG side by side. `ccaserve COMMAND --help` for a command's flags.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_sample_commands(sub)
    add_train_commands(sub)
    add_eval_commands(sub)
    add_bench_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    keep_freed_memory()
    try:
        return args.func(args)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()


__all__ = ["main", "build_parser"]
