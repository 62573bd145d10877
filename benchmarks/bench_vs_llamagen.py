"""Time ccaserve's generate() against LlamaGen's own generate() on the same random weights.

    python benchmarks/bench_vs_llamagen.py --llamagen /path/to/LlamaGen --batch-sizes 1,8

Both samplers run in one process on the same GPT-B weights (random, fp32 on CPU by default),
alternating, and the best of --repeats runs is kept for each (the machine is noisy). LlamaGen is
imported from a checkout you provide; nothing of it ships with ccaserve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch


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

    sys.path.insert(0, args.llamagen)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from autoregressive.models.generate import generate as llamagen_generate
    from autoregressive.models.gpt import GPT_models

    from samplers import build_gpt, generate

    torch.manual_seed(0)
    tokens = (args.image_size // 16) ** 2
    ref = GPT_models[args.gpt_model](vocab_size=16384, block_size=tokens, num_classes=1000, cls_token_num=1,
                                     model_type="c2i").to(args.device).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.02)  # LlamaGen zeroes the output layer; give it weights
    ours = build_gpt(args.gpt_model, block_size=tokens).to(args.device).eval()
    ours.load_state_dict(ref.state_dict())

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    results = []
    print(f"{args.gpt_model}, {tokens} tokens, fp32 on {args.device}, cfg_scale {args.cfg_scale}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        classes = torch.arange(batch, device=args.device) % 1000
        times: dict[str, list[float]] = {"llamagen": [], "ccaserve": []}
        for rep in range(args.repeats):
            with torch.no_grad():
                sync()
                t = time.perf_counter()
                llamagen_generate(ref, classes, tokens, cfg_scale=args.cfg_scale, temperature=1.0,
                                  top_k=args.top_k, top_p=1.0, sample_logits=True)
                sync()
                times["llamagen"].append(time.perf_counter() - t)
                t = time.perf_counter()
                generate(ours, classes, cfg_scale=args.cfg_scale, top_k=args.top_k, seeds=list(range(batch)))
                sync()
                times["ccaserve"].append(time.perf_counter() - t)
            print(f"  batch {batch} run {rep + 1}: llamagen {times['llamagen'][-1] / batch:.2f} s/img, "
                  f"ccaserve {times['ccaserve'][-1] / batch:.2f} s/img", flush=True)
        best = {k: min(v) / batch for k, v in times.items()}
        speedup = best["llamagen"] / best["ccaserve"]
        print(f"batch {batch}: best llamagen {best['llamagen']:.2f} s/img, ccaserve {best['ccaserve']:.2f} s/img, "
              f"speed-up {speedup:.2f}x")
        results.append({"batch": batch, "llamagen_s_per_image": best["llamagen"],
                        "ccaserve_s_per_image": best["ccaserve"], "speedup": speedup,
                        "runs_s": times})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpt_model": args.gpt_model, "tokens": tokens, "device": args.device,
                       "cfg_scale": args.cfg_scale, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
