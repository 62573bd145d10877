"""``ccaserve sample``, ``serve``, ``convert`` and ``models``: use a model."""

from __future__ import annotations

import argparse

from samplers.checkpoint import convert
from samplers.images import comparison_grid
from samplers.modes import normalize_mode
from samplers.registry import Registry

from .common import add_model_args, add_sampling_args, int_list, pipeline_from_args, sampling_options


def cmd_sample(args: argparse.Namespace) -> int:
    modes = [normalize_mode(m) for m in args.modes.split(",")]
    pipe = pipeline_from_args(args)
    missing = [m for m in modes if m not in pipe.modes]
    if missing:
        raise SystemExit(f"error: modes {missing} need a CCA model; this model offers {pipe.modes}")
    options = sampling_options(args)
    classes = args.classes
    seeds = [args.seed + i for i in range(len(classes))]
    columns, labels = [], []
    print(f"model {pipe.name}: {pipe.image_size}px, {pipe.tokens_per_image} tokens, device {args.device}")
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
    from server.http import uvicorn_config

    pipe = pipeline_from_args(args)
    engine = Engine(pipe, max_rows=args.max_rows, max_queue=args.max_queue, request_timeout_s=args.timeout)
    app = create_app(ModelServer({pipe.name: engine}))
    if not args.no_ui:
        from ui.app import mount_ui

        mount_ui(app, engine)
    where = f"http://{args.host}:{args.port}"
    print(f"serving {pipe.name} ({', '.join(pipe.modes)}) on {where}  UI: {where}/ui  API docs: {where}/docs")
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level)).run()
    finally:
        engine.close()
    return 0


def add_sample_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a class in several modes and write a side-by-side grid")
    p.add_argument("--class", dest="classes", type=int_list, default=[207], help="class id(s), comma-separated")
    p.add_argument("--modes", default="free,cfg,cca,cca+cfg", help="comma-separated: free,cfg,cca,cca+cfg")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; later rows use seed+1, ...")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_sampling_args(p)
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

