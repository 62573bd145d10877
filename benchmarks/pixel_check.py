"""An outside check of the sampling modes that shares nothing with the project's evaluation
network: class consistency of a running server's samples in raw pixel space.

Samples come over HTTP (``POST /generate``, class-balanced over a fixed random set of classes,
fixed seeds, the server's default scales); the reference is real Shapes-1k images rendered here
from a held-out data seed, k per class for all 1000 classes. Per mode:

- ``self_nn``: the share of its images whose nearest other image of the same mode (L2 on the RGB
  pixels) has their class; no reference at all.
- ``nn_*``: each image gets the class of its nearest real image; the class accuracy and each
  attribute's (shape, colour, texture of the matched class).
- ``mean_*``: the same with the nearest class mean of the real images.

Real held-out images of the same classes, scored the same way, give the ceiling; CCA's share of
CFG's gain is printed for each number, as the evaluation's tables do.

    ccaserve serve &
    python benchmarks/pixel_check.py --url http://127.0.0.1:8000 --model shapes1k --out pixel_check.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from training import shapes

MAX_N = 16  # the server's images per request


def fetch_samples(url: str, model: str | None, mode: str, classes: list[int], per_class: int, seed: int,
                  timeout_s: float) -> torch.Tensor:
    """Images [len(classes) * per_class, 3, 32, 32] in [-1, 1], in class order."""
    images = []
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for class_id in tqdm(classes, desc=f"fetch {mode}", leave=False):
            done = 0
            while done < per_class:
                n = min(MAX_N, per_class - done)
                body: dict[str, Any] = {"class": class_id, "mode": mode, "n": n, "seed": seed + done}
                if model:
                    body["model"] = model
                reply = client.post("/generate", json=body)
                if reply.status_code != 200:
                    raise RuntimeError(f"{mode} class {class_id}: HTTP {reply.status_code}: {reply.text[:300]}")
                for item in reply.json()["images"]:
                    png = Image.open(io.BytesIO(base64.b64decode(item["png_base64"]))).convert("RGB")
                    images.append(torch.from_numpy(np.asarray(png).copy()).permute(2, 0, 1))
                done += n
    return torch.stack(images).float() / 127.5 - 1.0


def reference(per_class: int, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` real images of every class: [1000 * per_class, 3072] and their labels."""
    # the dataset cycles through the classes, so indices 0 .. 1000 k - 1 hold k images of each
    images, labels = shapes.make_batch(data_seed, range(shapes.NUM_CLASSES * per_class))
    return images.flatten(1), labels


def nearest(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Index of each query's nearest key (L2)."""
    key_norms = (keys * keys).sum(1)
    out = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        out.append((key_norms[None] - 2.0 * q @ keys.T).argmin(1))  # |q|^2 is the same for every key
    return torch.cat(out)


def self_consistency(flat: torch.Tensor, classes: torch.Tensor) -> float:
    """Share of images whose nearest other image of the same set (same mode) has their class."""
    norms = (flat * flat).sum(1)
    dist = norms[:, None] + norms[None] - 2.0 * flat @ flat.T
    dist.fill_diagonal_(float("inf"))
    return (classes[dist.argmin(1)] == classes).float().mean().item()


def consistency(images: torch.Tensor, classes: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
                means: torch.Tensor) -> dict[str, float]:
    flat = images.flatten(1)
    out = {"self_nn": self_consistency(flat, classes)}
    for name, matched in (("nn", ref_labels[nearest(flat, ref)]), ("mean", nearest(flat, means))):
        out[f"{name}_accuracy"] = (matched == classes).float().mean().item()
        for i, attribute in enumerate(shapes.ATTRIBUTES):
            got = torch.tensor([shapes.class_attributes(int(c))[i] for c in matched])
            want = torch.tensor([shapes.class_attributes(int(c))[i] for c in classes])
            out[f"{name}_{attribute}"] = (got == want).float().mean().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="registry name (default: the server's default model)")
    parser.add_argument("--modes", default="free,cfg,cca,cca+cfg")
    parser.add_argument("--classes", type=int, default=200, help="how many classes to sample (a fixed random set)")
    parser.add_argument("--per-class", type=int, default=5, help="samples per class and mode")
    parser.add_argument("--ref-per-class", type=int, default=10, help="real reference images per class")
    parser.add_argument("--seed", type=int, default=0, help="picks the classes and the first image seed")
    parser.add_argument("--data-seed", type=int, default=7, help="data seed of the real reference images")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    if shapes.NUM_CLASSES * args.ref_per_class > 50000:
        parser.error("--ref-per-class: at most 50 (the reference is held in memory)")

    gen = torch.Generator().manual_seed(args.seed)
    classes = sorted(torch.randperm(shapes.NUM_CLASSES, generator=gen)[:args.classes].tolist())
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    ref, ref_labels = reference(args.ref_per_class, args.data_seed)
    means = torch.stack([ref[ref_labels == c].mean(0) for c in range(shapes.NUM_CLASSES)])

    # ceiling: real images of the same classes, from another data seed than the reference
    real_seed = args.data_seed + 1
    real_index = [c + shapes.NUM_CLASSES * k for c in classes for k in range(args.per_class)]
    real, real_labels = shapes.make_batch(real_seed, real_index)
    if not torch.equal(real_labels, labels):
        raise RuntimeError("the dataset no longer cycles through the classes; fix the real-image indices")
    results: dict[str, Any] = {"real": consistency(real, labels, ref, ref_labels, means)}
    seconds = {}
    for mode in args.modes.split(","):
        start = time.perf_counter()
        images = fetch_samples(args.url, args.model, mode, classes, args.per_class, 1_000_000 * (args.seed + 1),
                               args.timeout)
        seconds[mode] = round(time.perf_counter() - start, 1)
        results[mode] = consistency(images, labels, ref, ref_labels, means)

    keys = list(results["real"])
    print(f"{args.classes} classes x {args.per_class} images per mode; reference {args.ref_per_class} real "
          f"images per class (data seed {args.data_seed}); binomial std of an accuracy p: "
          f"sqrt(p (1 - p) / {len(labels)}), at most {0.5 / len(labels) ** 0.5:.3f}")
    print("mode".ljust(10) + "".join(k.rjust(15) for k in keys))
    for mode, row in results.items():
        print(mode.ljust(10) + "".join(f"{row[k]:15.3f}" for k in keys))
    shares = {}
    if {"free", "cfg", "cca"} <= set(results):
        for k in keys:
            gain = results["cfg"][k] - results["free"][k]
            shares[k] = (results["cca"][k] - results["free"][k]) / gain if gain > 0 else None
        print("cca share".ljust(10) + "".join(f"{s:15.2f}" if s is not None else " " * 12 + "n/a"
                                             for s in shares.values()))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "classes": classes,
                                        "results": results, "cca_share": shares, "fetch_seconds": seconds},
                                       indent=1))


if __name__ == "__main__":
    main()
