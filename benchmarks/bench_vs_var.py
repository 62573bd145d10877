"""Time ccaserve against VAR's own autoregressive_infer_cfg() on the same random VAR-d16 weights.

    python benchmarks/bench_vs_var.py --var /path/to/VAR --json docs/bench_vs_var_cpu.json

One process, the same weights (registry entry ``var-d16-random``: VAR-d16 and VAR's VQVAE, fp32),
image decode included in both (VAR's call returns images), alternating runs, best of --repeats.
VAR always runs two rows per image (conditional and null) even at cfg 0; the guidance-free modes
here run one. Cases: guidance-free at batch 1 and 4, cfg at batch 1 (VAR's README settings:
cfg 1.5 = our cfg_scale 2.5, top-k 900, top-p 0.96). VAR is imported from a checkout you provide.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.offline import describe_device, time_var, var_reference  # noqa: E402
from samplers import Pipeline  # noqa: E402

CASES = (("cca", 1), ("cca", 4), ("cfg", 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--var", required=True, help="path to a VAR checkout (its repository root)")
    ap.add_argument("--model", default="var-d16-random", help="registry name of a VAR model")
    ap.add_argument("--cases", default=",".join(f"{m}:{b}" for m, b in CASES), help="mode:batch, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cfg-scale", type=float, default=2.5, help="our scale (VAR's cfg + 1)")
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    torch.manual_seed(0)
    pipe = Pipeline.from_registry(args.model)
    ref = var_reference(pipe, args.var)
    print(f"{args.model}: {pipe.tokens_per_image} tokens in {pipe.steps_per_image} scales, {pipe.image_size} px, "
          f"fp32 on {describe_device(pipe.gpt.device)}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    for case in args.cases.split(","):
        mode, batch = case.split(":")
        r = time_var(ref, pipe, int(batch), mode, args.cfg_scale, args.top_k, args.top_p, args.repeats)
        print(f"{mode} batch {batch}: VAR {r['var_s_per_image']:.2f} s/img (cfg {r['var_cfg']:g}, 2 rows), "
              f"ccaserve {r['ccaserve_s_per_image']:.2f} s/img, speed-up {r['speedup']:.2f}x", flush=True)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "device": describe_device(pipe.gpt.device),
                                               "threads": torch.get_num_threads(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
