"""Sample-quality metrics for the embedded default model: FID, IS, precision, recall, accuracy.

ImageNet metrics use an Inception network trained on ImageNet; ours use ``EvalNet``, a small CNN
trained only on real (rendered) Shapes-1k images to tell shape, colour and texture apart. Its
128-d penultimate features play Inception's pool features (FID, precision/recall) and the product
of its three heads gives a 1000-way class posterior (IS, class accuracy). Reference statistics
come from held-out real images, never from model samples.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from samplers.family import ModelFamily
from samplers.modes import get_mode
from training import shapes

REFERENCE_SEED = 7  # held-out real images for reference statistics (training uses seeds 0..2)

# Image seeds of model samples. Settings (CFG scale, lambda, checkpoint) are chosen on the validation
# seeds; the reported table is sampled on the test seeds, seed set k starting at base + k * stride.
SPLITS = {"validation": "0", "test": "50000000 + 1000003 k (seed set k)"}
_SPLIT_BASE = {"validation": 0, "test": 50_000_000}
_SEED_SET_STRIDE = 1_000_003
METRICS = ("fid", "is", "precision", "recall", "accuracy", "shape_accuracy", "colour_accuracy", "texture_accuracy")


class EvalNet(nn.Module):
    """Conv net: image [B, 3, 32, 32] in [-1, 1] -> features [B, 128] and three 10-way heads."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.width, self.feature_dim = width, feature_dim

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                  block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * width, feature_dim), nn.ReLU())
        self.heads = nn.Linear(feature_dim, 30)  # shape | colour | texture logits

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(images)
        return feats, self.heads(feats).view(-1, 3, 10)

    @staticmethod
    def class_log_probs(head_logits: torch.Tensor) -> torch.Tensor:
        """[B, 3, 10] head logits -> [B, 1000] log p(class) = log p(shape) + log p(colour) + log p(texture)."""
        lp = torch.log_softmax(head_logits, dim=-1)
        return (lp[:, 0, :, None, None] + lp[:, 1, None, :, None] + lp[:, 2, None, None, :]).reshape(-1, 1000)


def attribute_targets(labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([labels // 100, (labels // 10) % 10, labels % 10], dim=1)


@dataclass
class EvalNetTrainArgs:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    data_seed: int = 2
    pool_size: int = 20000


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def degrade(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Training augmentation: blur and noise of random strength on three quarters of the batch.

    Samples of any tokenizer-based model are softer than the rendered originals; a network that
    has only seen crisp images judges sharpness instead of content (shape, colour, texture)."""
    chunks = images.chunk(4)
    out = [chunks[0]]
    for chunk in chunks[1:]:
        sigma = float(torch.rand(1, generator=gen)) * 1.5
        noise = float(torch.rand(1, generator=gen)) * 0.06
        chunk = gaussian_blur(chunk, sigma)
        out.append((chunk + noise * torch.randn(chunk.shape, generator=gen)).clamp(-1, 1))
    return torch.cat(out)


def train_evalnet(out_dir: str | Path, args: EvalNetTrainArgs | None = None, progress: bool = True,
                  heldout: int = 2000) -> EvalNet:
    from training.trainers import Schedule, _optimizer, _run, _write_log

    args = args or EvalNetTrainArgs()
    torch.manual_seed(args.seed)
    net = EvalNet().train()
    opt = _optimizer(net, args.lr, 1e-4)
    schedule = Schedule(args.steps, args.lr, warmup=20, min_lr_ratio=0.01)

    gen = torch.Generator().manual_seed(args.seed)
    pool, pool_labels = shapes.make_batch(args.data_seed, range(args.pool_size))  # rendered once

    def step_fn(step: int) -> dict[str, float]:
        # random picks: consecutive indices would be consecutive classes, one shape per batch
        idx = torch.randint(0, len(pool), (args.batch_size,), generator=gen)
        images, labels = degrade(pool[idx], gen), pool_labels[idx]
        _, logits = net(images)
        target = attribute_targets(labels)
        loss = F.cross_entropy(logits.reshape(-1, 10), target.reshape(-1))
        loss.backward()
        return {"loss": loss.item(), "acc": float((logits.argmax(-1) == target).all(1).float().mean())}

    start = time.time()
    history = _run("train evalnet", args.steps, schedule, opt, net, step_fn, progress=progress)
    net.eval()
    images, labels = shapes.make_batch(REFERENCE_SEED + 1, range(heldout))
    acc = class_accuracy(net, images, labels)
    save_evalnet(net, out_dir, {"train": asdict(args), "heldout_class_accuracy": round(acc, 4)})
    _write_log(Path(out_dir), "evalnet", asdict(args), history, time.time() - start)
    return net


def save_evalnet(net: EvalNet, out_dir: str | Path, extra: dict[str, Any] | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    meta = {"kind": "evalnet", "config": {"width": net.width, "feature_dim": net.feature_dim}, **(extra or {})}
    (out / "config.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_evalnet(path: str | Path) -> EvalNet:
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    if meta.get("kind") != "evalnet":
        raise ValueError(f"{path} is not an evaluation network (kind {meta.get('kind')!r})")
    net = EvalNet(**meta["config"])
    net.load_state_dict(load_file(str(path / "model.safetensors")))
    return net.eval()


@torch.no_grad()
def embed(net: EvalNet, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """features [N, 128] (float64) and class log-probs [N, 1000]."""
    feats, logp = [], []
    for start in range(0, len(images), batch_size):
        f, h = net(images[start : start + batch_size])
        feats.append(f.double())
        logp.append(EvalNet.class_log_probs(h))
    return torch.cat(feats), torch.cat(logp)


def class_accuracy(net: EvalNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, logp = embed(net, images)
    return float((logp.argmax(1) == labels).float().mean())


# ---- metrics -------------------------------------------------------------------------------
def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return feats.mean(0), torch.cov(feats.T)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); the trace of the root via the symmetric
    form S1^1/2 S2 S1^1/2, whose eigenvalues are those of S1 S2."""
    vals, vecs = torch.linalg.eigh(sigma1.double())
    root1 = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    mid = root1 @ sigma2.double() @ root1
    tr_covmean = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp(min=0).sqrt().sum()
    diff = (mu1 - mu2).double()
    return float(diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_covmean)


def inception_score(log_probs: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))), one split."""
    p = log_probs.exp()
    log_marginal = torch.log(p.mean(0).clamp(min=1e-30))
    return float(torch.exp((p * (log_probs - log_marginal)).sum(1).mean()))


PR_BLOCK = 5000  # rows of a distance block: 50k samples x 5k reference points stay near 1 GB


def _knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every point to its k-th nearest neighbour (itself excluded), a block of rows at a
    time so that all of ADM's 50k samples fit."""
    block = PR_BLOCK
    return torch.cat([torch.cdist(feats[i : i + block], feats).kthvalue(k + 1, dim=1).values  # +1: itself
                      for i in range(0, len(feats), block)])


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For every point: is it inside some ball (centre, radius)?"""
    block = PR_BLOCK
    return torch.cat([(torch.cdist(points[i : i + block], centres) <= radii[None, :]).any(1)
                      for i in range(0, len(points), block)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019, on every feature given (as ADM's evaluator): precision = share of
    samples inside the real manifold (union of k-NN balls around real features); recall = share of
    real features inside the sample manifold."""
    real_r, fake_r = _knn_radii(real, k), _knn_radii(fake, k)
    precision = _covered(fake, real, real_r).float().mean()
    recall = _covered(real, fake, fake_r).float().mean()
    return float(precision), float(recall)


@dataclass
class Reference:
    feats: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    n: int
    seed: int


def reference_stats(net: EvalNet, n: int = 10000, seed: int = REFERENCE_SEED, progress: bool = True) -> Reference:
    feats = []
    for start in tqdm(range(0, n, 500), desc="reference images", disable=not progress, leave=False):
        images, _ = shapes.make_batch(seed, range(start, min(n, start + 500)))
        feats.append(embed(net, images)[0])
    f = torch.cat(feats)
    mu, sigma = gaussian_stats(f)
    return Reference(f, mu, sigma, n, seed)


def sample_metrics(net: EvalNet, ref: Reference, images: torch.Tensor, labels: torch.Tensor,
                   pr_subset: int = 5000) -> dict[str, float]:
    feats, logp = embed(net, images)
    mu, sigma = gaussian_stats(feats)
    m = min(pr_subset, len(feats), len(ref.feats))
    precision, recall = precision_recall(ref.feats[:m].float(), feats[:m].float())
    target = attribute_targets(labels)
    pred = attribute_targets(logp.argmax(1))
    return {
        "fid": round(frechet_distance(mu, sigma, ref.mu, ref.sigma), 3),
        "is": round(inception_score(logp), 2),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "accuracy": round(float((logp.argmax(1) == labels).float().mean()), 4),
        **{f"{name}_accuracy": round(float((pred[:, i] == target[:, i]).float().mean()), 4)
           for i, name in enumerate(("shape", "colour", "texture"))},
    }


def split_seed_base(split: str, seed_set: int = 0) -> int:
    """First image seed of a split's seed set (image i of the set has seed base + i)."""
    if split not in _SPLIT_BASE:
        raise ValueError(f"split must be one of {sorted(_SPLIT_BASE)}, got {split!r}")
    if split == "validation" and seed_set:
        raise ValueError("the validation split has one seed set")
    return _SPLIT_BASE[split] + seed_set * _SEED_SET_STRIDE


def share_of_cfg_gain(free: float, cfg: float, cca: float) -> float | None:
    """How much of CFG's change over free sampling CCA reaches: (cca - free) / (cfg - free); None
    when CFG changes nothing."""
    return (cca - free) / (cfg - free) if cfg != free else None


def balanced_labels(n: int, num_classes: int = shapes.NUM_CLASSES) -> list[int]:
    return [i % num_classes for i in range(n)]


def evaluate_mode(pipeline: Any, net: EvalNet, ref: Reference, mode: str, n: int, seed_base: int = 0,
                  progress: bool = True, **options: Any) -> dict[str, Any]:
    """Sample n class-balanced images in one mode (seed of image i = seed_base + i) and score them."""
    labels = balanced_labels(n, pipeline.num_classes)
    start = time.perf_counter()
    images = pipeline.sample_images(labels, mode, [seed_base + i for i in range(n)], progress=progress, **options)
    seconds = time.perf_counter() - start
    opts = pipeline.options_for(mode, **options)
    return {"mode": mode, "n": n, "seed_base": seed_base, "cfg_scale": opts.cfg_scale,
            "temperature": opts.temperature, "top_k": opts.top_k, "top_p": opts.top_p,
            **sample_metrics(net, ref, images, torch.tensor(labels)), "sample_seconds": round(seconds, 1)}


def real_data_metrics(net: EvalNet, ref: Reference, n: int, seed: int = REFERENCE_SEED + 1) -> dict[str, Any]:
    """The same metrics for held-out real images: the floor FID can reach with n samples."""
    images, labels = shapes.make_batch(seed, range(n))
    return {"mode": "real", "n": n, **sample_metrics(net, ref, images, labels)}


@torch.no_grad()
def reconstruction_metrics(net: EvalNet, ref: Reference, family: ModelFamily, n: int,
                           seed: int = REFERENCE_SEED + 1) -> dict[str, Any]:
    """Held-out real images passed through the family's tokenizer: the best any AR model on these
    codes can score (the tokenizer's ceiling)."""
    images, labels = shapes.make_batch(seed, range(n))
    recon = torch.cat([family.codes_to_images(family.images_to_codes(images[i : i + 500])).cpu()
                       for i in range(0, n, 500)])
    return {"mode": "vq reconstruction", "n": n, **sample_metrics(net, ref, recon, labels)}


def markdown_table(entries: Sequence[dict[str, Any]]) -> str:
    cols = ["mode", "model", "setting", "fid", "is", "precision", "recall", "accuracy", "rows_per_image"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for e in entries:
        lines.append("| " + " | ".join(_fmt(e.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def plot_fid_is(entries: Sequence[dict[str, Any]], path: str | Path, title: str = "CFG vs guidance-free CCA") -> None:
    """FID vs IS, one line per sweep (CFG scale for the base model, lambda for CCA), like the paper's Fig. 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    groups: dict[str, list[dict[str, Any]]] = {}
    best = min(e["fid"] for e in entries)
    off_scale = [e for e in entries if e["fid"] > 3 * best]  # a collapsed model would squash the others
    for e in entries:
        if e not in off_scale:
            groups.setdefault(e.get("sweep") or e["mode"], []).append(e)
    styles = {"cfg scale (base)": ("tab:blue", "o-"), "cfg scale (cca+cfg)": ("tab:purple", "^-"),
              "cca (shipped)": ("black", "*"), "free": ("grey", "D"), "training seed (cca)": ("tab:green", "D"),
              "hard negatives (cca)": ("tab:cyan", "P")}
    lambda_colours = iter(["tab:red", "tab:orange", "tab:brown", "tab:pink"])
    labels: list[tuple[str, float, float]] = []
    for name, group in groups.items():
        if name == "real":
            continue
        if name.startswith("lambda"):  # one lambda curve per beta
            group = sorted(group, key=lambda g: g["lambda"])
            colour, style = next(lambda_colours, None), "s-"
        else:
            colour, style = styles.get(name, (None, "D"))
        xs, ys = [g["is"] for g in group], [g["fid"] for g in group]
        ax.plot(xs, ys, style, color=colour, label=name, markersize=6, linewidth=1.5 if len(group) > 1 else 0)
        labels += [(g.get("setting", ""), g["is"], g["fid"]) for g in group if g.get("setting")]
    ax.set_xlabel("Inception-style score (EvalNet), higher is better")
    ax.set_ylabel("FID (EvalNet features), lower is better")
    ax.set_title(title, fontsize=10)
    if off_scale:
        ax.text(0.01, 0.01, "off scale: " + "; ".join(f"{e.get('sweep') or e['mode']} FID {e['fid']:.0f}, "
                                                      f"IS {e['is']:.1f}" for e in off_scale),
                transform=ax.transAxes, fontsize=7, color="grey")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _place_labels(fig, ax, labels)
    fig.savefig(path)
    plt.close(fig)


def _place_labels(fig: Any, ax: Any, labels: Sequence[tuple[str, float, float]]) -> None:
    """Each point's label beside it, at the first of a few offsets where it overlaps no label
    placed before it (nearby sweep points and their variants would otherwise write over each other)."""
    candidates = [((4, 4), "left"), ((-4, 4), "right"), ((4, -10), "left"), ((-4, -10), "right"),
                  ((7, -3), "left"), ((-7, -3), "right")]
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for text, x, y in labels:
        for offset, align in candidates:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, ha=align, fontsize=7)
            box = note.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in placed) or (offset, align) == candidates[-1]:
                placed.append(box)
                break
            note.remove()


def settings_label(entry: dict[str, Any]) -> str:
    """The short label of a row's setting, as the plot and the tables show it."""
    beta = f" β={entry['beta']:g}" if entry.get("beta") is not None else ""
    if entry.get("sweep", "").startswith("lambda"):
        return f"λ={entry['lambda']:g}{beta}"
    if entry.get("sweep") == "training seed (cca)":
        return f"λ={entry['lambda']:g}{beta} seed {entry['train_seed']}"
    if entry.get("sweep") == "hard negatives (cca)":
        return f"λ={entry['lambda']:g}{beta} within {entry['negatives_within']}"
    if entry.get("cfg_scale", 1.0) != 1.0:
        return f"s={entry['cfg_scale']:g}"
    return ""


def finish_entry(entry: dict[str, Any], **meta: Any) -> dict[str, Any]:
    entry.update(meta)
    entry["rows_per_image"] = get_mode(entry["mode"]).rows_per_image
    entry["setting"] = settings_label(entry)
    return entry


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
    return {"mean": round(mean, 4), "std": round(sd, 4), "runs": len(values)}


def test_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Test rows (one per mode and seed set, the same seed sets for every mode) -> per mode the mean
    and std of every metric over the seed sets; the share of CFG's gain over free that CCA closes,
    per metric, computed on each seed set (mean, std) and on the means; and cca+cfg minus cfg."""
    by_mode: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], {})[r["seed_set"]] = r
    modes = {}
    for mode, sets in by_mode.items():
        first = next(iter(sets.values()))  # model and scale are the same in every seed set
        modes[mode] = {"model": first["model"], "cfg_scale": first["cfg_scale"],
                       "rows_per_image": first["rows_per_image"],
                       **{m: _mean_std([r[m] for r in sets.values()]) for m in METRICS}}
    out: dict[str, Any] = {"modes": modes}
    if {"free", "cfg", "cca"} <= set(by_mode):
        seed_sets = sorted(set(by_mode["free"]) & set(by_mode["cfg"]) & set(by_mode["cca"]))
        closing = {}
        for m in METRICS:
            if m in ("precision", "recall"):
                continue
            shares = (share_of_cfg_gain(*(by_mode[x][k][m] for x in ("free", "cfg", "cca"))) for k in seed_sets)
            per_set = [v for v in shares if v is not None]
            free, cfg, cca = (modes[x][m]["mean"] for x in ("free", "cfg", "cca"))
            of_means = share_of_cfg_gain(free, cfg, cca)
            closing[m] = {"of_means": None if of_means is None else round(of_means, 4),
                          "cfg_gain": round(cfg - free, 4),
                          **(_mean_std(per_set) if per_set else {})}
        out["cca_closes_of_cfg_gain"] = closing
    if {"cfg", "cca+cfg"} <= set(by_mode):
        seed_sets = sorted(set(by_mode["cfg"]) & set(by_mode["cca+cfg"]))
        out["cca+cfg_minus_cfg"] = {m: _mean_std([by_mode["cca+cfg"][k][m] - by_mode["cfg"][k][m] for k in seed_sets])
                                    for m in ("fid", "is", "accuracy")}
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    cols = ["fid", "is", "precision", "recall", "accuracy", "shape_accuracy", "colour_accuracy", "texture_accuracy"]
    lines = ["| mode | model | cfg scale | rows/img | " + " | ".join(c.replace("_accuracy", " acc") for c in cols)
             + " |", "|" + "---|" * (len(cols) + 4)]
    for mode, row in summary["modes"].items():
        cells = [f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}" if row[c]["mean"] < 10
                 else f"{row[c]['mean']:.2f} ± {row[c]['std']:.2f}" for c in cols]
        lines.append(f"| {mode} | {row['model']} | {row['cfg_scale']:g} | {row['rows_per_image']} | "
                     + " | ".join(cells) + " |")
    closing = summary.get("cca_closes_of_cfg_gain")
    if closing:
        lines += ["", "Share of CFG's gain over free sampling that CCA closes, (cca - free) / (cfg - free), on the "
                  "means (per seed set: mean ± std):", "",
                  "| metric | cfg gain | cca closes | per seed set |", "|---|---|---|---|"]
        for m, c in closing.items():
            per = f"{c['mean']:.2f} ± {c['std']:.2f}" if "mean" in c else ""
            of_means = f"{c['of_means']:.2f}" if c["of_means"] is not None else "n/a (no gain)"
            lines.append(f"| {m} | {c['cfg_gain']:+.3f} | {of_means} | {per} |")
    diff = summary.get("cca+cfg_minus_cfg")
    if diff:
        lines += ["", "cca+cfg minus cfg (each at its chosen scale), per seed set: "
                  + ", ".join(f"{m} {d['mean']:+.3f} ± {d['std']:.3f}" for m, d in diff.items())]
    return "\n".join(lines)
