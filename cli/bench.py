"""``ccaserve bench``: offline (this process) or online (``--url``, a running server)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks import offline as bench
from samplers.modes import normalize_mode

from .common import add_model_args, add_sampling_args, int_list, pipeline_from_args, sampling_options


def cmd_bench(args: argparse.Namespace) -> int:
    if args.url:
        return _online(args)
    pipe = pipeline_from_args(args)
    modes = [normalize_mode(m) for m in args.modes.split(",") if m]
    missing = [m for m in modes if m not in pipe.modes]
    if missing:
        raise SystemExit(f"error: modes {missing} need a CCA model; this model offers {pipe.modes}")
    device = pipe.gpt.device
    peaks = None if args.no_peaks else bench.measure_peaks(device, pipe.gpt.dtype)
    if peaks:
        print(f"device peaks: GEMM {peaks['gemm_gflops']} GFLOP/s, memory {peaks['mem_gbps']} GB/s")
    options = sampling_options(args)
    report = bench.run_offline(pipe, modes, int_list(args.batch_sizes), args.repeats, args.warmup, args.usd_per_hour,
                               peaks, progress=not args.quiet, options=options, vq_decode=not args.no_vq_decode)
    report["command"] = "ccaserve " + " ".join(args.argv)
    if args.compare_reference and pipe.family.name == "var":
        ref = bench.var_reference(pipe, args.compare_reference)
        report["reference"] = [bench.time_var(ref, pipe, b, m, options.get("cfg_scale") or pipe.default_cfg_scale,
                                              options.get("top_k") or 900,
                                              options["top_p"] if options.get("top_p", 1.0) < 1 else 0.96,
                                              args.repeats)
                               for b in int_list(args.reference_batch_sizes) for m in ("cca", "cfg") if m in modes]
    elif args.compare_reference:
        ref = bench.llamagen_model(pipe.gpt, args.compare_reference)
        report["reference"] = [bench.time_llamagen(ref, pipe.gpt, b, pipe.options_for("cfg", cfg_scale=args.cfg_scale)
                                                   .cfg_scale if "cfg" in modes else 1.0, args.top_k, args.repeats)
                               for b in int_list(args.reference_batch_sizes)]
    text = bench.markdown(report)
    if report.get("reference") and pipe.family.name == "var":
        text += ("\n| mode | batch | VAR s/img (2 rows) | ccaserve s/img | speed-up |\n|---|---|---|---|---|\n"
                 + "".join(f"| {r['mode']} | {r['batch']} | {r['var_s_per_image']} | {r['ccaserve_s_per_image']} | "
                           f"{r['speedup']}x |\n" for r in report["reference"]))
    elif report.get("reference"):
        text += "\n| batch | LlamaGen s/img | ccaserve s/img | speed-up |\n|---|---|---|---|\n" + "".join(
            f"| {r['batch']} | {r['llamagen_s_per_image']} | {r['ccaserve_s_per_image']} | {r['speedup']}x |\n"
            for r in report["reference"])
    print(text)
    _write(args, report, text)
    if args.plot:
        for p in bench.plot(report, args.plot):
            print(f"wrote {p}")
    return 0


def _write(args: argparse.Namespace, report: dict[str, Any], text: str) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}")


def _online(args: argparse.Namespace) -> int:
    import httpx

    from benchmarks.loadgen import load, server_stats

    model = httpx.get(f"{args.url}/models", timeout=30).json()[0]
    modes = [m for m in args.modes.split(",") if m in model["modes"]]
    classes = list(range(model["num_classes"]))
    runs = []
    lines = ["| clients | mix | img/s | statuses | p50 s | p95 s | p99 s | server img/s (1 min) | rows/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for conc in int_list(args.concurrency):
        res = load(args.url, concurrency=conc, duration_s=args.duration, modes=modes, classes=classes,
                   label=f"x{conc}").summary()
        res["server_stats"] = stats = server_stats(args.url)
        runs.append(res)
        worst = {q: max((m["latency_s"][q] or 0.0) for m in res["modes"].values()) if res["modes"] else None
                 for q in ("p50", "p95", "p99")}
        occ = ", ".join(f"{k} {v['mean_rows_per_step_last_minute']}" for k, v in stats["batch_occupancy"].items())
        lines.append(f"| {conc} | {','.join(modes)} | {res['images_per_s']} | {res['statuses']} | {worst['p50']} | "
                     f"{worst['p95']} | {worst['p99']} | {stats['overall']['images_per_s_last_minute']} | {occ} |")
        print(lines[-1], flush=True)
    report = {"url": args.url, "model": model["name"], "duration_s": args.duration, "modes": modes, "runs": runs,
              "command": "ccaserve " + " ".join(args.argv)}
    text = "latency columns: the worst mode's percentile\n\n" + "\n".join(lines) + "\n"
    print(text)
    _write(args, report, text)
    return 0


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency / throughput / cost per mode and batch size (or of a server: --url)")
    p.add_argument("--modes", default="free,cfg,cca,cca+cfg", help="comma-separated modes to time (default: all four)")
    p.add_argument("--batch-sizes", default=",".join(str(b) for b in bench.DEFAULT_BATCH_SIZES),
                   help="comma-separated images per batch, one cell each")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per cell first")
    p.add_argument("--usd-per-hour", type=float, default=0.0,
                   help="machine price; adds a $ per 1000 images column (hidden when not given)")
    p.add_argument("--no-peaks", action="store_true", help="skip measuring the device's GEMM / memory peaks")
    p.add_argument("--no-vq-decode", action="store_true",
                   help="time token generation only (latency = GPT time); the VQ decode is the same in every mode")
    p.add_argument("--compare-reference", metavar="CHECKOUT",
                   help="also time the reference code on the same weights: LlamaGen's generate() for a LlamaGen "
                        "model, VAR's autoregressive_infer_cfg() (image decode included) for a VAR model")
    p.add_argument("--reference-batch-sizes", default="1,8", help="batch sizes of the --compare-reference runs")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--markdown", help="write the tables as markdown")
    p.add_argument("--plot", metavar="PREFIX", help="write PREFIX_throughput.png and PREFIX_cost_ratio.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_sampling_args(p)
    g = p.add_argument_group("online (against a running server)")
    g.add_argument("--url", help="benchmark this server instead, e.g. http://127.0.0.1:8000")
    g.add_argument("--concurrency", default="1,8,32", help="closed-loop client counts, one run each")
    g.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency level")
    add_model_args(p)
    p.set_defaults(func=cmd_bench)


__all__ = ["add_bench_command"]
