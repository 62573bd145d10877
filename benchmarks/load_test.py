"""Load test of a running server (issue #4's acceptance numbers).

    ccaserve serve &                       # default model, 127.0.0.1:8000
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --duration 60 --json docs/load_test.json

Phases (each bounded by --duration):
  1. mixed: 32 clients, the four modes in equal shares: errors other than 503 must be zero;
  2. saturation: 32 clients of `cca` only, then of `cfg` only: images/s of each (CCA needs one
     row per image per step, CFG two, so at saturation cca should be well above cfg);
  3. batching: 16 concurrent clients asking one image each, vs one client asking n=16 images per
     request (one "offline" batch of 16 through the same engine): the ratio of images/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import load, server_stats  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    ap.add_argument("--mixed-duration", type=float, default=None,
                    help="seconds of the mixed phase (default: --duration)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--classes", default="0-999", help="class ids to draw from, e.g. 0-999 or 1,2,3")
    ap.add_argument("--phases", default="mixed,saturation,batching")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    if "-" in args.classes:
        lo, hi = (int(x) for x in args.classes.split("-"))
        classes = list(range(lo, hi + 1))
    else:
        classes = [int(x) for x in args.classes.split(",")]
    phases = args.phases.split(",")
    modes = [m for m in server_stats(args.url)["modes"]]
    report: dict = {"url": args.url, "duration_s": args.duration, "clients": args.clients}

    def show(res) -> dict:
        s = res.summary()
        print(f"{s['label']:>22s}: {s['images_per_s']:7.2f} img/s  statuses {s['statuses']}  "
              f"transport errors {s['transport_errors']}  "
              + "  ".join(f"{m} p50 {v['latency_s']['p50']}s" for m, v in s["modes"].items()), flush=True)
        return s

    if "mixed" in phases:
        res = show(load(args.url, concurrency=args.clients, duration_s=args.mixed_duration or args.duration,
                        modes=modes, classes=classes, label=f"mixed x{args.clients}"))
        bad = {k: v for k, v in res["statuses"].items() if k not in ("200", "503")}
        res["errors_other_than_503"] = sum(bad.values()) + sum(res["transport_errors"].values())
        report["mixed"] = res
        report["server_stats_after_mixed"] = server_stats(args.url)
    if "saturation" in phases:
        sat = {m: show(load(args.url, concurrency=args.clients, duration_s=args.duration, modes=[m],
                            classes=classes, label=f"{m} only x{args.clients}"))
               for m in ("cca", "cfg") if m in modes}
        report["saturation"] = sat
        if len(sat) == 2:
            report["cca_over_cfg_throughput"] = round(sat["cca"]["images_per_s"] / sat["cfg"]["images_per_s"], 3)
            print(f"cca / cfg throughput at saturation: {report['cca_over_cfg_throughput']:.2f}x")
    if "batching" in phases:
        mode = "cca" if "cca" in modes else "cfg"
        online = show(load(args.url, concurrency=16, duration_s=args.duration, modes=[mode], classes=classes,
                           label=f"16 clients x n=1 {mode}"))
        offline = show(load(args.url, concurrency=1, duration_s=args.duration, modes=[mode], classes=classes, n=16,
                            label=f"1 client x n=16 {mode}"))
        report["batching"] = {"online_16x1": online, "offline_1x16": offline,
                              "ratio": round(online["images_per_s"] / offline["images_per_s"], 3)}
        print(f"16 single-image clients / one batch of 16: {report['batching']['ratio']:.2f}x")
    report["server_stats_end"] = server_stats(args.url)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
