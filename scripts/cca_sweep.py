"""Explore CCA fine-tune settings fast on an accelerator: train each setting on the shipped base
model and score it in cca mode on the validation seeds, next to free and CFG sampling of the base.

The shipped recipe is chosen and trained on CPU (``ccaserve train all``, bit for bit); this script
only answers "which settings are worth those CPU hours" in minutes on a GPU. Every result is
appended to --out as soon as it exists, and the run stops starting new settings at --deadline.

    python scripts/cca_sweep.py --device cuda --codes runs/gpu --out results.json --deadline 420
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cli.train import RECIPE, VAR_RECIPE
from evaluation import evaluate
from samplers.pipeline import Pipeline
from samplers.registry import Registry
from training.trainers import CCATrainArgs, CodeData, RunSetup, extract_codes, train_cca

# (family, name, code data seeds, overrides of the shipped recipe), in order of priority
PLAN: list[tuple[str, str, list[int], dict[str, Any]]] = [
    ("llamagen", "shipped", [0], {}),
    ("llamagen", "200k", [0, 1, 2, 3], {}),
    ("llamagen", "100k", [0, 1], {}),
    ("llamagen", "lr 1e-4", [0], {"lr": 1e-4}),
    ("llamagen", "50k x4 epochs", [0], {"epochs": 4.0}),
    ("var", "shipped", [0], {}),
    ("var", "lr 1e-4", [0], {"lr": 1e-4}),
    ("var", "200k", [0, 1, 2, 3], {}),
    ("llamagen", "100k lr 1e-4", [0, 1], {"lr": 1e-4}),
    ("var", "lr 3e-4", [0], {"lr": 3e-4}),
    ("llamagen", "lr 3e-4", [0], {"lr": 3e-4}),
    ("llamagen", "batch 32", [0], {"batch_size": 32}),
    ("var", "batch 32", [0], {"batch_size": 32}),
    ("llamagen", "200k beta 0.1", [0, 1, 2, 3], {"beta": 0.1}),
    ("llamagen", "200k lam 100", [0, 1, 2, 3], {"lam": 100.0}),
    ("var", "50k x4 epochs", [0], {"epochs": 4.0}),
    ("llamagen", "uncond 0", [0], {"uncond_ratio": 0.0}),
    ("var", "200k lam 30", [0, 1, 2, 3], {"lam": 30.0}),
]

MODEL = {"llamagen": "shapes1k", "var": "shapes1k-var"}
BASE_CODES = {"llamagen": "runs/shapes1k/codes.npz", "var": "runs/shapes1k_var/codes.npz"}
CODES_NAME = {"llamagen": "gpt_codes_s{}.npz", "var": "var_codes_s{}.npz"}
CFG_SCALE = {"llamagen": 2.0, "var": 3.0}  # the scales the shipped evaluations chose on validation
KEYS = ("fid", "is", "accuracy", "shape_accuracy", "colour_accuracy", "texture_accuracy")


def load_codes(family: str, seeds: list[int], codes_dir: Path, tokenizer: torch.nn.Module) -> CodeData:
    """The shipped codes (data seed 0) and extra data seeds, from files when there, else extracted
    here and written for the next setting."""
    parts = []
    for s in seeds:
        path = Path(BASE_CODES[family]) if s == 0 else codes_dir / CODES_NAME[family].format(s)
        if not path.exists():
            start = time.perf_counter()
            path.parent.mkdir(parents=True, exist_ok=True)
            extract_codes(tokenizer, 50000, data_seed=s, progress=False, workers=os.cpu_count() or 1).save(path)
            print(f"extracted {path} in {time.perf_counter() - start:.0f} s", flush=True)
        parts.append(CodeData.load(path))
    return CodeData.concat(parts)


def closes(free: dict[str, float], cfg: dict[str, float], cca: dict[str, float]) -> dict[str, float]:
    shares = {k: evaluate.share_of_cfg_gain(free[k], cfg[k], cca[k]) for k in KEYS}
    return {k: round(v, 3) for k, v in shares.items() if v is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--codes", default="runs/gpu", help="folder with the extra code files (data seeds 1-3)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=2000, help="validation images per score")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds after which no new setting starts")
    ap.add_argument("--only", default=None, help="comma-separated plan indices")
    ap.add_argument("--save-models", default=None,
                    help="folder for the weights (fp16 safetensors) of fine-tunes that could not be scored")
    ap.add_argument("--max-steps", type=int, default=None, help="cut every fine-tune short (smoke test)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    registry = Registry()
    net = evaluate.load_evalnet(registry.get("shapes1k").weights_dir / "shapes1k/evalnet")
    ref_stats = evaluate.reference_stats(net, 10000, progress=False)
    seed_base = evaluate.split_seed_base("validation", 0)
    pipes: dict[str, Pipeline] = {}
    baselines: dict[str, dict[str, dict[str, float]]] = {}

    def score(pipe: Pipeline, mode: str, **options: Any) -> dict[str, float]:
        e = evaluate.evaluate_mode(pipe, net, ref_stats, mode, args.n, seed_base=seed_base, progress=False,
                                   **options)
        return {k: round(float(e[k]), 4) for k in KEYS}

    def save(entry: dict[str, Any]) -> None:
        entry["elapsed_s"] = round(time.perf_counter() - t0, 1)
        results.append(entry)
        Path(args.out).write_text(json.dumps({"device": args.device, "n": args.n, "results": results}, indent=1))
        print(json.dumps(entry), flush=True)

    plan = PLAN if args.only is None else [PLAN[int(i)] for i in args.only.split(",")]
    for family, name, seeds, overrides in plan:
        if time.perf_counter() - t0 > args.deadline:
            print(f"deadline reached before {family} {name}", flush=True)
            break
        if family not in pipes:
            pipes[family] = Pipeline.from_registry(MODEL[family], device=args.device, dtype=torch.float32)
            try:
                free = score(pipes[family], "free")
                cfg = score(pipes[family], "cfg", cfg_scale=CFG_SCALE[family])
                baselines[family] = {"free": free, "cfg": cfg}
                save({"family": family, "name": "base", "free": free, "cfg": cfg})
            except Exception as exc:  # train and save the fine-tunes anyway, to be scored elsewhere
                save({"family": family, "name": "base", "error": repr(exc)})
        pipe = pipes[family]
        recipe = {**(RECIPE if family == "llamagen" else VAR_RECIPE)["cca"], **overrides}
        data = load_codes(family, seeds, Path(args.codes), pipe.vq)
        start = time.perf_counter()
        try:
            model = train_cca(None, pipe.gpt, data, CCATrainArgs(**recipe, max_steps=args.max_steps), progress=False,
                              setup=RunSetup(device=args.device, precision="fp32"))
        except Exception as exc:  # one failing setting should not cost the others
            save({"family": family, "name": name, "error": repr(exc)})
            continue
        train_s = time.perf_counter() - start
        entry = {"family": family, "name": name, "images": len(data), "settings": recipe, "train_s": round(train_s, 1)}
        if args.save_models and family not in baselines:  # not scored here: keep it (8 files come back at most)
            path = Path(args.save_models) / f"{family}_{len(results):02d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.half().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
            entry["model"] = path.name
        if family in baselines:
            pipe.models["cca"] = model.to(args.device).eval()
            cca = score(pipe, "cca")
            entry.update(cca=cca, closes=closes(baselines[family]["free"], baselines[family]["cfg"], cca))
        save(entry)


if __name__ == "__main__":
    main()
