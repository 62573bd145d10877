"""One object that turns (classes, mode, seeds, options) into images: the CLI, the server and the
UI all call this.

Modes (rows per image per step in brackets):
  free     base weights, no guidance                      [1]
  cfg      base weights, classifier-free guidance         [2]
  cca      CCA fine-tuned weights, no guidance            [1]
  cca+cfg  CCA fine-tuned weights with guidance           [2]

``cca+cfg`` uses a separate fine-tune when the model has one (``cca_cfg_gpt``): the CCA paper
tunes the model it guides with a small lambda (1) and beta 0.1, and the guidance-free one with a
large lambda; without it ``cca+cfg`` guides ``cca_gpt``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .generate import ImageJob, SamplingOptions, random_seeds, run_decoder
from .gpt import GPT
from .vq import VQModel

MODES = ("free", "cfg", "cca", "cca+cfg")
_MODE_ALIASES = {"cca_cfg": "cca+cfg", "cca cfg": "cca+cfg", "cca-cfg": "cca+cfg", "guided": "cfg"}


def normalize_mode(mode: str) -> str:
    """Canonical mode name; accepts ``cca_cfg`` and ``cca cfg`` (an unencoded ``+`` in a URL)."""
    key = mode.strip().lower()
    key = _MODE_ALIASES.get(key, key)
    if key not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)} (or cca_cfg)")
    return key


def mode_is_guided(mode: str) -> bool:
    return normalize_mode(mode) in ("cfg", "cca+cfg")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL RGB images (rounded as torchvision's save_image does)."""
    arr = (images.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).numpy())) for a in arr]


@dataclass
class ImageResult:
    image: Image.Image
    class_id: int
    seed: int
    mode: str
    tokens: list[int]
    options: SamplingOptions
    latency_s: float  # from the call to this image being ready (the batch finishes together)
    gpt_s: float  # token generation time of the batch it was in
    vq_s: float  # decoding time of that batch
    rows_x_steps: int  # cost: KV-cache rows used, summed over decoding steps
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Base GPT, optional CCA GPT and VQ tokenizer, with the four sampling modes."""

    def __init__(self, gpt: GPT, vq: VQModel, cca_gpt: GPT | None = None, *, name: str = "custom",
                 class_names: Sequence[str] | None = None, default_cfg_scale: float = 4.0,
                 compile: bool = False, cca_cfg_gpt: GPT | None = None):
        for tuned in (cca_gpt, cca_cfg_gpt):
            if tuned is not None and tuned.config.block_size != gpt.config.block_size:
                raise ValueError("base and CCA models have different token grids")
        if cca_cfg_gpt is not None and cca_gpt is None:
            raise ValueError("a cca+cfg model needs the guidance-free CCA model too")
        if gpt.config.vocab_size > vq.config.codebook_size:
            raise ValueError(
                f"GPT vocabulary {gpt.config.vocab_size} exceeds the VQ codebook {vq.config.codebook_size}")
        self.gpt, self.vq, self.cca_gpt = gpt.eval(), vq.eval(), cca_gpt.eval() if cca_gpt else None
        self.cca_cfg_gpt = cca_cfg_gpt.eval() if cca_cfg_gpt else None
        self.name = name
        self.num_classes = gpt.config.num_classes
        self.class_names = list(class_names) if class_names else None
        self.default_cfg_scale = default_cfg_scale
        self.grid = (gpt.config.grid_size, gpt.config.grid_size)
        self.compile = compile  # torch.compile the decoding step (for CUDA)

    @property
    def modes(self) -> list[str]:
        return list(MODES) if self.cca_gpt is not None else ["free", "cfg"]

    @property
    def default_mode(self) -> str:
        return "cca" if self.cca_gpt is not None else "cfg"

    @property
    def image_size(self) -> int:
        return self.grid[0] * self.vq.config.downsample

    def class_name(self, class_id: int) -> str:
        if self.class_names and 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return f"class {class_id}"

    def model_for(self, mode: str) -> GPT:
        mode = normalize_mode(mode)
        if mode.startswith("cca"):
            if self.cca_gpt is None:
                raise ValueError(f"mode {mode!r} needs a CCA model; this pipeline has none (modes: {self.modes})")
            if mode == "cca+cfg" and self.cca_cfg_gpt is not None:
                return self.cca_cfg_gpt
            return self.cca_gpt
        return self.gpt

    def options_for(self, mode: str, *, cfg_scale: float | None = None, cfg_interval: int = -1,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SamplingOptions:
        """Sampling options of a mode: guided modes use cfg_scale (default: the model's), the others 1."""
        scale = (self.default_cfg_scale if cfg_scale is None else cfg_scale) if mode_is_guided(mode) else 1.0
        return SamplingOptions(scale, cfg_interval, temperature, top_k, top_p)

    def validate_class(self, class_id: int) -> None:
        if not 0 <= int(class_id) < self.num_classes:
            raise ValueError(f"class {class_id} out of range [0, {self.num_classes - 1}]")

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        return to_pil(self.vq.decode_code(tokens.to(self.vq.device), self.grid))

    @torch.inference_mode()
    def __call__(self, classes: Sequence[int] | int, mode: str | None = None, seeds: Sequence[int] | None = None,
                 *, progress: bool = False, **options: Any) -> list[ImageResult]:
        """Generate one image per class (one batch). Options: cfg_scale, cfg_interval, temperature,
        top_k, top_p. Seeds default to random ones (returned in the results)."""
        classes = [int(classes)] if isinstance(classes, int) else [int(c) for c in classes]
        for c in classes:
            self.validate_class(c)
        mode = normalize_mode(mode or self.default_mode)
        gpt = self.model_for(mode)
        opts = self.options_for(mode, **options)
        seeds = list(seeds) if seeds is not None else random_seeds(len(classes))
        start = time.perf_counter()
        jobs: list[ImageJob] = run_decoder(gpt, classes, seeds, opts, progress, self.compile)
        gpt_done = time.perf_counter()
        images = self.decode(torch.tensor([j.tokens for j in jobs]))
        end = time.perf_counter()
        return [
            ImageResult(img, j.class_id, j.seed, mode, j.tokens, opts, end - start, gpt_done - start,
                        end - gpt_done, j.rows_x_steps)
            for img, j in zip(images, jobs, strict=True)
        ]

    @torch.inference_mode()
    def sample_images(self, classes: Sequence[int], mode: str, seeds: Sequence[int], *, batch_size: int = 500,
                      progress: bool = False, **options: Any) -> torch.Tensor:
        """Many images as one tensor [N, 3, H, W] in [-1, 1], decoded ``batch_size`` at a time
        (for evaluation: FID needs thousands of samples, not PIL objects)."""
        if len(seeds) != len(classes):
            raise ValueError(f"got {len(seeds)} seeds for {len(classes)} classes")
        for c in classes:
            self.validate_class(c)
        gpt, opts = self.model_for(mode), self.options_for(mode, **options)
        chunks = range(0, len(classes), batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=f"sample {normalize_mode(mode)}", unit="batch", leave=False)
        out = []
        for start in chunks:
            jobs = run_decoder(gpt, classes[start : start + batch_size], seeds[start : start + batch_size], opts,
                               compile=self.compile)
            out.append(self.vq.decode_code(torch.tensor([j.tokens for j in jobs], device=self.vq.device), self.grid))
        return torch.cat(out).float().cpu()

    def compare(self, class_id: int, seed: int, modes: Sequence[str] | None = None,
                **options: Any) -> dict[str, ImageResult]:
        """The same class and seed in each mode, side by side."""
        return {m: self([class_id], m, [seed], **options)[0] for m in (modes or self.modes)}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_registry(cls, name: str | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> Pipeline:
        from .registry import Registry

        entry = Registry().get(name)
        gpt = entry.load_part("gpt", device).to(dtype=dtype)
        cca = entry.load_part("cca_gpt", device).to(dtype=dtype) if entry.has_cca else None
        cca_cfg = entry.load_part("cca_cfg_gpt", device).to(dtype=dtype) if "cca_cfg_gpt" in entry.parts else None
        return cls(gpt, entry.load_part("vq", device), cca, name=entry.name, class_names=entry.class_names,
                   default_cfg_scale=entry.default_cfg_scale, cca_cfg_gpt=cca_cfg)

    @classmethod
    def from_checkpoints(cls, gpt_ckpt: str, vq_ckpt: str, cca_ckpt: str | None = None, *,
                         gpt_model: str | None = None, vq_model: str | None = None, image_size: int | None = None,
                         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         class_names: Sequence[str] | None = None, default_cfg_scale: float = 4.0,
                         cca_cfg_ckpt: str | None = None) -> Pipeline:
        from .checkpoint import load_gpt, load_vq

        gpt = load_gpt(gpt_ckpt, gpt_model, image_size, device=device, dtype=dtype)
        cca = load_gpt(cca_ckpt, gpt_model, image_size, device=device, dtype=dtype) if cca_ckpt else None
        cca_cfg = load_gpt(cca_cfg_ckpt, gpt_model, image_size, device=device, dtype=dtype) if cca_cfg_ckpt else None
        vq = load_vq(vq_ckpt, vq_model, device=device)
        return cls(gpt, vq, cca, name="checkpoints", class_names=class_names, default_cfg_scale=default_cfg_scale,
                   cca_cfg_gpt=cca_cfg)
