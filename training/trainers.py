"""Training: the VQ tokenizer, the base AR model, CCA (or DPO / unlearning) fine-tuning.

Each trainer is a plain loop with a tqdm bar, AdamW, linear warm-up then cosine decay, fixed seeds,
and writes a safetensors directory that ``samplers.load_gpt`` / ``load_vq`` read back. The same
code fine-tunes real LlamaGen checkpoints: ``CodeData`` reads LlamaGen's extracted-code folders
(``*_codes/{i}.npy`` [1, n_aug, T] and ``*_labels/{i}.npy`` [1]) as well as our packed ``.npz``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from samplers.checkpoint import save_pretrained
from samplers.family import family_for
from samplers.gpt import GPT, build_gpt
from samplers.pipeline import Pipeline
from samplers.var import VAR, build_var
from samplers.var_vae import VARVAE, build_var_vae
from samplers.vq import VQModel, build_vq

from . import distributed, shapes
from .losses import (
    contrastive_pairs,
    next_token_loss,
    preference_loss,
    reward_stats,
    sequence_logprob,
    teacher_inputs,
)


# ---- data ----------------------------------------------------------------------------------
class CodeData:
    """Pre-extracted image codes [N, T] (int64) and labels [N].

    ``augmentations`` [N, A, T], when given, holds A stored augmentations of each image (LlamaGen's
    ``--ten-crop`` / flip extractions); ``batches`` then draws one of them per item at random, as
    LlamaGen's dataset does, and ``codes`` is augmentation 0 (for uses that need one fixed view).
    """

    def __init__(self, codes: np.ndarray, labels: np.ndarray, augmentations: np.ndarray | None = None):
        if codes.ndim != 2 or labels.ndim != 1 or len(codes) != len(labels):
            raise ValueError(f"expected codes [N, T] and labels [N], got {codes.shape} and {labels.shape}")
        self.codes = torch.from_numpy(np.ascontiguousarray(codes).astype(np.int64))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
        self.augmentations = None
        if augmentations is not None:
            shape = augmentations.shape
            if augmentations.ndim != 3 or shape[0] != len(codes) or shape[2] != codes.shape[1]:
                raise ValueError(f"expected augmentations [N, A, T], got {augmentations.shape}")
            small = np.int16 if augmentations.max() < 32768 else np.int32  # ten crops of ImageNet: keep it compact
            self.augmentations = torch.from_numpy(np.ascontiguousarray(augmentations).astype(small))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def seq_len(self) -> int:
        return self.codes.shape[1]

    @classmethod
    def load(cls, path: str | Path) -> CodeData:
        """A ``.npz`` with ``codes`` and ``labels``, or a LlamaGen code folder (the one holding
        ``<name>_codes/`` and ``<name>_labels/``, or a ``*_codes`` folder itself). Files with several
        augmentations per image ([1, A, T], e.g. the authors' ``..._flip_ten_crop`` extraction, where
        index 0 is TenCrop's top-left crop, not a centre crop) keep all of them: training draws one
        at random per item and epoch, as LlamaGen's dataset does."""
        path = Path(path)
        if path.suffix == ".npz":
            with np.load(path) as data:
                return cls(data["codes"], data["labels"], data["augmentations"] if "augmentations" in data else None)
        if not path.is_dir():
            raise FileNotFoundError(f"no code file or folder at {path}")
        code_dir = path if path.name.endswith("_codes") else next(iter(sorted(path.glob("*_codes"))), None)
        if code_dir is None:
            raise FileNotFoundError(f"{path} has no *_codes folder (LlamaGen extract_codes_c2i layout)")
        label_dir = code_dir.with_name(code_dir.name[: -len("_codes")] + "_labels")
        if not label_dir.is_dir():
            raise FileNotFoundError(f"found {code_dir} but not its labels folder {label_dir}")
        ids = sorted(int(p.stem) for p in code_dir.glob("*.npy"))
        if not ids:
            raise FileNotFoundError(f"{code_dir} holds no .npy files")
        # [1, n_aug, T] or [1, T] per file
        views = [np.load(code_dir / f"{i}.npy") for i in ids]
        views = [v.reshape(-1, v.shape[-1]) for v in views]
        counts = {len(v) for v in views}
        if len(counts) != 1:
            raise ValueError(f"{code_dir}: files hold different numbers of augmentations {sorted(counts)}")
        labels = np.asarray([int(np.load(label_dir / f"{i}.npy").reshape(-1)[0]) for i in ids])
        stacked = np.stack(views)  # [N, A, T]
        return cls(stacked[:, 0], labels, stacked if stacked.shape[1] > 1 else None)

    @classmethod
    def concat(cls, parts: Sequence[CodeData]) -> CodeData:
        """Several code sets as one, in order (e.g. images of several data seeds)."""
        if any(p.augmentations is not None for p in parts):
            raise ValueError("concat keeps one view per image: these code sets hold stored augmentations")
        return cls(np.concatenate([p.codes.numpy() for p in parts]), np.concatenate([p.labels.numpy() for p in parts]))

    def save(self, path: str | Path) -> None:
        small = np.int16 if self.codes.max() < 32768 else np.int32
        extra = {} if self.augmentations is None else {"augmentations": self.augmentations.numpy().astype(small)}
        np.savez_compressed(path, codes=self.codes.numpy().astype(small), labels=self.labels.numpy().astype(np.int16),
                            **extra)

    def save_llamagen(self, folder: str | Path, name: str = "shapes") -> None:
        """Write LlamaGen's layout: ``<name>_codes/{i}.npy`` [1, 1, T] and ``<name>_labels/{i}.npy`` [1]."""
        folder = Path(folder)
        (folder / f"{name}_codes").mkdir(parents=True, exist_ok=True)
        (folder / f"{name}_labels").mkdir(parents=True, exist_ok=True)
        for i in range(len(self)):
            np.save(folder / f"{name}_codes" / f"{i}.npy", self.codes[i].numpy().reshape(1, 1, -1))
            np.save(folder / f"{name}_labels" / f"{i}.npy", self.labels[i : i + 1].numpy())

    def batches(self, batch_size: int, seed: int,
                epochs: float | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches, reshuffled every epoch; endless unless ``epochs`` is given."""
        gen = torch.Generator().manual_seed(seed)
        total = None if epochs is None else int(epochs * len(self) // batch_size)
        done = 0
        while total is None or done < total:
            order = torch.randperm(len(self), generator=gen)
            for start in range(0, len(self) - batch_size + 1, batch_size):
                if total is not None and done >= total:
                    return
                idx = order[start : start + batch_size]
                if self.augmentations is None:
                    yield self.codes[idx], self.labels[idx]
                else:  # one stored augmentation per item, drawn anew each time it is seen
                    pick = torch.randint(self.augmentations.shape[1], (len(idx),), generator=gen)
                    yield self.augmentations[idx, pick].long(), self.labels[idx]
                done += 1


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG")


def image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """An ImageNet-layout folder (one sub-folder per class, sorted names = label order): files,
    labels, class folder names."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (ImageNet layout: ROOT/CLASS/IMAGE)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix in IMAGE_SUFFIXES or f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise FileNotFoundError(f"{root}: no images in its class folders")
    return files, labels, classes


def _load_square(path: Path, size: int) -> torch.Tensor:
    """Shorter side resized to ``size`` (bicubic), centre crop: [3, size, size] in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 127.5 - 1


@torch.inference_mode()
def _encode_views(vae: torch.nn.Module, files: Sequence[Path], flip: bool, batch_size: int) -> np.ndarray:
    """[n, A, L]: every scale's ids of each image (and of its mirror, with ``flip``)."""
    family = family_for(vae)
    size = vae.config.image_size
    device = next(vae.parameters()).device
    views: list[torch.Tensor] = []
    for start in range(0, len(files), batch_size):
        batch = torch.stack([_load_square(f, size) for f in files[start : start + batch_size]]).to(device)
        variants = [batch, batch.flip(-1)] if flip else [batch]
        views.append(torch.stack([family.images_to_codes(v).cpu() for v in variants], dim=1))
    return torch.cat(views).numpy()


def extract_var_codes(vae: torch.nn.Module, images: str | Path, flip: bool = True, batch_size: int = 16,
                      progress: bool = True, parts: str | Path | None = None, chunk_size: int = 1024,
                      env: distributed.DistEnv | None = None) -> CodeData | None:
    """Multi-scale codes of an image folder with VAR's VQVAE: [N, L] (all scales, coarse to fine),
    and with ``flip`` the mirrored image as a second stored augmentation that training draws from.

    With ``parts`` (a folder), the images are encoded in chunks of ``chunk_size``, each saved there
    as it finishes: a stopped run resumes from the chunks on disk, and under torchrun rank r takes
    chunks r, r + W, ... The result does not depend on the number of ranks or on stops. Returns the
    codes on rank 0, None on the other ranks."""
    files, labels, _ = image_folder(images)
    env = env or distributed.DistEnv()
    if env.world_size > 1 and parts is None:
        raise ValueError("under torchrun the ranks exchange their chunks through a folder: pass parts")
    vae.eval()
    chunks = range(0, len(files), chunk_size)
    folder = Path(parts) if parts is not None else None
    if folder is not None:
        fingerprint = float(sum(p.detach().double().sum() for p in vae.parameters()))  # which weights, cheaply
        meta = {"images": str(Path(images).resolve()), "count": len(files), "chunk_size": chunk_size, "flip": flip,
                "vae": vae.config.to_dict(), "vae_weights_sum": round(fingerprint, 6)}
        folder.mkdir(parents=True, exist_ok=True)
        meta_file = folder / "meta.json"
        if env.is_main and not meta_file.exists():
            meta_file.write_text(json.dumps(meta, indent=1))
        distributed.barrier(env)
        if json.loads(meta_file.read_text()) != meta:
            raise ValueError(f"{folder} holds chunks of another extraction ({meta_file}); remove it or pass "
                             "another output")
    def chunk_path(start: int) -> Path | None:
        return folder / f"chunk_{start // chunk_size:06d}.npy" if folder is not None else None

    mine = [c for i, c in enumerate(chunks) if i % env.world_size == env.rank]
    encoded: dict[int, np.ndarray] = {}
    for start in tqdm(mine, desc="extract codes", unit="chunk", disable=not progress or not env.is_main):
        path = chunk_path(start)
        if path is not None and path.exists():
            continue  # done before a stop
        codes = _encode_views(vae, files[start : start + chunk_size], flip, batch_size)
        if path is None:
            encoded[start] = codes
        else:
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, codes)
            os.replace(tmp, path)  # a kill mid-write leaves no half chunk behind
    distributed.barrier(env)
    if not env.is_main:
        return None
    if folder is not None:
        encoded = {c: np.load(chunk_path(c)) for c in chunks}
    stacked = np.concatenate([encoded[c] for c in chunks])
    return CodeData(stacked[:, 0], np.asarray(labels), stacked if flip else None)


# ---- shared loop pieces ---------------------------------------------------------------------
@dataclass
class Schedule:
    steps: int
    lr: float
    warmup: int = 0
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def _run(name: str, steps: int, schedule: Schedule, opt: torch.optim.Optimizer, model: torch.nn.Module,
         step_fn: Callable[[int], dict[str, float]], log_every: int = 10, progress: bool = True,
         start_step: int = 0, after_step: Callable[[int, dict[str, float]], None] | None = None
         ) -> list[dict[str, float]]:
    """The loop every trainer shares: lr schedule, step, grad clip, a bar with smoothed metrics.
    ``after_step(step, metrics)`` runs once the optimizer has stepped (logs, checkpoints)."""
    history: list[dict[str, float]] = []
    smooth: dict[str, float] = {}
    bar = tqdm(range(start_step, steps), desc=name, disable=not progress, dynamic_ncols=True, initial=start_step,
               total=steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        metrics = step_fn(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k, v in metrics.items():
            smooth[k] = v if k not in smooth or math.isnan(smooth[k]) else 0.9 * smooth[k] + 0.1 * v
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "lr": schedule(step), **metrics})
            bar.set_postfix({k: f"{v:.4g}" for k, v in smooth.items()})
        if after_step is not None:
            after_step(step, metrics)
    return history


def _write_log(out_dir: Path, name: str, args: dict[str, Any], history: list[dict[str, float]], seconds: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_log.json").write_text(json.dumps(
        {"trainer": name, "args": args, "seconds": round(seconds, 1), "history": history}, indent=1))


# ---- VQ tokenizer -------------------------------------------------------------------------
DEFAULT_VQ_CONFIG = {"codebook_size": 512, "codebook_embed_dim": 8, "ch": 16, "encoder_ch_mult": [1, 2, 2],
                     "decoder_ch_mult": [1, 2, 2], "z_channels": 32, "num_res_blocks": 1, "norm_groups": 8}


@dataclass
class VQTrainArgs:
    steps: int = 5000
    batch_size: int = 16  # small batches, many steps: measured to converge faster per CPU-second
    lr: float = 2e-3
    seed: int = 0
    data_seed: int = 0
    pool_size: int = 16000  # rendered once, then sampled: rendering costs ~1.5 ms per image
    commit_beta: float = 0.25
    restart_every: int = 100


def _restart_dead_codes(book: torch.Tensor, usage: torch.Tensor, feats: torch.Tensor, rng: torch.Generator,
                        noise: float) -> None:
    """Codebook entries unused for a while restart on features of this batch (plus a little noise):
    keeps the codebook in use."""
    dead = (usage < 1e-3).nonzero().squeeze(1)
    if not dead.numel():
        return
    pick = torch.randint(0, feats.shape[0], (dead.numel(),), generator=rng)
    fresh = feats[pick]
    if noise:
        fresh = fresh + noise * torch.randn(dead.numel(), feats.shape[1], generator=rng)
    with torch.no_grad():
        book[dead] = fresh
    usage[dead] = 1.0


def _quantize_train(vq: VQModel, z: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straight-through quantisation of latents z [B, D, h, w] with codebook and commitment losses."""
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    if vq.quantize.l2_norm:
        flat = F.normalize(flat, dim=-1)
    codes = vq.quantize.nearest(flat)
    zq = vq.quantize.codebook()[codes]
    loss = F.mse_loss(zq, flat.detach()) + beta * F.mse_loss(flat, zq.detach())
    zq = flat + (zq - flat).detach()
    return zq.view(b, h, w, d).permute(0, 3, 1, 2), loss, codes


def train_vq(out_dir: str | Path, config: dict[str, Any] | None = None, args: VQTrainArgs | None = None,
             progress: bool = True) -> VQModel:
    """Train the tokenizer on freshly rendered Shapes-1k images (no image is seen twice)."""
    args = args or VQTrainArgs()
    torch.manual_seed(args.seed)
    vq = build_vq({**DEFAULT_VQ_CONFIG, **(config or {})}).train()
    opt = _optimizer(vq, args.lr, 0.0)
    schedule = Schedule(args.steps, args.lr, warmup=50)
    usage = torch.zeros(vq.config.codebook_size)
    rng = torch.Generator().manual_seed(args.seed)
    pool, _ = shapes.make_batch(args.data_seed, range(args.pool_size))

    def step_fn(step: int) -> dict[str, float]:
        images = pool[torch.randint(0, len(pool), (args.batch_size,), generator=rng)]
        z = vq.encode_latents(images)
        zq, vq_loss, codes = _quantize_train(vq, z, args.commit_beta)
        recon = vq.decode_latents(zq)
        rec_loss = F.mse_loss(recon, images) + 0.2 * F.l1_loss(recon, images)
        (rec_loss + vq_loss).backward()
        usage.mul_(0.99).add_(torch.bincount(codes, minlength=usage.numel()).float())
        if args.restart_every and step % args.restart_every == args.restart_every - 1 and step < args.steps * 0.8:
            lat = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
            _restart_dead_codes(vq.quantize.embedding.weight, usage, lat, rng, noise=0.01)
        psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon.detach().clamp(-1, 1), images).item(), 1e-10))
        return {"rec": rec_loss.item(), "vq": vq_loss.item(), "psnr": psnr, "used": float((usage > 1e-3).sum())}

    start = time.time()
    history = _run("train vq", args.steps, schedule, opt, vq, step_fn, progress=progress)
    vq.eval()
    quality = vq_reconstruction_quality(vq, data_seed=args.data_seed + 1000)
    out = Path(out_dir)
    save_pretrained(vq, out, extra={"train": asdict(args), "reconstruction": quality})
    _write_log(out, "vq", asdict(args), history, time.time() - start)
    return vq


@torch.no_grad()
def vq_reconstruction_quality(vq: VQModel, n: int = 1000, data_seed: int = 1000) -> dict[str, float]:
    """PSNR (dB, images in [0, 1]) and codebook usage on held-out images."""
    mse, used = [], set()
    for start in range(0, n, 100):
        images, _ = shapes.make_batch(data_seed, range(start, min(n, start + 100)))
        codes = vq.encode_to_codes(images)
        used.update(codes.unique().tolist())
        recon = vq.decode_code(codes)
        mse.append(((recon - images) / 2).pow(2).mean(dim=(1, 2, 3)))
    mse_t = torch.cat(mse)
    return {"psnr_db": round(float((10 * torch.log10(1.0 / mse_t)).mean()), 2), "mse": round(float(mse_t.mean()), 5),
            "codebook_used": len(used), "codebook_size": vq.config.codebook_size, "images": n}


def _render_batch(job: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    data_seed, start, stop = job
    return shapes.make_batch(data_seed, range(start, stop))


@torch.no_grad()
def extract_codes(tokenizer: VQModel | VARVAE, num_images: int, data_seed: int = 0, batch_size: int = 250,
                  progress: bool = True, workers: int = 1) -> CodeData:
    """Tokenize the first ``num_images`` Shapes-1k images of ``data_seed``: LlamaGen's VQ codes, or
    VAR's multi-scale codes (every scale's ids concatenated, coarse to fine). ``workers`` > 1
    renders the images in that many processes (the slow part when a GPU encodes); each image
    depends only on (data_seed, index), so the codes are the same."""
    family = family_for(tokenizer.eval())
    device = next(tokenizer.parameters()).device
    jobs = [(data_seed, start, min(num_images, start + batch_size)) for start in range(0, num_images, batch_size)]
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=torch.set_num_threads,
                                                     initargs=(1,)) if workers > 1 else None
    batches = pool.imap(_render_batch, jobs) if pool is not None else map(_render_batch, jobs)
    codes, labels = [], []
    try:
        for images, lab in tqdm(batches, total=len(jobs), desc="extract codes", disable=not progress):
            codes.append(family.images_to_codes(images.to(device)).cpu())
            labels.append(lab)
    finally:
        if pool is not None:
            pool.close()
    return CodeData(torch.cat(codes).numpy(), torch.cat(labels).numpy())


SELF_SAMPLE_SEED = 70_000_000  # image seeds of the model's own samples: apart from the evaluation's splits


def sample_codes(pipeline: Pipeline, num_images: int, seed_base: int = SELF_SAMPLE_SEED, mode: str = "free",
                 batch_size: int = 500, progress: bool = True) -> CodeData:
    """A model's own samples as training codes: image i has class i mod num_classes (as Shapes-1k
    labels its images) and seed ``seed_base + i``, sampled in ``mode`` by ``pipeline`` with its
    default options.

    CCA tuned on these instead of real images targets the base model's own class contrast, the one
    CFG amplifies: the NCE optimum of the loss is then log p_ref(c|x)/p(c) under the base model
    (docs/eval/README.md, "CCA on the base model's own samples")."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    options = pipeline.options_for(mode)
    codes, labels = [], []
    for start in tqdm(range(0, num_images, batch_size), desc=f"sample codes ({mode})", disable=not progress):
        index = range(start, min(num_images, start + batch_size))
        classes = [i % pipeline.num_classes for i in index]
        with torch.inference_mode():
            jobs = pipeline.decode_batch(mode, classes, [seed_base + i for i in index], options)
        codes.append(np.stack([np.asarray(job.tokens, dtype=np.int64) for job in jobs]))
        labels.extend(classes)
    return CodeData(np.concatenate(codes), np.asarray(labels, dtype=np.int64))


# ---- how a GPT run is executed: one process or many (torchrun), accumulation, checkpoints ------
@dataclass
class RunSetup:
    """How a GPT training run is executed, not what it learns. The global batch (``batch_size``)
    is cut into ``world_size x grad_accum`` micro-batches, in order, rank r taking the r-th group of
    ``grad_accum``; so 2 ranks x 1 and 1 rank x 2 see the same micro-batches and compute the same
    step (up to float summation order)."""

    grad_accum: int = 1
    strategy: str = "ddp"  # or "fsdp" (FSDP2: every transformer block sharded) for models that do not fit
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; or "fp32" / "bf16"
    ckpt_every: int = 0  # steps between resumable checkpoints (train_state.pt in the output folder); 0: none
    resume: bool = False  # continue from train_state.pt when it exists
    # steps between weight snapshots (OUT/snapshots/step_NNNNN/, loadable like the final model), so
    # that a checkpoint along the run can be chosen on validation seeds; 0: only the final weights
    snapshot_every: int = 0
    device: str | None = None  # None: CUDA (one GPU per rank) when available, else CPU


def _autocast(env: distributed.DistEnv, precision: str) -> contextlib.AbstractContextManager:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and env.device.type == "cuda")
    return torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


Micro = tuple[torch.Tensor, ...]


def _fit(name: str, policy: GPT, data: CodeData, *, batch_size: int, seed: int, steps: int, lr: float,
         weight_decay: float, schedule: Schedule, setup: RunSetup, args: dict[str, Any], out_dir: Path | None,
         accumulate: str = "mean",
         generators: list[torch.Generator], split: Callable[[torch.Tensor, torch.Tensor, int], list[Micro]],
         loss_fn: Callable[[torch.nn.Module, Micro], tuple[torch.Tensor, dict[str, float]]],
         progress: bool, prepare: Callable[[distributed.DistEnv], None] | None = None) -> GPT | None:
    """The training run shared by ``train_gpt`` and ``train_cca``, on one process or under torchrun.

    ``split(codes, labels, k)`` cuts a global batch into k micro-batches, making every random draw
    (class dropout, unconditional rows) for all of them in order, on every rank, so the random
    stream does not depend on the world size. ``loss_fn(model, micro)`` gives (loss, metrics).
    Returns the trained model (fp32, unwrapped) on rank 0 and None on the other ranks.
    """
    env = distributed.init(setup.device)
    if setup.grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {setup.grad_accum}")
    parts = env.world_size * setup.grad_accum
    if batch_size % parts:
        raise ValueError(f"batch size {batch_size} does not split into {env.world_size} ranks x "
                         f"{setup.grad_accum} micro-batches")
    if prepare is not None:
        prepare(env)
    model = distributed.wrap(policy, env, setup.strategy)
    opt = _optimizer(model, lr, weight_decay)
    state_path = out_dir / "train_state.pt" if out_dir is not None else None
    start_step = 0
    if setup.resume and state_path is not None and state_path.exists():
        state = distributed.load_train_state(state_path, model, opt)
        if state["args"] != args:
            diff = {k: (state["args"].get(k), v) for k, v in args.items() if state["args"].get(k) != v}
            raise ValueError(f"{state_path} was written with other settings (saved, now): {diff}")
        start_step = int(state["step"])
        for gen, gen_state in zip(generators, state["rng"], strict=True):
            gen.set_state(gen_state)
        if env.is_main:
            print(f"resuming {name} at step {start_step} of {steps} from {state_path}")
    batches = data.batches(batch_size, seed)
    for _ in range(start_step):  # the data order is a function of the seed: skip what was seen
        next(batches)
    mine = slice(env.rank * setup.grad_accum, (env.rank + 1) * setup.grad_accum)

    def step_fn(step: int) -> dict[str, float]:
        codes, labels = next(batches)
        micro = split(codes, labels, parts)[mine]
        logged: list[dict[str, float]] = []
        for i, mb in enumerate(micro):
            with distributed.grad_sync(model, enabled=i == len(micro) - 1), _autocast(env, setup.precision):
                loss, metrics = loss_fn(model, tuple(t.to(env.device) for t in mb))
                (loss if accumulate == "sum" else loss / setup.grad_accum).backward()
            logged.append({"loss": loss.item(), **metrics})
        local = {k: _nanmean([m[k] for m in logged]) for k in logged[0]}
        return distributed.mean_metrics(env, local)

    log_lines = out_dir / "train_log.jsonl" if out_dir is not None and env.is_main else None
    if log_lines is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [line for line in log_lines.read_text().splitlines() if json.loads(line)["step"] < start_step] \
            if log_lines.exists() else []  # a resumed run redoes the steps after its checkpoint
        log_lines.write_text("".join(line + "\n" for line in kept))

    def after_step(step: int, metrics: dict[str, float]) -> None:
        done = step + 1
        if log_lines is not None and (step % 10 == 0 or done == steps):  # readable while a long run goes on
            with log_lines.open("a") as f:
                f.write(json.dumps({"step": step, "lr": schedule(step), **metrics}) + "\n")
        if state_path is not None and setup.ckpt_every and done % setup.ckpt_every == 0 and done < steps:
            distributed.save_train_state(state_path, env, model, opt, {
                "step": done, "args": args, "rng": [g.get_state() for g in generators]})
        if out_dir is not None and setup.snapshot_every and done % setup.snapshot_every == 0 and done < steps:
            snapshot = _unwrapped(model, env, policy)  # collective under FSDP: every rank takes part
            if snapshot is not None:
                save_pretrained(snapshot, out_dir / "snapshots" / f"step_{done:05d}",
                                extra={"train": args, "step": done})

    start = time.time()
    history = _run(name, steps, schedule, opt, model, step_fn, progress=progress and env.is_main,
                   start_step=start_step, after_step=after_step)
    trained = _unwrapped(model, env, policy)
    if env.is_main:
        if out_dir is not None:
            save_pretrained(trained, out_dir, extra={"train": args})
            _write_log(out_dir, name.removeprefix("train "), {**args, "world_size": env.world_size, **asdict(setup)},
                       history, time.time() - start)
            if state_path is not None and state_path.exists():
                state_path.unlink()  # finished: the model is in model.safetensors
    distributed.barrier(env)
    return trained


def _unwrapped(model: torch.nn.Module, env: distributed.DistEnv, policy: GPT) -> GPT | None:
    """A plain fp32 copy of the (possibly wrapped or sharded) model in eval mode, on rank 0; None
    elsewhere."""
    full = distributed.full_model_state(model)
    if not env.is_main:
        return None
    copy_ = build_var(policy.config, policy.vae) if isinstance(policy, VAR) else build_gpt(policy.config)
    copy_.load_state_dict(full)
    return copy_.eval().requires_grad_(False)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


# ---- base AR model ------------------------------------------------------------------------
DEFAULT_GPT_CONFIG = {"dim": 192, "n_layer": 6, "n_head": 6, "vocab_size": 512, "num_classes": 1000,
                      "block_size": 64, "multiple_of": 64, "class_dropout_prob": 0.1,
                      # a small model on endless procedural data underfits: dropout would only slow it
                      "token_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0}


@dataclass
class GPTTrainArgs:
    steps: int = 3500
    batch_size: int = 32  # global: over all ranks and accumulation steps
    lr: float = 2e-3
    weight_decay: float = 0.05
    class_dropout: float = 0.1
    seed: int = 0


def train_gpt(out_dir: str | Path | None, data: CodeData, config: dict[str, Any] | None = None,
              args: GPTTrainArgs | None = None, progress: bool = True, setup: RunSetup | None = None,
              init: GPT | None = None) -> GPT | None:
    """Next-token training with class dropout: a share ``class_dropout`` of rows gets the null
    class, which is what makes classifier-free guidance possible later. Runs under torchrun
    (see ``RunSetup``); returns the model on rank 0, None elsewhere.

    ``init``: continue from these weights (an fp32 copy; ``config`` is then ignored) instead of a
    fresh model, e.g. a second stage on fresh images with a new warm-up and cosine."""
    args = args or GPTTrainArgs()
    torch.manual_seed(args.seed)
    if init is not None:
        gpt = copy.deepcopy(init).float().requires_grad_(True)
    else:
        gpt = build_gpt({**DEFAULT_GPT_CONFIG, **(config or {})})
        gpt.init_weights()
    if gpt.config.block_size != data.seq_len:
        raise ValueError(f"model block_size {gpt.config.block_size} != code length {data.seq_len}")
    gpt.train()
    null = gpt.config.null_class
    gen = torch.Generator().manual_seed(args.seed + 1)

    def split(codes: torch.Tensor, labels: torch.Tensor, parts: int) -> list[Micro]:
        drop = torch.rand(labels.shape, generator=gen) < args.class_dropout
        cond = torch.where(drop, torch.full_like(labels, null), labels)
        return list(zip(codes.chunk(parts), cond.chunk(parts), strict=True))

    def loss_fn(model: torch.nn.Module, micro: Micro) -> tuple[torch.Tensor, dict[str, float]]:
        codes, cond = micro
        return next_token_loss(model, cond, codes), {}

    return _fit("train gpt", gpt, data, batch_size=args.batch_size, seed=args.seed, steps=args.steps, lr=args.lr,
                weight_decay=args.weight_decay, schedule=Schedule(args.steps, args.lr, warmup=max(1, args.steps // 20)),
                setup=setup or RunSetup(), args=asdict(args), out_dir=None if out_dir is None else Path(out_dir),
                generators=[gen], split=split, loss_fn=loss_fn, progress=progress)


# ---- VAR: its multi-scale VQVAE and the next-scale transformer, trained here on Shapes-1k ----
# 32 px images, 8x downsampling, 4x4 last scale would lose shape; 4x: an 8x8 last scale, 6 scales
DEFAULT_VAR_VAE_CONFIG = {"vocab_size": 512, "z_channels": 16, "ch": 32, "ch_mult": [1, 2, 2],
                          "num_res_blocks": 1, "patch_nums": [1, 2, 3, 4, 6, 8]}
DEFAULT_VAR_CONFIG = {"depth": 6, "embed_dim": 192, "num_heads": 6, "num_classes": 1000, "cond_drop_rate": 0.1}


@dataclass
class VARVAETrainArgs:
    steps: int = 4000
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    data_seed: int = 0
    pool_size: int = 16000
    commit_beta: float = 0.25
    restart_every: int = 100


def train_var_vae(out_dir: str | Path | None, config: dict[str, Any] | None = None,
                  args: VARVAETrainArgs | None = None, progress: bool = True) -> VARVAE:
    """VAR's multi-scale VQVAE on freshly rendered Shapes-1k images: reconstruction (L2 + 0.2 L1)
    plus the quantiser's loss over every scale (``Quantizer.train_forward``); codebook entries unused
    for a while restart on residual features of the batch."""
    args = args or VARVAETrainArgs()
    torch.manual_seed(args.seed)
    vae = build_var_vae({**DEFAULT_VAR_VAE_CONFIG, **(config or {})}).train()
    if vae.config.image_size != shapes.IMAGE_SIZE:
        raise ValueError(f"the VAE's images are {vae.config.image_size} px; Shapes-1k renders {shapes.IMAGE_SIZE}")
    opt = _optimizer(vae, args.lr, 0.0)
    usage = torch.zeros(vae.config.vocab_size)
    rng = torch.Generator().manual_seed(args.seed)
    pool, _ = shapes.make_batch(args.data_seed, range(args.pool_size))

    def step_fn(step: int) -> dict[str, float]:
        images = pool[torch.randint(0, len(pool), (args.batch_size,), generator=rng)]
        f = vae.quant_conv(vae.encoder(images))
        f_hat, vq_loss, ids = vae.quantize.train_forward(f, args.commit_beta)
        recon = vae.decoder(vae.post_quant_conv(f_hat))
        rec_loss = F.mse_loss(recon, images) + 0.2 * F.l1_loss(recon, images)
        (rec_loss + vq_loss).backward()
        usage.mul_(0.99).add_(torch.bincount(ids.flatten(), minlength=usage.numel()).float())
        if args.restart_every and step % args.restart_every == args.restart_every - 1 and step < args.steps * 0.8:
            feats = f.detach().permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            _restart_dead_codes(vae.quantize.embedding.weight, usage, feats, rng, noise=0.0)
        psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon.detach().clamp(-1, 1), images).item(), 1e-10))
        return {"rec": rec_loss.item(), "vq": vq_loss.item(), "psnr": psnr, "used": float((usage > 1e-3).sum())}

    start = time.time()
    history = _run("train var-vae", args.steps, Schedule(args.steps, args.lr, warmup=50), opt, vae, step_fn,
                   progress=progress)
    vae.eval()
    if out_dir is not None:
        out = Path(out_dir)
        save_pretrained(vae, out, extra={"train": asdict(args)})
        _write_log(out, "var_vae", asdict(args), history, time.time() - start)
    return vae


@dataclass
class VARTrainArgs:
    steps: int = 3500
    batch_size: int = 32  # global: over all ranks and accumulation steps
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0


def train_var(out_dir: str | Path | None, vae: VARVAE, data: CodeData, config: dict[str, Any] | None = None,
              args: VARTrainArgs | None = None, progress: bool = True, setup: RunSetup | None = None) -> VAR | None:
    """Next-scale training (VAR's objective): cross-entropy over every scale's tokens, teacher-forced
    with the VQVAE's next-scale inputs; labels become the null class with ``cond_drop_rate`` (in the
    model's forward while training), which is what makes guidance possible later. Runs under
    torchrun (see ``RunSetup``); returns the model on rank 0, None elsewhere."""
    args = args or VARTrainArgs()
    torch.manual_seed(args.seed)
    config = {**DEFAULT_VAR_CONFIG, "vocab_size": vae.config.vocab_size, "z_channels": vae.config.z_channels,
              "patch_nums": vae.patch_nums, **(config or {})}
    var = build_var(config, vae)
    if var.config.block_size != data.seq_len:
        raise ValueError(f"the VAR takes {var.config.block_size} tokens per image, the codes have {data.seq_len}")
    with torch.no_grad():  # small random weights; a zero head (as LlamaGen's init) starts at uniform logits
        for name, p in var.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif "scale_mul" not in name:
                p.zero_()
        var.head.weight.zero_()
    var.train()
    vae.eval().requires_grad_(False)

    def split(codes: torch.Tensor, labels: torch.Tensor, parts: int) -> list[Micro]:
        return list(zip(codes.chunk(parts), labels.chunk(parts), strict=True))

    def loss_fn(model: torch.nn.Module, micro: Micro) -> tuple[torch.Tensor, dict[str, float]]:
        codes, labels = micro
        logits = model(labels, teacher_inputs(var, codes))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1)), {}

    def prepare(env: distributed.DistEnv) -> None:
        vae.to(env.device)

    return _fit("train var", var, data, batch_size=args.batch_size, seed=args.seed, steps=args.steps, lr=args.lr,
                weight_decay=args.weight_decay, schedule=Schedule(args.steps, args.lr, warmup=max(1, args.steps // 20)),
                setup=setup or RunSetup(), args=asdict(args), out_dir=None if out_dir is None else Path(out_dir),
                generators=[], split=split, loss_fn=loss_fn, progress=progress, prepare=prepare)


# ---- CCA / DPO / unlearning fine-tuning --------------------------------------------------
@dataclass
class CCATrainArgs:
    """Defaults: the paper's settings for LlamaGen GPT-B (Table 4); ``training.recipes`` has every row."""

    loss: str = "cca"
    lam: float = 1000.0
    beta: float = 0.02
    uncond_ratio: float = 0.1
    lr: float = 1e-5
    epochs: float = 1.0
    batch_size: int = 256  # global: over all ranks and accumulation steps
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None
    dropout: bool = True  # the paper keeps the model's dropout on for LlamaGen ("keep_dropout")
    lr_schedule: str = "cosine"  # or "constant", as the authors' code
    accumulate: str = "mean"  # micro-batch losses averaged; "sum" as the authors' code
    # None: labels rolled as drawn (the paper). A Shapes-1k attribute ("shape", "colour" or
    # "texture"): negatives drawn within the micro-batch from classes sharing it where possible
    negatives_within: str | None = None


def negative_groups(attribute: str | None, num_classes: int) -> torch.Tensor | None:
    """The group of every class that ``contrastive_pairs`` draws negatives within: one of the
    Shapes-1k class attributes (``shapes.ATTRIBUTES``), or None for plain rolled labels."""
    if attribute is None:
        return None
    if attribute not in shapes.ATTRIBUTES:
        raise ValueError(f"negatives_within must be one of {shapes.ATTRIBUTES} or None, got {attribute!r}")
    if num_classes != shapes.NUM_CLASSES:
        raise ValueError(f"negatives_within needs the {shapes.NUM_CLASSES} Shapes-1k classes, the model has "
                         f"{num_classes}")
    index = shapes.ATTRIBUTES.index(attribute)
    return torch.tensor([shapes.class_attributes(c)[index] for c in range(num_classes)])


def train_cca(out_dir: str | Path | None, ref: GPT | VAR, data: CodeData, args: CCATrainArgs | None = None,
              progress: bool = True, setup: RunSetup | None = None) -> GPT | VAR | None:
    """Fine-tune a copy of ``ref`` (a LlamaGen GPT or a VAR) with a preference loss; ``ref`` stays
    frozen as the reference.

    Per micro-batch: positives (x, c), negatives (x, roll(c)) rolled within the micro-batch (as the
    public code does per rank), and a share of rows made unconditional on both sides. One forward
    of the trained model and one of the reference over the 2B rows give the implicit rewards
    r = log p_theta - log p_ref summed over each image's tokens. For VAR the codes are all scales'
    tokens and the model is fed the continuous next-scale inputs its VQVAE builds from them (VAR's
    teacher forcing); its labels are never dropped (cond_drop_rate 0, as the CCA code). Runs under
    torchrun (see ``RunSetup``); returns the model on rank 0, None elsewhere.
    """
    args = args or CCATrainArgs()
    setup = setup or RunSetup()
    if not ref.config.has_null_class:
        raise ValueError("CCA needs a model trained with class dropout (a null-class row in the label table)")
    if ref.config.block_size != data.seq_len:
        raise ValueError(f"model block_size {ref.config.block_size} != code length {data.seq_len}")
    torch.manual_seed(args.seed)
    # policy and reference share a mode so that the rewards compare like for like: both without
    # dropout (default), or both with it (independent masks, as the public code's keep_dropout)
    caller_mode = ref.training
    ref = ref.float().train(args.dropout).requires_grad_(False)
    if isinstance(ref, VAR):
        ref.config.cond_drop_rate = 0.0  # CCA's VAR trainer: labels stay as given, in both models
        policy = copy.deepcopy(ref, memo={id(ref.vae): ref.vae}).requires_grad_(True)  # one shared VQVAE
    else:
        policy = copy.deepcopy(ref).requires_grad_(True)
    inputs_of = ref  # builds the teacher-forcing inputs (the wrapped models only take them)
    steps = int(args.epochs * len(data) // args.batch_size)
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    if steps < 1:
        raise ValueError(f"{len(data)} images make no batch of {args.batch_size}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    null = ref.config.null_class
    group_of = negative_groups(args.negatives_within, ref.config.num_classes)
    frozen: dict[str, torch.nn.Module] = {}

    def prepare(env: distributed.DistEnv) -> None:  # the reference is sharded like the policy under FSDP
        if isinstance(ref, VAR):
            ref.vae.to(env.device)  # held by both models, not a submodule of either
        frozen["ref"] = distributed.wrap(ref, env, "fsdp") if setup.strategy == "fsdp" else ref.to(env.device)

    def split(codes: torch.Tensor, labels: torch.Tensor, parts: int) -> list[Micro]:
        out = []
        for c, lab in zip(codes.chunk(parts), labels.chunk(parts), strict=True):
            pairs = contrastive_pairs(lab, null, args.uncond_ratio, gen, group_of)
            out.append((torch.cat([c, c]), torch.cat([pairs.pos, pairs.neg]), pairs.negative_is_positive))
        return out

    def loss_fn(model: torch.nn.Module, micro: Micro) -> tuple[torch.Tensor, dict[str, float]]:
        both, cond, flags = micro
        with torch.no_grad():
            inputs = teacher_inputs(inputs_of, both)
            ref_lp = sequence_logprob(frozen["ref"], cond, both, inputs)
        gap = sequence_logprob(model, cond, both, inputs).float() - ref_lp.float()
        pos_gap, neg_gap = gap.chunk(2)
        loss = preference_loss(args.loss, pos_gap, neg_gap, flags, args.lam, args.beta)
        return loss, reward_stats(pos_gap.detach(), neg_gap.detach(), flags, args.beta)

    if args.lr_schedule not in ("cosine", "constant") or args.accumulate not in ("mean", "sum"):
        raise ValueError(f"lr_schedule must be cosine or constant and accumulate mean or sum, got "
                         f"{args.lr_schedule!r}, {args.accumulate!r}")
    schedule = Schedule(steps, args.lr, warmup=max(1, steps // 20), min_lr_ratio=0.0) \
        if args.lr_schedule == "cosine" else Schedule(steps, args.lr, warmup=0, min_lr_ratio=1.0)
    try:
        return _fit(f"train {args.loss}", policy, data, batch_size=args.batch_size, seed=args.seed, steps=steps,
                    lr=args.lr, weight_decay=args.weight_decay, schedule=schedule, accumulate=args.accumulate,
                    setup=setup,
                    args=asdict(args), out_dir=None if out_dir is None else Path(out_dir), generators=[gen],
                    split=split, loss_fn=loss_fn, progress=progress, prepare=prepare)
    finally:
        ref.train(caller_mode)
