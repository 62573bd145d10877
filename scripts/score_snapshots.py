"""Score every snapshot of a fine-tune (``train cca --snapshot-every``) on the validation seeds.

Each snapshot in ``RUN/snapshots/step_NNNNN/`` and the run's final weights are sampled in cca mode
on the class-balanced validation seeds and scored with the model's evaluation network; free and
CFG sampling of the base on the same seeds give the reference lines. One JSON line per model in
``RUN/snapshot_scores.jsonl`` (a rerun scores only what is missing) and a plot of FID and accuracy
against the training step in ``RUN/snapshot_scores.png``.

With ``--alphas``, RUN is one checkpoint (a snapshot or a final folder) and what is scored is that
fine-tune extrapolated along its update, ``ref + alpha * (RUN - ref)`` (training/extrapolation.py),
at each alpha: ``RUN/extrapolation_scores.jsonl`` and ``.png``, FID and accuracy against alpha.

    python scripts/score_snapshots.py runs/traj/cca_lam30_beta0.05 --model shapes1k --cfg-scale 1.5
    python scripts/score_snapshots.py runs/traj/cca_lam30_beta0.05/snapshots/step_00400 --model shapes1k \
        --cfg-scale 1.5 --alphas 0.75,1,1.25,1.5,2 --ref weights/shapes1k/gpt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from cli.evaluate import load_evalnet_for, load_tuned
from evaluation import evaluate
from samplers.pipeline import Pipeline
from training.extrapolation import extrapolate


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every snapshot and of the final weights, in training order."""
    found = [(int(d.name.removeprefix("step_")), d) for d in sorted((run / "snapshots").glob("step_*"))
             if (d / "config.json").exists()]
    log = run / "train_log.jsonl"  # its last line is the last step (0-based)
    if (run / "config.json").exists() and log.exists():
        found.append((json.loads(log.read_text().splitlines()[-1])["step"] + 1, run))
    if not found:
        raise SystemExit(f"{run} has no snapshots and no finished run with its train_log.jsonl")
    return found


def plot(rows: list[dict[str, Any]], path: Path, x: str = "step") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = sorted((r for r in rows if r["mode"] == "cca"), key=lambda r: r[x])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("fid", "accuracy"), strict=True):
        ax.plot([r[x] for r in tuned], [r[metric] for r in tuned], "o-",
                label="cca (snapshot)" if x == "step" else "cca, extrapolated")
        for r in rows:
            if r["mode"] != "cca":
                label = r["mode"] if r["mode"] == "free" else f"cfg s = {r['cfg_scale']:g}"
                ax.axhline(r[metric], ls="--", color="grey" if r["mode"] == "free" else "tab:red", label=label)
        ax.set_xlabel("fine-tuning step" if x == "step" else "alpha (ref + alpha x (tuned - ref))")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"validation seeds, n = {tuned[0]['n']} per point")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="the fine-tune's output folder")
    ap.add_argument("--model", default=None, help="registry name of its base (default: the registry's default)")
    ap.add_argument("--cfg-scale", type=float, action="append", default=[],
                    help="CFG scale of the base to draw as a reference line; repeatable")
    ap.add_argument("--n", type=int, default=2000, help="validation images per point")
    ap.add_argument("--n-ref", type=int, default=10000, help="held-out real images for the reference")
    ap.add_argument("--alphas", default=None, help="comma-separated: score RUN extrapolated at each alpha instead")
    ap.add_argument("--ref", type=Path, default=None, help="with --alphas: the fine-tune's reference weights")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.alphas and args.ref is None:
        ap.error("--alphas needs --ref (the weights the fine-tune started from)")
    if args.threads:
        torch.set_num_threads(args.threads)
    x = "alpha" if args.alphas else "step"
    out = args.run / ("extrapolation_scores.jsonl" if args.alphas else "snapshot_scores.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    have = {(r["mode"], r.get("checkpoint"), r["cfg_scale"], r["n"]) for r in rows}
    todo: list[tuple[str, dict[str, Any], float | None, Path | None]] = [("free", {}, None, None)]
    todo += [("cfg", {"cfg_scale": s}, None, None) for s in args.cfg_scale]
    if args.alphas:
        todo += [("cca", {}, float(a), args.run) for a in args.alphas.split(",")]
    else:
        todo += [("cca", {}, step, folder) for step, folder in checkpoints(args.run)]

    pipe = Pipeline.from_registry(args.model)
    shipped_cca = pipe.models["cca"]
    net = load_evalnet_for(args.model)
    ref = evaluate.reference_stats(net, args.n_ref, progress=False)
    seed_base = evaluate.split_seed_base("validation")
    # --alphas: the base and the one fine-tune, loaded once for every alpha
    base = load_tuned(str(args.ref), pipe) if args.alphas else None
    run_model = load_tuned(str(args.run), pipe) if args.alphas else None
    for mode, options, at, folder in todo:
        name = str(folder) if folder else None
        if args.alphas and folder:
            name = f"{args.ref} + {at:g} x ({folder} - {args.ref})"
        key = (mode, name, pipe.options_for(mode, **options).cfg_scale, args.n)
        if key in have:
            continue
        if not folder:
            pipe.models["cca"] = shipped_cca
        elif base is not None:
            pipe.models["cca"] = extrapolate(base, run_model, at)
        else:
            pipe.models["cca"] = load_tuned(str(folder), pipe)
        row = evaluate.evaluate_mode(pipe, net, ref, mode, args.n, seed_base=seed_base, progress=False, **options)
        row.update(checkpoint=name, **{x: at})
        print(json.dumps(row), flush=True)
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    plot([r for r in rows if r["n"] == args.n], out.with_suffix(".png"), x)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
