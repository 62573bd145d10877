"""``ccaserve sample``, ``serve``, ``convert`` and ``models``: use a model."""

from __future__ import annotations

import argparse
import math

from samplers.checkpoint import convert
from samplers.classes import match_classes
from samplers.images import comparison_grid, image_grid
from samplers.modes import InvalidRequest, normalize_mode
from samplers.pipeline import Pipeline
from samplers.registry import Registry

from .common import (
    add_model_args,
    add_sampling_args,
    int_list,
    pipeline_from_args,
    pipelines_from_args,
    sampling_options,
)


def parse_classes(text: str, pipe: Pipeline, limit: int = 16) -> list[int]:
    """Class ids from "207,360", a name ("golden retriever"), words of names ("green ring": every
    match) or names separated by commas."""
    if all(part.strip().isdigit() for part in text.split(",")):
        return int_list(text)
    try:  # a whole name first: ImageNet names have commas of their own ("tench, Tinca tinca")
        found = pipe.find_classes(text)
    except InvalidRequest:
        found = [c for part in text.split(",") if part.strip() for c in pipe.find_classes(part)]
    if len(found) > limit:
        print(f"{len(found)} classes match {text!r}; sampling the first {limit} (--max-classes)")
    return found[:limit]


def cmd_sample(args: argparse.Namespace) -> int:
    modes = [normalize_mode(m) for m in args.modes.split(",")]
    pipe = pipeline_from_args(args)
    missing = [m for m in modes if m not in pipe.modes]
    if missing:
        raise SystemExit(f"error: modes {missing} need a CCA model; this model offers {pipe.modes}")
    options = sampling_options(args)
    classes = parse_classes(args.classes, pipe, args.max_classes)
    if args.seeds < 1:
        raise SystemExit("error: --seeds must be at least 1")
    per = args.seeds  # images per class and mode; class i, image j has seed --seed + i * per + j
    wanted = [c for c in classes for _ in range(per)]
    seeds = [args.seed + i for i in range(len(wanted))]
    for mode in modes:  # every input is checked before anything is printed or sampled
        pipe.options_for(mode, **options)
        for c, s in zip(wanted, seeds, strict=True):
            pipe.check_request(c, mode, s)
    columns, labels = [], []
    print(f"model {pipe.name}: {pipe.image_size}px, {pipe.tokens_per_image} tokens, device {args.device}")
    print(f"{'mode':8s} {'latency s':>10s} {'s/image':>8s} {'compute':>8s}  cfg_scale")
    for mode in modes:
        results = pipe(wanted, mode, seeds, progress=not args.quiet, **options)
        r0 = results[0]
        per_image = r0.latency_s / len(results)
        print(f"{mode:8s} {r0.latency_s:10.2f} {per_image:8.2f} {r0.rows:7d}x  {r0.options.cfg_scale:g}")
        tiles = math.ceil(math.sqrt(per))
        columns.append([image_grid([r.image for r in results[i * per:(i + 1) * per]], tiles)
                        for i in range(len(classes))])
        scale = f" (s={r0.options.cfg_scale:g})" if r0.options.guided else ""
        labels.append(f"{mode}{scale}\n{per_image:.2f} s/img, {r0.rows}x compute")
    rows = [list(col) for col in zip(*columns, strict=True)]
    first = seeds[::per]
    seed_text = [f"seed {s}" if per == 1 else f"seeds {s}-{s + per - 1}" for s in first]
    row_labels = [f"{c}: {pipe.class_name(c)} ({t})" for c, t in zip(classes, seed_text, strict=True)]
    comparison_grid(rows, labels, row_labels).save(args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    kind, out = convert(args.input, args.output, args.preset, args.image_size, vae=args.vae)
    print(f"converted {kind} checkpoint {args.input} -> {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    reg = Registry()
    for name, entry in reg.entries.items():
        flag = "*" if name == reg.default else " "
        status = "ok" if entry.available else f"missing files: {entry.missing_files()}"
        parts = ", ".join(entry.parts)
        print(f"{flag} {name:16s} [{parts}] {status}\n    {entry.description}")
        names = entry.class_names
        if not names:
            continue
        if args.classes is None:
            sample = ", ".join(f"{i}: {names[i]}" for i in (0, 1, 207) if i < len(names))
            print(f"    {len(names)} classes, e.g. {sample} (all: ccaserve models --classes, or --classes WORDS)")
        else:
            ids = match_classes(args.classes, names) if args.classes else range(len(names))
            for i in ids:
                print(f"    {i:5d}: {names[i]}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import uvicorn

    from server.app import ModelServer, create_app
    from server.engine import Engine
    from server.http import uvicorn_config
    from server.pool import EnginePool

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else [args.device]
    replicas: dict[str, list[Engine]] = {}
    for device in devices:  # one engine per device; a model's replicas share its stats
        for pipe in pipelines_from_args(argparse.Namespace(**{**vars(args), "device": device})):
            same = replicas.setdefault(pipe.name, [])
            same.append(Engine(pipe, max_rows=args.max_rows, max_queue=args.max_queue,
                               request_timeout_s=args.timeout, stats=same[0].stats if same else None))
    engines = {name: reps[0] if len(reps) == 1 else EnginePool(reps) for name, reps in replicas.items()}
    server = ModelServer(engines)
    app = create_app(server)
    if not args.no_ui:
        from ui.app import mount_ui

        mount_ui(app, engines)
    where = f"http://{args.host}:{args.port}"
    for name, engine in engines.items():
        print(f"serving {name} ({engine.pipeline.family.name}: {', '.join(engine.pipeline.modes)})")
    print(f"on {where}  UI: {where}/ui  API docs: {where}/docs")
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level)).run()
    finally:
        server.close()
    return 0


def add_sample_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a class in several modes and write a side-by-side grid")
    p.add_argument("--class", dest="classes", default="207",
                   help="class ids (207,360), a class name ('blue plain ring', 'golden retriever') or words of names "
                        "('green ring': every green ring), comma-separated")
    p.add_argument("--max-classes", type=int, default=16, help="at most this many classes when words match many")
    p.add_argument("--modes", default="free,cfg,cca,cca+cfg", help="comma-separated: free,cfg,cca,cca+cfg")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; later images use seed+1, ...")
    p.add_argument("--seeds", type=int, default=1,
                   help="images per class and mode, tiled in each cell (4: a 2x2 block), so a grid shows the rate "
                        "of right images, not one draw")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_sampling_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("convert", help="convert a LlamaGen/CCA .pt or VAR .pth checkpoint to safetensors + "
                       "config.json")
    p.add_argument("input", help="the checkpoint: LlamaGen GPT or VQ, VAR transformer or VQVAE (kind read from "
                   "its keys)")
    p.add_argument("output", help="directory to write")
    p.add_argument("--vae", default=None, help="VAR transformers: their VQVAE checkpoint (sets the scales)")
    p.add_argument("--preset", default=None, help="GPT or VQ preset (inferred when omitted)")
    p.add_argument("--image-size", type=int, choices=[256, 384, 512], default=None)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list the models in the registry and their class names")
    p.add_argument("--classes", nargs="?", const="", default=None, metavar="WORDS",
                   help="print every class name, or those matching WORDS ('green ring')")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("serve", help="HTTP API + Gradio UI (/ui) with a continuous-batching engine")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-rows", type=int, default=64, help="KV-cache rows per model per step (batch bound)")
    p.add_argument("--max-queue", type=int, default=256, help="queued requests before 503")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a request fails with 504")
    p.add_argument("--devices", default=None,
                   help="one engine per device, e.g. cuda:0,cuda:1 (each model replicated on each; requests go "
                        "where rows are free; /stats lists the devices). Default: --device")
    p.add_argument("--no-ui", action="store_true", help="API only")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    add_model_args(p, multiple_models=True)
    p.set_defaults(func=cmd_serve)

