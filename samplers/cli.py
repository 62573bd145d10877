"""The ``ccaserve`` command line: sample, convert, models, train, eval."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from .checkpoint import CheckpointError, convert
from .pipeline import Pipeline, normalize_mode
from .registry import Registry

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
    g.add_argument("--image-size", type=int, choices=[256, 384, 512], default=None)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--precision", choices=list(_PRECISIONS), default=None,
                   help="GPT weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decoding step (for CUDA)")


def pipeline_from_args(args: argparse.Namespace) -> Pipeline:
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = _PRECISIONS[precision]
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


def comparison_grid(rows: Sequence[Sequence[Image.Image]], col_labels: Sequence[str],
                    row_labels: Sequence[str], min_cell: int = 160) -> Image.Image:
    """Images in a labelled grid: a column per mode, a row per class."""
    side = rows[0][0].width
    cell = max(side, min_cell)
    head, left, pad = 34, 120, 4
    grid = Image.new("RGB", (left + len(col_labels) * (cell + pad), head + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        for k, line in enumerate(label.split("\n")[:2]):
            draw.text((left + j * (cell + pad) + 4, 3 + 14 * k), line, fill="black")
    for i, row in enumerate(rows):
        y = head + i * (cell + pad)
        for k, line in enumerate(_wrap(row_labels[i], 18)[:4]):
            draw.text((4, y + 4 + 14 * k), line, fill="black")
        for j, img in enumerate(row):
            shown = img if img.width == cell else img.resize((cell, cell), Image.NEAREST)
            grid.paste(shown, (left + j * (cell + pad), y))
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def cmd_sample(args: argparse.Namespace) -> int:
    modes = [normalize_mode(m) for m in args.modes.split(",")]
    pipe = pipeline_from_args(args)
    missing = [m for m in modes if m not in pipe.modes]
    if missing:
        raise SystemExit(f"error: modes {missing} need a CCA model; this model offers {pipe.modes}")
    options = {"cfg_scale": args.cfg_scale, "cfg_interval": args.cfg_interval, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p}
    classes = args.classes
    seeds = [args.seed + i for i in range(len(classes))]
    columns, labels = [], []
    print(f"model {pipe.name}: {pipe.image_size}px, {pipe.grid[0]}x{pipe.grid[1]} tokens, device {args.device}")
    print(f"{'mode':8s} {'latency s':>10s} {'s/image':>8s} {'rows x steps':>13s}  cfg_scale")
    for mode in modes:
        results = pipe(classes, mode, seeds, progress=not args.quiet, **options)
        r0 = results[0]
        per_image = r0.latency_s / len(results)
        print(f"{mode:8s} {r0.latency_s:10.2f} {per_image:8.2f} {r0.rows_x_steps:13d}  {r0.options.cfg_scale:g}")
        columns.append([r.image for r in results])
        labels.append(f"{mode}  ({r0.options.cfg_scale:g})\n{per_image:.2f}s/img, {r0.rows_x_steps} rxs")
    rows = [list(col) for col in zip(*columns, strict=True)]
    row_labels = [f"{c}: {pipe.class_name(c)} (seed {s})" for c, s in zip(classes, seeds, strict=True)]
    comparison_grid(rows, labels, row_labels).save(args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    kind, out = convert(args.input, args.output, args.preset, args.image_size)
    print(f"converted {kind} checkpoint {args.input} -> {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    reg = Registry()
    for name, entry in reg.entries.items():
        flag = "*" if name == reg.default else " "
        status = "ok" if entry.available else f"missing files: {entry.missing_files()}"
        parts = ", ".join(entry.parts)
        print(f"{flag} {name:16s} [{parts}] {status}\n    {entry.description}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import uvicorn

    from server.app import ModelServer, create_app
    from server.engine import Engine

    pipe = pipeline_from_args(args)
    engine = Engine(pipe, max_rows=args.max_rows, max_queue=args.max_queue, request_timeout_s=args.timeout)
    app = create_app(ModelServer({pipe.name: engine}))
    if not args.no_ui:
        from ui.app import mount_ui

        mount_ui(app, engine)
    where = f"http://{args.host}:{args.port}"
    print(f"serving {pipe.name} ({', '.join(pipe.modes)}) on {where}  UI: {where}/ui  API docs: {where}/docs")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample a class in several modes and write a side-by-side grid")
    p.add_argument("--class", dest="classes", type=_int_list, default=[207], help="class id(s), comma-separated")
    p.add_argument("--modes", default="free,cfg,cca,cca+cfg", help="comma-separated: free,cfg,cca,cca+cfg")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; later rows use seed+1, ...")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale of cfg modes (default: model's)")
    p.add_argument("--cfg-interval", type=int, default=-1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("convert", help="convert a LlamaGen/CCA .pt checkpoint to safetensors + config.json")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--preset", default=None, help="GPT or VQ preset (inferred when omitted)")
    p.add_argument("--image-size", type=int, choices=[256, 384, 512], default=None)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list the models in the registry")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("serve", help="HTTP API + Gradio UI (/ui) with a continuous-batching engine")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-rows", type=int, default=64, help="KV-cache rows per model per step (batch bound)")
    p.add_argument("--max-queue", type=int, default=256, help="queued requests before 503")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a request fails with 504")
    p.add_argument("--no-ui", action="store_true", help="API only")
    p.add_argument("--log-level", default="info")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)

    from .cli_bench import add_bench_command
    from .cli_fid import add_fid_commands
    from .cli_train import add_train_commands

    add_train_commands(sub)
    add_fid_commands(sub)
    add_bench_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
