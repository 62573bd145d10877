"""Which of a VAR's scales does CFG's gain come from? Sample with guidance on some scales only.

VAR guides scale k with ``s_k = 1 + (s - 1) k / (K - 1)`` (its linear ramp). Here the ramp is kept
on the scales named by ``--guided`` and set to 1 (no guidance) on the others, so two complementary
sets split CFG's gain between them; with ``--mode cca+cfg`` the same asks how much guiding the CCA
model on those scales alone adds. Same seeds and scoring as ``scripts/score_settings.py`` (one JSON
line per set). A diagnostic: it swaps the sampler's schedule function for the run, and still
computes the unconditional row on unguided scales, so its timings mean nothing.

    python scripts/guidance_by_scale.py --model shapes1k-var --guided 5 --guided 0,1,2,3,4 \
        --n 5000 --out runs/guidance_by_scale.jsonl
"""

from __future__ import annotations

import argparse

from score_settings import add_scoring_args, load_for_scoring, score  # scripts/ is on the path when run

import samplers.var

linear_ramp = samplers.var.scale_guidance


def guide_only(scales: set[int]):
    """A schedule that keeps VAR's ramp on ``scales`` (0 = coarsest) and does not guide the rest."""

    def schedule(cfg_scale: float, scale: int, num_scales: int, kind: str) -> float:
        return linear_ramp(cfg_scale, scale, num_scales, kind) if scale in scales else 1.0

    return schedule


def parse_scales(text: str) -> set[int]:
    try:
        scales = {int(k) for k in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--guided: comma-separated scale indices, got {text!r}") from None
    if min(scales) < 0:
        raise argparse.ArgumentTypeError(f"--guided: scale indices start at 0, got {text!r}")
    return scales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes1k-var", help="a VAR registry name")
    ap.add_argument("--mode", choices=["cfg", "cca+cfg"], default="cfg")
    ap.add_argument("--cfg-scale", type=float, default=None, help="s of the ramp (default: the model's for --mode)")
    ap.add_argument("--guided", action="append", required=True, type=parse_scales,
                    help="scales to guide, comma-separated, 0 = coarsest; repeatable (one row each)")
    add_scoring_args(ap)
    args = ap.parse_args()
    pipe, net, ref = load_for_scoring(args)
    if pipe.family.name != "var":
        ap.error(f"--model {pipe.name} is not a VAR: guidance by scale needs one")
    num_scales = pipe.gpt.config.num_scales
    for scales in args.guided:
        if max(scales) >= num_scales:
            ap.error(f"--guided {sorted(scales)}: the model has scales 0..{num_scales - 1}")
    cfg_scale = args.cfg_scale or pipe.default_scale(args.mode)
    try:
        for scales in args.guided:
            samplers.var.scale_guidance = guide_only(scales)
            score(pipe, net, ref, args, args.mode, {"cfg_scale": cfg_scale}, guided_scales=sorted(scales))
    finally:
        samplers.var.scale_guidance = linear_ramp


if __name__ == "__main__":
    main()
