"""Sample an evaluation set (e.g. 50,000 images) on one process or many (torchrun), resumably.

Image ``i`` has class ``i % num_classes`` (class-balanced) and seed ``seed_of(global_seed, i)``;
since an image depends only on (weights, mode, class, seed, options), which rank draws it does not
matter: N ranks write exactly the files one rank writes. Each image is written as ``{i:06d}.png``
via a temporary file and a rename, so a killed run leaves only complete images, and a rerun draws
just the missing indices (with any number of ranks). Rank 0 then packs ``arr_0`` (uint8
[N, H, W, 3]) into the ``.npz`` the OpenAI/ADM evaluator and ``ccaserve fid`` read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from samplers.pipeline import Pipeline, normalize_mode, to_pil
from training import distributed

from .evaluate import balanced_labels


def seed_of(global_seed: int, index: int) -> int:
    return global_seed * 1_000_000_007 + index


def plan(num_images: int, num_classes: int, global_seed: int) -> tuple[list[int], list[int]]:
    """Class and seed of every index."""
    return balanced_labels(num_images, num_classes), [seed_of(global_seed, i) for i in range(num_images)]


def missing_indices(folder: Path, num_images: int) -> list[int]:
    return [i for i in range(num_images) if not (folder / f"{i:06d}.png").exists()]


def _write_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def pack_npz(folder: Path, num_images: int, out: Path, progress: bool = True) -> Path:
    """``arr_0``: uint8 [N, H, W, 3] in index order, as the ADM evaluator expects."""
    first = np.asarray(Image.open(folder / f"{0:06d}.png").convert("RGB"))
    arr = np.empty((num_images, *first.shape), dtype=np.uint8)
    for i in tqdm(range(num_images), desc="pack npz", disable=not progress):
        arr[i] = np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB"))
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, arr_0=arr)
    os.replace(tmp, out)
    return out


def sample_fid(pipe: Pipeline, folder: str | Path, *, mode: str, num_images: int, batch_size: int = 32,
               global_seed: int = 0, resize: int | None = None, pack: bool = True, npz: str | Path | None = None,
               env: distributed.DistEnv | None = None, progress: bool = True,
               settings: dict[str, Any] | None = None, **options: Any) -> Path | None:
    """Draw the images of ``folder`` that are not there yet, this rank's share of them, then (rank 0)
    pack the npz (default: next to the folder, ``<folder>.npz``). ``options``: cfg_scale,
    cfg_interval, temperature, top_k, top_p. ``settings`` (the model's description) is written with
    the options to ``folder/sample_fid.json``; a rerun with other settings refuses to mix its images
    with the folder's. Returns the npz path on rank 0."""
    env = env or distributed.DistEnv(device=pipe.gpt.device)
    folder = Path(folder)
    mode = normalize_mode(mode)
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
    if resize is not None and resize < 8:
        raise ValueError(f"resize must be an image size in pixels, got {resize}")
    opts = pipe.options_for(mode, **options)
    manifest = {"mode": mode, "num_images": num_images, "num_classes": pipe.num_classes,
                "global_seed": global_seed, "image_size": resize or pipe.image_size,
                "options": asdict(opts),
                "labels": "index % num_classes", **(settings or {})}
    manifest_path = folder / "sample_fid.json"
    saved = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    # every rank checks before anyone writes, so all of them stop together on a mismatch
    if saved is not None and saved != manifest:
        diff = {k: (saved.get(k), v) for k, v in manifest.items() if saved.get(k) != v}
        raise ValueError(f"{folder} holds samples drawn with other settings (saved, now): {diff}; "
                         "use another folder")
    todo = missing_indices(folder, num_images)
    distributed.barrier(env)  # all ranks listed the same folder before any image is written
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=1))
        for stale in folder.glob("*.png.tmp"):  # from a killed run
            stale.unlink()
    distributed.barrier(env)
    mine = todo[env.rank :: env.world_size]
    labels, seeds = plan(num_images, pipe.num_classes, global_seed)
    if env.is_main and num_images > len(todo):
        print(f"resuming: {num_images - len(todo)} of {num_images} images exist, {len(todo)} to draw "
              f"on {env.world_size} rank(s)")
    bar = tqdm(total=len(todo), desc=f"sample-fid {mode}", unit="img", disable=not (progress and env.is_main))
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        images = pipe.sample_images([labels[i] for i in chunk], mode, [seeds[i] for i in chunk],
                                    batch_size=len(chunk), **options)
        if resize is not None and resize != images.shape[-1]:
            images = F.interpolate(images, size=(resize, resize), mode="bicubic", align_corners=False)
        for i, image in zip(chunk, to_pil(images.clamp(-1, 1)), strict=True):
            _write_png(image, folder / f"{i:06d}.png")
        # rank 0's view: the ranks advance at about the same pace
        bar.update(min(len(chunk) * env.world_size, bar.total - bar.n))
    bar.close()
    distributed.barrier(env)
    left = missing_indices(folder, num_images)
    if left:  # every rank sees the same folder, so all raise together
        raise RuntimeError(f"{len(left)} images missing after sampling (first: {left[:5]})")
    out = None
    if env.is_main and pack:
        out = pack_npz(folder, num_images, Path(npz) if npz else folder.parent / (folder.name + ".npz"), progress)
    distributed.barrier(env)
    return out
