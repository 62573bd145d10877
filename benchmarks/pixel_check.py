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

from evaluation.evaluate import attribute_targets
from server.app import MAX_N  # the server's images per request
from training import shapes


def fetch_samples(url: str, model: str | None, mode: str, classes: list[int], per_class: int, seed: int,
                  timeout_s: float) -> tuple[torch.Tensor, float]:
    """Images [len(classes) * per_class, 3, 32, 32] in [-1, 1], in class order, and the guidance scale the
    server sampled them with (its default for the mode: the check sends none)."""
    images = []
    scales = set()
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
                    scales.add(float(item["cfg_scale"]))
                    png = Image.open(io.BytesIO(base64.b64decode(item["png_base64"]))).convert("RGB")
                    images.append(torch.from_numpy(np.asarray(png).copy()).permute(2, 0, 1))
                done += n
    if len(scales) != 1:
        raise RuntimeError(f"{mode}: the server used several guidance scales {sorted(scales)} in one run")
    return torch.stack(images).float() / 127.5 - 1.0, scales.pop()


def reference(per_class: int, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` real images of every class: [1000 * per_class, 3072] and their labels."""
    # the dataset cycles through the classes, so indices 0 .. 1000 k - 1 hold k images of each
    images, labels = shapes.make_batch(data_seed, range(shapes.NUM_CLASSES * per_class))
    return images.flatten(1), labels


def class_means(ref: torch.Tensor, ref_labels: torch.Tensor) -> torch.Tensor:
    """The mean reference image of every class: [1000, 3072]."""
    return torch.stack([ref[ref_labels == c].mean(0) for c in range(shapes.NUM_CLASSES)])


def nearest(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 512, exclude_self: bool = False) -> torch.Tensor:
    """Index of each query's nearest key (L2); ``exclude_self``: the queries are the keys, and a
    query's nearest is another one."""
    key_norms = (keys * keys).sum(1)
    out = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        dist = key_norms[None] - 2.0 * q @ keys.T  # |q|^2 is the same for every key
        if exclude_self:
            rows = torch.arange(len(q))
            dist[rows, start + rows] = float("inf")
        out.append(dist.argmin(1))
    return torch.cat(out)


def consistency(images: torch.Tensor, classes: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
                means: torch.Tensor) -> dict[str, float]:
    flat = images.flatten(1)
    out = {"self_nn": (classes[nearest(flat, flat, exclude_self=True)] == classes).float().mean().item()}
    want = attribute_targets(classes)
    for name, matched in (("nn", ref_labels[nearest(flat, ref)]), ("mean", nearest(flat, means))):
        out[f"{name}_accuracy"] = (matched == classes).float().mean().item()
        right = (attribute_targets(matched) == want).float().mean(0)
        for i, attribute in enumerate(shapes.ATTRIBUTES):
            out[f"{name}_{attribute}"] = right[i].item()
    return out


def run_classes(seed: int, num_classes: int) -> list[int]:
    """The classes run ``seed`` samples."""
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(shapes.NUM_CLASSES, generator=gen)[:num_classes].tolist())


def score_mode(args: argparse.Namespace, mode: str, seed: int, classes: list[int], ref: torch.Tensor,
               ref_labels: torch.Tensor, means: torch.Tensor) -> tuple[dict[str, float], float, float]:
    """One mode's scores on run ``seed``'s classes and image seeds, the seconds its fetch took and the
    guidance scale the server used."""
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    start = time.perf_counter()
    images, scale = fetch_samples(args.url, args.model, mode, classes, args.per_class, 1_000_000 * (seed + 1),
                                  args.timeout)
    seconds = round(time.perf_counter() - start, 1)
    return consistency(images, labels, ref, ref_labels, means), seconds, scale


def run_once(args: argparse.Namespace, seed: int, ref: torch.Tensor, ref_labels: torch.Tensor,
             means: torch.Tensor) -> dict[str, Any]:
    """One class set and seed set (both from ``seed``): every mode's scores and CCA's shares."""
    classes = run_classes(seed, args.classes)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    # ceiling: real images of the same classes, from another data seed than the reference
    real_index = [c + shapes.NUM_CLASSES * k for c in classes for k in range(args.per_class)]
    real, real_labels = shapes.make_batch(args.data_seed + 1, real_index)
    if not torch.equal(real_labels, labels):
        raise RuntimeError("the dataset no longer cycles through the classes; fix the real-image indices")
    results: dict[str, Any] = {"real": consistency(real, labels, ref, ref_labels, means)}
    seconds, scales = {}, {}
    for mode in args.modes.split(","):
        results[mode], seconds[mode], scales[mode] = score_mode(args, mode, seed, classes, ref, ref_labels, means)
    return {"seed": seed, "classes": classes, "results": results, "cca_share": cca_shares(results),
            "fetch_seconds": seconds, "cfg_scales": scales}


def cca_shares(results: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """(cca - free) / (cfg - free) per number; None where CFG gains nothing."""
    if not {"free", "cfg", "cca"} <= set(results):
        return {}
    shares = {}
    for key in results["free"]:
        gain = results["cfg"][key] - results["free"][key]
        shares[key] = (results["cca"][key] - results["free"][key]) / gain if gain > 0 else None
    return shares


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and std over the runs, and CCA's share on the means (pooled) and per run."""
    modes = list(runs[0]["results"])
    keys = list(runs[0]["results"]["real"])
    mean = {m: {k: float(np.mean([r["results"][m][k] for r in runs])) for k in keys} for m in modes}
    std = {m: {k: float(np.std([r["results"][m][k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0
               for k in keys} for m in modes}
    return {"mean": mean, "std": std, "cca_share": cca_shares(mean),
            "cca_share_per_run": {k: [r["cca_share"].get(k) for r in runs] for k in keys}}


def print_table(title: str, results: dict[str, dict[str, float]], shares: dict[str, float | None]) -> None:
    keys = list(results["real"])
    print(title)
    print("mode".ljust(10) + "".join(k.rjust(15) for k in keys))
    for mode, row in results.items():
        print(mode.ljust(10) + "".join(f"{row[k]:15.3f}" for k in keys))
    if shares:
        print("cca share".ljust(10) + "".join(f"{shares[k]:15.2f}" if shares[k] is not None else " " * 12 + "n/a"
                                             for k in keys))


def update(args: argparse.Namespace, path: Path) -> None:
    """Re-score ``args.modes`` (e.g. after a new cca model was shipped) on the classes and image seeds of
    the runs in ``path``, keeping the other modes' numbers; the numbers replaced stay in the file under
    ``replaced``, with ``args.why``."""
    record = json.loads(path.read_text())
    saved = record["args"]
    for key in ("classes", "per_class", "ref_per_class", "data_seed"):
        setattr(args, key, int(saved[key]))
    args.model = None if saved["model"] == "None" else saved["model"]
    ref, ref_labels = reference(args.ref_per_class, args.data_seed)
    means = class_means(ref, ref_labels)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in record["runs"][0]["results"]]
    if unknown:
        raise SystemExit(f"--modes: {', '.join(unknown)} not in {path}; only modes it scored can be replaced")
    old = {m: [] for m in modes}
    for run in tqdm(record["runs"], desc="runs"):
        if run["classes"] != run_classes(run["seed"], args.classes):
            raise SystemExit(f"{path}: run {run['seed']}'s classes are not the ones this script picks")
        for mode in modes:
            old[mode].append({**run["results"][mode], "cfg_scale": run.get("cfg_scales", {}).get(mode)})
            run["results"][mode], run["fetch_seconds"][mode], scale = score_mode(
                args, mode, run["seed"], run["classes"], ref, ref_labels, means)
            run.setdefault("cfg_scales", {})[mode] = scale
        run["cca_share"] = cca_shares(run["results"])
    record.setdefault("replaced", []).append({"date": time.strftime("%Y-%m-%d"), "why": args.why,
                                              "summary": record["summary"], "results": old})
    record["summary"] = summarize(record["runs"])
    print_table(f"mean of {len(record['runs'])} runs, {', '.join(modes)} re-scored", record["summary"]["mean"],
                record["summary"]["cca_share"])
    path.write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="registry name (default: the server's default model)")
    parser.add_argument("--modes", default="free,cfg,cca,cca+cfg")
    parser.add_argument("--classes", type=int, default=200, help="how many classes to sample (a random set per run)")
    parser.add_argument("--per-class", type=int, default=5, help="samples per class and mode")
    parser.add_argument("--ref-per-class", type=int, default=10, help="real reference images per class")
    parser.add_argument("--seed", type=int, default=0, help="run i picks its classes and image seeds from seed + i")
    parser.add_argument("--repeats", type=int, default=4, help="runs, each on its own classes and seeds")
    parser.add_argument("--data-seed", type=int, default=7, help="data seed of the real reference images")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    parser.add_argument("--update", type=Path, default=None,
                        help="re-score only --modes in this earlier --out file, on its runs' classes and seeds")
    parser.add_argument("--why", default="", help="with --update: what changed (kept beside the replaced numbers)")
    args = parser.parse_args()
    if args.update:
        update(args, args.update)
        return
    if not 1 <= args.ref_per_class <= 50:
        parser.error("--ref-per-class: 1 to 50 (the reference is held in memory)")
    if not 1 <= args.classes <= shapes.NUM_CLASSES or args.per_class < 2 or args.repeats < 1:
        parser.error(f"--classes 1 to {shapes.NUM_CLASSES}, --per-class at least 2, --repeats at least 1")

    ref, ref_labels = reference(args.ref_per_class, args.data_seed)
    means = class_means(ref, ref_labels)
    n = args.classes * args.per_class
    print(f"{args.classes} classes x {args.per_class} images per mode and run; reference {args.ref_per_class} "
          f"real images per class (data seed {args.data_seed}); binomial std of an accuracy: at most "
          f"{0.5 / n ** 0.5:.3f} per run")
    runs = []
    for i in range(args.repeats):
        runs.append(run_once(args, args.seed + i, ref, ref_labels, means))
        print_table(f"run {i + 1} (seed {args.seed + i})", runs[-1]["results"], runs[-1]["cca_share"])
    summary = summarize(runs)
    if args.repeats > 1:
        print_table(f"mean of {args.repeats} runs", summary["mean"], summary["cca_share"])
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                        "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
