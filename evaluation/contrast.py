"""How guidance-like is a fine-tuned model? Compare its class contrasts with the base model's.

For real image tokens x of class c and another class c', the base model's *guidance contrast* is
``dg = log p_ref(x | c) - log p_ref(x | c')`` (summed over the image's tokens), and the fine-tune's
*reward contrast* is ``dr = r(x, c) - r(x, c')`` with ``r = log p_tuned - log p_ref``, the CCA
paper's implicit reward. Guidance of scale s viewed at the sequence level, a model proportional
to ``p(x | c)^s p(x)^(1 - s)``, scales every contrast by s, so ``dr = (s - 1) * dg`` up to a
per-class normaliser. The least-squares slope of dr on dg (through the origin) therefore reads as
an *effective guidance scale* ``1 + slope``, and comparing it across kinds of negatives shows
whether the fine-tune strengthened the whole conditional signal or only parts of it. CFG itself
guides token by token, not at the sequence level, so it is measured the same way (the distribution
CFG samples from, scored like any model: ``logprobs_by_class``) rather than assumed to give s.
For VAR that distribution uses VAR's ramp: the scale at each token is the one its scale is
sampled with (``samplers.var.scale_guidance``).

Negatives: the classes CCA trains on, rolled within a shuffled batch (any model and code set,
LlamaGen included), and on Shapes-1k classes that differ from the image's own in exactly one
attribute (shape, colour or texture), which is how the default model's shortfall against CFG was
traced to shape and texture.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from samplers.var import VAR, scale_guidance
from training import shapes
from training.losses import code_logprobs, teacher_inputs

from .evaluate import attribute_targets

CONTRAST_DATA_SEED = 9  # held-out Shapes-1k images (training uses seeds 0..2, evaluation 7 and 8)


def scale_of_position(model: torch.nn.Module) -> torch.Tensor:
    """[T] long: the index of the scale each token position belongs to (VAR's ``lvl_1L``), all 0 for LlamaGen."""
    if isinstance(model, VAR):
        return model.lvl_1L[0].long().cpu()
    return torch.zeros(model.config.block_size, dtype=torch.long)


def guidance_by_position(model: torch.nn.Module, cfg_scale: float) -> torch.Tensor:
    """The guidance scale each token is sampled with at CFG scale ``cfg_scale``: [T, 1], constant for
    LlamaGen, VAR's linear ramp over the scales for VAR (what its sampler does by default)."""
    config = model.config
    if not isinstance(model, VAR):
        return torch.full((config.block_size, 1), float(cfg_scale))
    per_scale = torch.tensor([scale_guidance(cfg_scale, k, config.num_scales, "linear")
                              for k in range(config.num_scales)])
    return per_scale[scale_of_position(model)][:, None]


@torch.no_grad()
def logprobs_by_class(model: torch.nn.Module, codes: torch.Tensor, classes: Mapping[str, torch.Tensor],
                      cfg_scales: Sequence[float] = (), batch_size: int = 250, desc: str | None = None,
                      by_scale: bool = False,
                      ) -> tuple[dict[str, torch.Tensor], dict[float, dict[str, torch.Tensor]]]:
    """``log p(x | c)`` for each kind of class, and the log-probability of x under the distribution
    CFG of scale s samples from (next-token logits ``u + s * (c - u)`` from the model's conditional and
    null-class rows), for each scale and kind: ``({kind: [N]}, {s: {kind: [N]}})``, fp32 on the CPU.
    ``by_scale``: each image's sum split over the model's scales (``scale_of_position``), [N, K] instead
    of [N] (K = 1 for LlamaGen).

    The null-class pass does not depend on the class and one conditional pass serves every scale, so
    this costs one forward per kind (plus one if any scale is asked for), not two per kind and scale.
    """
    model = model.eval()
    device = next(model.parameters()).device
    groups = scale_of_position(model).to(device)
    num_groups = int(groups.max()) + 1

    def summed(token_logprobs: torch.Tensor) -> torch.Tensor:
        if not by_scale:
            return token_logprobs.sum(dim=1).cpu()
        out = token_logprobs.new_zeros(len(token_logprobs), num_groups)
        return out.index_add_(1, groups[:token_logprobs.shape[1]], token_logprobs).cpu()

    own: dict[str, list[torch.Tensor]] = {kind: [] for kind in classes}
    guided: dict[float, dict[str, list[torch.Tensor]]] = {s: {kind: [] for kind in classes} for s in cfg_scales}
    scale_at = {s: guidance_by_position(model, s).to(device) for s in cfg_scales}
    for i in tqdm(range(0, len(codes), batch_size), desc=desc, disable=desc is None, leave=False):
        x = codes[i:i + batch_size].to(device)
        inputs = teacher_inputs(model, x)
        if cfg_scales:
            null = torch.full((len(x),), model.config.num_classes, dtype=torch.long, device=device)
            uncond = model(null, inputs).float()
        for kind, cls in classes.items():
            cond = model(cls[i:i + batch_size].to(device), inputs).float()
            own[kind].append(summed(code_logprobs(cond, x)))
            for s in cfg_scales:
                guided[s][kind].append(summed(code_logprobs(uncond + scale_at[s] * (cond - uncond), x)))
    return ({kind: torch.cat(v) for kind, v in own.items()},
            {s: {kind: torch.cat(v) for kind, v in by_kind.items()} for s, by_kind in guided.items()})


def rolled_negatives(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The classes CCA pairs each image with: the labels rolled by one within a shuffled batch, as in
    training (a plain roll of a class-ordered set would only ever change the last attribute)."""
    perm = torch.randperm(len(labels), generator=generator)
    neg = torch.empty_like(labels)
    neg[perm] = torch.roll(labels[perm], 1, dims=0)
    return neg


def attribute_negatives(labels: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Shapes-1k only: for each image, a class that differs from its own in exactly one attribute."""
    if int(labels.min()) < 0 or int(labels.max()) >= shapes.NUM_CLASSES:
        raise ValueError(f"attribute negatives need Shapes-1k class ids in [0, {shapes.NUM_CLASSES - 1}]")
    attrs = attribute_targets(labels)
    out = {}
    for which, name in enumerate(("shape", "colour", "texture")):
        shift = torch.randint(1, 10, (len(labels),), generator=generator)
        swapped = attrs.clone()
        swapped[:, which] = (swapped[:, which] + shift) % 10
        out[name] = swapped @ torch.tensor([100, 10, 1])
    return out


QUANTILES = 5  # bins of the base contrast for the tilt's shape


def tilt_by_quantile(dg: torch.Tensor, dr: torch.Tensor, bins: int = QUANTILES) -> list[float]:
    """mean(dr) / mean(dg) within each of ``bins`` equal-count bins of dg, lowest dg first.

    Guidance of any scale gives the same ratio in every bin; a tilt that flattens where the base
    contrast is large (a margin-like classifier, as a saturated contrastive loss learns) gives
    ratios that fall from bin to bin. Empty when there are fewer than two rows per bin."""
    if len(dg) < 2 * bins:
        return []
    order = torch.argsort(dg.double(), stable=True)
    return [float(dr.double()[idx].mean() / dg.double()[idx].mean()) for idx in torch.tensor_split(order, bins)]


def contrast_stats(dg: torch.Tensor, dr: torch.Tensor) -> dict[str, Any]:
    """Summary of one kind of negative: the slope of dr on dg through the origin and what it means,
    and how the ratio dr / dg changes with dg (``tilt_by_quantile``)."""
    if dg.shape != dr.shape or dg.ndim != 1 or len(dg) < 2:
        raise ValueError(f"need two equal 1-d tensors of at least 2 rows, got {tuple(dg.shape)} and {tuple(dr.shape)}")
    dg, dr = dg.double(), dr.double()
    slope = float((dg * dr).sum() / (dg * dg).sum().clamp_min(1e-12))
    corr = float(torch.corrcoef(torch.stack([dg, dr]))[0, 1]) if dr.std() > 0 and dg.std() > 0 else float("nan")
    return {"n": len(dg), "base_contrast_mean": float(dg.mean()), "base_contrast_median": float(dg.median()),
            "reward_contrast_mean": float(dr.mean()), "slope": slope, "effective_scale": 1.0 + slope,
            "corr": corr, "tilt_by_quantile": tilt_by_quantile(dg, dr)}


def reward_contrast(ref: torch.nn.Module, tuned: Mapping[str, torch.nn.Module], codes: torch.Tensor,
                    labels: torch.Tensor, negatives: Mapping[str, torch.Tensor], cfg_scales: Sequence[float] = (),
                    batch_size: int = 250,
                    progress: bool = True) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model name: {negative kind: contrast_stats + the mean reward of each side}}`` over the rows
    whose negative differs from the label: one entry per fine-tuned model, then one ``cfg s=...`` entry
    per CFG scale (the distribution CFG samples from, scored like a fine-tune). For a model of several
    scales (VAR) each entry also has ``by_scale``: the same statistics on each scale's tokens alone,
    coarsest first, to show where in the image the tilt goes."""
    if codes.ndim != 2 or len(codes) != len(labels):
        raise ValueError(f"expected codes [N, T] and labels [N], got {tuple(codes.shape)} and {tuple(labels.shape)}")
    for name, neg in negatives.items():
        if neg.shape != labels.shape:
            raise ValueError(f"negatives {name!r} have shape {tuple(neg.shape)}, labels {tuple(labels.shape)}")
    classes = {"own": labels, **negatives}
    base, guided = logprobs_by_class(ref, codes, classes, cfg_scales, batch_size,
                                     "base and cfg" if progress else None, by_scale=True)
    logps = {name: logprobs_by_class(model, codes, classes, (), batch_size, name if progress else None,
                                     by_scale=True)[0]
             for name, model in tuned.items()}
    logps.update({f"cfg s={s:g}": lp for s, lp in guided.items()})

    report: dict[str, dict[str, dict[str, Any]]] = {}
    for name, lp in logps.items():
        reward = {kind: lp[kind] - base[kind] for kind in lp}
        report[name] = {}
        for kind, neg in negatives.items():
            keep = neg != labels  # a "negative" of the image's own class has no contrast
            dg = (base["own"] - base[kind])[keep]  # [n, scales]
            r_own, r_neg = reward["own"][keep], reward[kind][keep]
            # which side moved: the same contrast can come from raising the right class's likelihood
            # or from lowering the wrong one's
            report[name][kind] = {**contrast_stats(dg.sum(1), (r_own - r_neg).sum(1)),
                                  "reward_own_mean": float(r_own.sum(1).mean()),
                                  "reward_neg_mean": float(r_neg.sum(1).mean())}
            if dg.shape[1] > 1:
                report[name][kind]["by_scale"] = [contrast_stats(dg[:, k], r_own[:, k] - r_neg[:, k])
                                                  for k in range(dg.shape[1])]
    return report


def markdown_table(report: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    lines = ["| model | negatives | n | base contrast dg (mean / median, nats) | reward contrast dr (mean) | "
             "r(x,c) / r(x,c') (mean) | slope dr/dg | effective scale | corr "
             f"| dr/dg by dg {QUANTILES}-quantile, low to high |", "|---" * 10 + "|"]
    for name, kinds in report.items():
        for kind, s in kinds.items():
            dg = f"{s['base_contrast_mean']:.1f} / {s['base_contrast_median']:.1f}"
            sides = f"{s['reward_own_mean']:.1f} / {s['reward_neg_mean']:.1f}"
            tilt = " / ".join(f"{t:.2f}" for t in s.get("tilt_by_quantile", []))
            lines.append(f"| {name} | {kind} | {s['n']} | {dg} | {s['reward_contrast_mean']:.1f} | {sides} "
                         f"| {s['slope']:.2f} | {s['effective_scale']:.2f} | {s['corr']:.2f} | {tilt} |")
    return "\n".join(lines)


def markdown_by_scale(report: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Effective scale (and the mean base contrast it is measured on) per model scale, one row per
    model and kind of negative; empty for a model of one scale (LlamaGen)."""
    rows = [(name, kind, s["by_scale"]) for name, kinds in report.items() for kind, s in kinds.items()
            if "by_scale" in s]
    if not rows:
        return ""
    num = len(rows[0][2])
    lines = ["| model | negatives | " + " | ".join(f"scale {k + 1}" for k in range(num)) + " |",
             "|---" * (num + 2) + "|"]
    first = rows[0][0]
    for _, kind, stats in (r for r in rows if r[0] == first):  # the base contrast is the same for every model
        lines.append(f"| base contrast dg (mean, nats) | {kind} | "
                     + " | ".join(f"{stat['base_contrast_mean']:.1f}" for stat in stats) + " |")
    for name, kind, stats in rows:
        lines.append(f"| {name} | {kind} | " + " | ".join(
            f"{stat['effective_scale']:.2f} ({stat['corr']:.2f})" for stat in stats) + " |")
    return "\n".join(lines)


def plot_by_scale(report: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path, title: str = "") -> None:
    """Effective guidance scale on each of the model's scales, one line per model, one panel per kind
    of negative (VAR only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(next(iter(report.values())))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.6), dpi=120, sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, by_kind in report.items():
            stats = by_kind[kind].get("by_scale", [])
            ax.plot(range(1, len(stats) + 1), [s["effective_scale"] for s in stats], marker="o", label=name,
                    linestyle="--" if name.startswith("cfg") else "-")
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_title(f"{kind} negatives", fontsize=10)
        ax.set_xlabel("scale (1 = coarsest)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("effective guidance scale on its tokens")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "Where the tilt goes, scale by scale", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_contrast(report: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path,
                  title: str = "") -> None:
    """Left: grouped bars, the effective guidance scale per kind of negative, one bar per model.
    Right: the shape of the tilt on the first kind of negative, dr / dg per quantile of dg (flat for
    guidance, falling for a margin-like reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(next(iter(report.values())))
    names = list(report)
    fig, (ax, shape_ax) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=120, gridspec_kw={"width_ratios": [7, 5]})
    _plot_tilt_shape(shape_ax, report, kinds[0])
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(kinds))]
        ys = [report[name][k]["effective_scale"] for k in kinds]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_xlabel("negative class: differs from the image's own in ...")
    ax.set_ylabel("effective guidance scale 1 + slope(dr on dg)")
    ax.set_title(title or "How guidance-like is the fine-tune, per kind of contrast")
    top = max(report[n][k]["effective_scale"] for n in names for k in kinds)
    # long model names (work folders) go two to a row, so the legend stays inside the axes
    ncol = 2 if len(names) > 2 and max(map(len, names)) > 16 else min(4, len(names))
    rows = -(-len(names) // ncol)
    ax.set_ylim(0, max(2.0, top) * (1.12 + 0.1 * rows))  # headroom for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncol=ncol)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_tilt_shape(ax: Any, report: Mapping[str, Mapping[str, Mapping[str, Any]]], kind: str) -> None:
    for name, kinds in report.items():
        tilt = kinds[kind].get("tilt_by_quantile", [])
        if tilt:
            ax.plot(range(1, len(tilt) + 1), tilt, marker="o", label=name,
                    linestyle="--" if name.startswith("cfg") else "-")
    ax.set_xticks(range(1, QUANTILES + 1))
    ax.set_xlabel(f"{QUANTILES}-quantile of the base contrast dg (1 = most alike classes)")
    ax.set_ylabel("dr / dg in the quantile")
    ax.set_title(f"shape of the tilt ({kind} negatives)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def write_report(report: Mapping[str, Any], out: str | Path, name: str, meta: Mapping[str, Any]) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps({**meta, "models": report}, indent=1))
    header = [f"# Reward contrast vs guidance contrast: {meta.get('model', '')}", "",
              f"`{meta.get('command', '')}`", "",
              f"{meta.get('n', '')} real images ({meta.get('data', '')}). dg = log p_base(x|c) - log p_base(x|c'), "
              "dr = r(x,c) - r(x,c') with r = log p_tuned - log p_base. A sequence-level guidance of scale s gives "
              "dr = (s - 1) dg, so 1 + slope is the scale the fine-tune acts like for that kind of contrast. "
              "`cfg s=...` rows score the distribution CFG samples from (token-level guidance of the base) "
              "the same way. The last column is dr / dg within equal-count bins of dg, most alike classes first: "
              "guidance keeps it flat, a reward that saturates like a margin makes it fall.", ""]
    by_scale = markdown_by_scale(report)
    if by_scale:
        header_scale = ["", "## By scale", "",
                        "The same slope on each scale's tokens alone (coarsest first): effective guidance scale, "
                        "its correlation in brackets. A row of the base contrast gives how much class signal "
                        "each scale's tokens carry.", "", by_scale]
    else:
        header_scale = []
    paths[1].write_text("\n".join(header + [markdown_table(report)] + header_scale + [""]))
    plot_contrast(report, paths[2], title=f"{meta.get('model', '')}: effective guidance scale per contrast")
    if by_scale:
        paths.append(out / f"{name}_by_scale.png")
        plot_by_scale(report, paths[3], title=f"{meta.get('model', '')}: effective guidance scale per scale")
    return paths
