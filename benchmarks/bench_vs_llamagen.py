"""Time ccaserve's generate() against LlamaGen's own generate() on the same random weights.

    python benchmarks/bench_vs_llamagen.py --llamagen /path/to/LlamaGen --batch-sizes 1,8

Both samplers run in one process on the same GPT-B weights (random, fp32 on CPU by default),
alternating, and the best of --repeats runs is kept for each (the machine is noisy). LlamaGen is
imported from a checkout you provide; nothing of it ships with ccaserve. `ccaserve bench
--compare-reference PATH` does the same for any registered model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.offline import llamagen_model, time_llamagen  # noqa: E402
from samplers import build_gpt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llamagen", required=True, help="path to a LlamaGen checkout (its repository root)")
    ap.add_argument("--gpt-model", default="GPT-B")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="> 1 runs both with CFG (doubled batch)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    torch.manual_seed(0)
    tokens = (args.image_size // 16) ** 2
    gpt = build_gpt(args.gpt_model, block_size=tokens).to(args.device).eval()
    for p in gpt.parameters():
        torch.nn.init.normal_(p, std=0.02)  # LlamaGen zeroes the output layer; give it weights
    ref = llamagen_model(gpt, args.llamagen)
    print(f"{args.gpt_model}, {tokens} tokens, fp32 on {args.device}, cfg_scale {args.cfg_scale}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        r = time_llamagen(ref, gpt, batch, args.cfg_scale, args.top_k, args.repeats)
        print(f"batch {batch}: best llamagen {r['llamagen_s_per_image']:.2f} s/img, ccaserve "
              f"{r['ccaserve_s_per_image']:.2f} s/img, speed-up {r['speedup']:.2f}x", flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpt_model": args.gpt_model, "tokens": tokens, "device": args.device,
                       "cfg_scale": args.cfg_scale, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
