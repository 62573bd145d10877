"""CCA fine-tuning recipes: the paper's settings for real LlamaGen checkpoints, by preset, and the
toy recipe of the embedded default model.

``paper`` is Table 4 of the CCA paper (arXiv 2410.09347). LlamaGen: beta 0.02, lambda by model
size, lr 1e-5, batch 256, dropout kept on, one epoch, 10% unconditional rows; the model that
``cca+cfg`` guides is tuned apart with lambda 1 (beta 0.1, or 0.02 for GPT-L). VAR: beta 0.02,
lambda 50 / 50 / 100 / 1000 for d16 / d20 / d24 / d30, lr 2e-5, batch 256, one epoch, drop-path as
VAR trains (none for d16).

Where the authors' public code differs from what this trainer does by default, and the option
that gives their choice (``authors-code`` turns on all three):
- learning rate: constant there; cosine decay here (``--lr-schedule constant``);
- weight decay: 0.05 there; 0 here (``--weight-decay 0.05``);
- gradient accumulation: micro-batch losses summed there; averaged here, so the step does not
  depend on how a batch is split (``--accumulate sum``).
"""

from __future__ import annotations

from typing import Any

# Table 4 of the paper, LlamaGen columns: (CCA lambda, CCA+CFG beta)
PAPER_LLAMAGEN = {
    "GPT-B": (1000.0, 0.1),
    "GPT-L": (300.0, 0.02),
    "GPT-XL": (1000.0, 0.1),
    "GPT-XXL": (1000.0, 0.1),
    "GPT-3B": (500.0, 0.1),
}
# Table 4, VAR columns: CCA lambda by depth; drop-path as VAR trains (0.1 * depth / 24), none for d16
PAPER_VAR = {"VAR-d16": 50.0, "VAR-d20": 50.0, "VAR-d24": 100.0, "VAR-d30": 1000.0}
PAPER_VAR_COMMON = {"beta": 0.02, "uncond_ratio": 0.1, "lr": 2e-5, "epochs": 1.0, "batch_size": 256,
                    "lr_schedule": "cosine", "weight_decay": 0.0, "accumulate": "mean"}
PAPER_COMMON = {"beta": 0.02, "uncond_ratio": 0.1, "lr": 1e-5, "epochs": 1.0, "batch_size": 256, "dropout": True,
                "lr_schedule": "cosine", "weight_decay": 0.0, "accumulate": "mean"}
AUTHORS_CODE = {"lr_schedule": "constant", "weight_decay": 0.05, "accumulate": "sum"}

# The embedded default model's recipe (a CPU budget; why it differs: docs/eval/README.md); `train all`
# stops it after 200 steps
TOY_CCA = {"lam": 10.0, "beta": 0.1, "uncond_ratio": 0.1, "lr": 5e-5, "epochs": 1.0, "batch_size": 32,
           "dropout": False, "lr_schedule": "cosine", "weight_decay": 0.0, "accumulate": "mean"}

RECIPES = ("paper", "authors-code", "toy")


def cca_recipe(recipe: str, preset: str | None, target: str = "cca") -> dict[str, Any]:
    """Settings of a recipe for a model preset; ``target`` is ``cca`` (guidance-free) or ``cca+cfg``
    (the model that mode guides)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {list(RECIPES)}")
    if target not in ("cca", "cca+cfg"):
        raise ValueError(f"target must be cca or cca+cfg, got {target!r}")
    if recipe == "toy":
        return dict(TOY_CCA, **({"lam": 1.0} if target == "cca+cfg" else {}))
    if preset in PAPER_VAR:
        if target == "cca+cfg":
            raise ValueError("the paper tunes no VAR model for cca+cfg (Table 4 has no VAR CCA+CFG column)")
        out = dict(PAPER_VAR_COMMON, lam=PAPER_VAR[preset], dropout=preset != "VAR-d16")
        if recipe == "authors-code":
            out.update(AUTHORS_CODE)
        return out
    if preset not in PAPER_LLAMAGEN:
        raise ValueError(f"the paper gives settings for {sorted(PAPER_LLAMAGEN) + sorted(PAPER_VAR)}, not "
                         f"{preset!r}; pass --recipe-model or use --recipe toy with explicit flags")
    lam, cfg_beta = PAPER_LLAMAGEN[preset]
    out = dict(PAPER_COMMON, lam=lam)
    if target == "cca+cfg":
        out.update(lam=1.0, beta=cfg_beta)
    if recipe == "authors-code":
        out.update(AUTHORS_CODE)
    return out


def describe(recipe: str, preset: str | None, target: str, settings: dict[str, Any]) -> str:
    """One line saying which recipe runs, for the log and the console."""
    shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
    source = {"paper": f"the paper's Table 4 row for {preset}", "toy": "the embedded default model's recipe",
              "authors-code": f"the paper's Table 4 row for {preset}, with the authors' code's optimiser choices"}
    return f"CCA recipe '{recipe}' ({source[recipe]}; target {target}): {shown}"


__all__ = ["cca_recipe", "describe", "PAPER_LLAMAGEN", "PAPER_VAR", "PAPER_COMMON", "PAPER_VAR_COMMON",
           "AUTHORS_CODE", "TOY_CCA", "RECIPES"]


def variant_name(loss: str, lam: float, beta: float, seed: int, negatives_within: str | None = None) -> str:
    """The work folder of one fine-tune: <loss>_lam<lambda>_beta<beta>[_seed<k>][_neg<attribute>]."""
    return (f"{loss}_lam{lam:g}_beta{beta:g}" + (f"_seed{seed}" if seed else "")
            + (f"_neg{negatives_within}" if negatives_within else ""))


def parse_variant_name(name: str) -> tuple[str, float, float, int, str | None]:
    """Inverse of variant_name: (loss, lambda, beta, training seed, negatives_within or None)."""
    name, _, within = name.partition("_neg")
    loss, rest = name.split("_lam", 1)
    lam, _, rest = rest.partition("_beta")
    beta, _, seed = rest.partition("_seed")
    return loss, float(lam), float(beta), int(seed or 0), within or None
