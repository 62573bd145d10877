"""Which attribute values a mode's samples get wrong: per attribute, the error rate and the most
frequent (asked -> seen) confusions, read by the model's evaluation network on the validation seeds.

Where a share of CFG's gain is small (the default model's colour: 5 images in 1000), this says
what the remaining errors are and whether CFG and CCA fix the same ones.

    python scripts/attribute_errors.py --model shapes1k --setting free --setting cfg:s=1.5 --setting cca \
        --n 10000 --out runs/attribute_errors.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from score_settings import add_scoring_args, add_setting_args, load_for_scoring  # scripts/ is on the path

from evaluation import evaluate
from training import shapes

VALUES = {"shape": shapes.SHAPES, "colour": shapes.COLOUR_NAMES, "texture": shapes.TEXTURES}


def attribute_errors(asked: torch.Tensor, seen: torch.Tensor, top: int = 6) -> dict[str, Any]:
    """``asked`` / ``seen``: [n, 3] attribute indices (shape, colour, texture) of the class asked for
    and of the class the evaluation network reads. Per attribute: error rate and top confusions."""
    out: dict[str, Any] = {}
    for i, name in enumerate(shapes.ATTRIBUTES):
        wrong = asked[:, i] != seen[:, i]
        pairs = Counter(zip(asked[wrong, i].tolist(), seen[wrong, i].tolist(), strict=True))
        per_value = torch.bincount(asked[wrong, i], minlength=len(VALUES[name])).tolist()
        out[name] = {"errors": int(wrong.sum()), "error_rate": round(float(wrong.float().mean()), 5),
                     "errors_by_asked_value": dict(zip(VALUES[name], per_value, strict=True)),
                     "top_confusions": [(VALUES[name][a], VALUES[name][b], c) for (a, b), c in pairs.most_common(top)]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setting_args(ap)
    add_scoring_args(ap)  # --out: here one JSON file, rewritten
    args = ap.parse_args()
    pipe, net, _ = load_for_scoring(args)
    labels = torch.tensor(evaluate.balanced_labels(args.n, pipe.num_classes))
    first = evaluate.split_seed_base(args.split, args.seed_set)
    seeds = [first + i for i in range(args.n)]
    report = {"model": pipe.name, "cca": args.cca, "n": args.n, "split": args.split, "seed_set": args.seed_set,
              "settings": {}}
    for mode, options in args.setting:
        images = pipe.sample_images(labels.tolist(), mode, seeds, progress=False, **options)
        _, logp = evaluate.embed(net, images)
        found = attribute_errors(evaluate.attribute_targets(labels), evaluate.attribute_targets(logp.argmax(1)))
        key = mode + "".join(f":{k}={v}" for k, v in options.items())
        report["settings"][key] = found
        print(key, {a: (f["errors"], f["top_confusions"][:4]) for a, f in found.items()}, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
