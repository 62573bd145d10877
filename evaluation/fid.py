"""ImageNet-style metrics of a sample batch against a reference batch, both ``.npz`` files as the
OpenAI/ADM evaluator reads them: ``arr_0`` uint8 [N, H, W, 3]; a reference may also carry
precomputed ``mu`` / ``sigma`` (2048-d pool statistics) and ``mu_s`` / ``sigma_s`` (spatial
statistics), which are then used as they are.

FID, sFID (the Fréchet distance of ADM's spatial features: 7 channels of mixed_6/conv, 2023-d),
Inception Score (mean over splits of 5000, as ADM) and precision / recall (k = 3 nearest
neighbours in pool-feature space, on every image of both batches as ADM does, or the first
``pr_n``) with the FID Inception-v3 of ``evaluation.inception``. The default Shapes-1k model is
scored by its own network instead (``ccaserve eval``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .evaluate import frechet_distance, gaussian_stats, inception_score, precision_recall
from .inception import FIDInception

IS_SPLIT = 5000


def load_batch(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .npz at {path}")
    with np.load(path) as data:
        out = {k: data[k] for k in data.files if k in ("arr_0", "mu", "sigma", "mu_s", "sigma_s")}
    images = out.get("arr_0")
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    if images is None and "mu" not in out:
        raise ValueError(f"{path} holds neither arr_0 (images) nor mu/sigma (statistics)")
    return out


@torch.inference_mode()
def inception_outputs(net: FIDInception, images: np.ndarray, batch_size: int = 100, desc: str = "inception",
                      progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool features [N, 2048] (float64), log-probabilities [N, 1008] and spatial features
    [N, 2023] (float64, for sFID) of uint8 NHWC images."""
    device = next(net.parameters()).device
    feats, logp, spatial = [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
        x = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
        f, lp, sp = net.features(x)
        feats.append(f.double().cpu())
        logp.append(lp.float().cpu())
        spatial.append(sp.double().cpu())
    return torch.cat(feats), torch.cat(logp), torch.cat(spatial)


def split_inception_score(log_probs: torch.Tensor, split: int = IS_SPLIT) -> float:
    scores = [inception_score(log_probs[s : s + split]) for s in range(0, len(log_probs), split)]
    return float(np.mean(scores))


def batch_metrics(net: FIDInception, samples: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                  batch_size: int = 100, pr_n: int | None = None, progress: bool = True) -> dict[str, Any]:
    """FID, sFID, IS and precision / recall of a sample batch against a reference batch.
    ``pr_n``: None uses every image for precision / recall (as ADM), 0 skips them, N the first N."""
    if "arr_0" not in samples:
        raise ValueError("the sample batch needs arr_0 (images)")
    feats, logp, spatial = inception_outputs(net, samples["arr_0"], batch_size, "samples", progress)
    mu, sigma = gaussian_stats(feats)
    ref_images = reference.get("arr_0")
    have_stats = all(k in reference for k in ("mu", "sigma", "mu_s", "sigma_s"))
    ref_feats = ref_spatial = None
    if ref_images is not None and not (have_stats and pr_n == 0):
        shown = ref_images if pr_n is None or not have_stats else ref_images[:pr_n]
        ref_feats, _, ref_spatial = inception_outputs(net, shown, batch_size, "reference", progress)
    if "mu" in reference and "sigma" in reference:
        ref_mu, ref_sigma = torch.from_numpy(reference["mu"]).double(), torch.from_numpy(reference["sigma"]).double()
    else:
        ref_mu, ref_sigma = gaussian_stats(ref_feats)
    if "mu_s" in reference and "sigma_s" in reference:
        ref_mu_s = torch.from_numpy(reference["mu_s"]).double()
        ref_sigma_s = torch.from_numpy(reference["sigma_s"]).double()
    elif ref_spatial is not None:
        ref_mu_s, ref_sigma_s = gaussian_stats(ref_spatial)
    else:
        ref_mu_s = ref_sigma_s = None
    mu_s, sigma_s = gaussian_stats(spatial)
    result: dict[str, Any] = {
        "n_samples": len(feats), "n_reference": None if ref_images is None else len(ref_images),
        "reference_stats": "precomputed mu/sigma" if "mu" in reference else "computed from arr_0",
        "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
        "sfid": None if ref_mu_s is None else frechet_distance(mu_s, sigma_s, ref_mu_s, ref_sigma_s),
        "is": split_inception_score(logp),
        "precision": None, "recall": None,
    }
    if ref_feats is not None and pr_n != 0:
        real, fake = (ref_feats, feats) if pr_n is None else (ref_feats[:pr_n], feats[:pr_n])
        result["precision"], result["recall"] = precision_recall(real.float(), fake.float())
        result["pr_n"] = {"reference": len(real), "samples": len(fake)}
    return result
