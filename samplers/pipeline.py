"""One object that turns (classes, mode, seeds, options) into images: the CLI, the server's engine,
the UI, the benchmarks and the evaluation all go through it.

A Pipeline is a model family (its tokenizer and decoding rules, ``samplers.family``) plus the
weights the modes need: ``base`` (free, cfg), ``cca`` (cca) and optionally ``cca_cfg`` (the
fine-tune ``cca+cfg`` guides; without it ``cca+cfg`` guides ``cca``). Which weights and how many
rows a mode takes come from ``samplers.modes``.

Requests are checked once (``check_request``); finished images leave through one step,
``finish``: codes -> images -> ``ImageResult``. Each image is decoded on its own, so a served PNG
is the same to the pixel whatever else finished at the same step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .classes import imagenet_class_names, resolve_class, resolve_classes
from .family import ModelFamily, family_for
from .generate import ImageJob, random_seeds, run_decoder
from .images import to_pil
from .modes import (
    MODES,
    InvalidRequest,
    SamplingOptions,
    check_class,
    check_seed,
    get_mode,
    modes_for,
    normalize_mode,
    weights_for,
)


@dataclass
class ImageResult:
    """One finished image and what it cost; the same type from the Pipeline and the engine."""

    image: Image.Image
    class_id: int
    seed: int
    mode: str
    tokens: list[int]
    options: SamplingOptions
    latency_s: float  # from the call (or the engine's submit) to this image being ready
    rows_x_steps: int  # cost: KV-cache rows used, summed over decoding steps
    queue_wait_s: float = 0.0  # engine only: submit -> first decoding step
    gpt_s: float = 0.0  # token generation time of the batch it was in
    vq_s: float = 0.0  # decoding time of its codes
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows it took at its start: 1, or 2 for a guided image."""
        return self.options.rows


class Pipeline:
    """A model family's tokenizer with base, optional CCA and optional cca+cfg weights: the four modes."""

    def __init__(self, gpt: torch.nn.Module, vq: torch.nn.Module, cca_gpt: torch.nn.Module | None = None, *,
                 cca_cfg_gpt: torch.nn.Module | None = None, name: str = "custom",
                 class_names: Sequence[str] | None = None, default_cfg_scale: float = 4.0,
                 default_cca_cfg_scale: float | None = None, compile: bool = False,
                 family: ModelFamily | None = None):
        """``gpt``: the base transformer of any family; ``vq``: that family's tokenizer (the family is
        found from its type unless given); ``cca_gpt`` / ``cca_cfg_gpt``: CCA fine-tunes of ``gpt``.
        ``default_cfg_scale`` guides cfg, ``default_cca_cfg_scale`` cca+cfg (default: the same): the two
        modes guide different weights, so each has its own best scale (`ccaserve eval` picks both)."""
        if cca_cfg_gpt is not None and cca_gpt is None:
            raise ValueError("a cca+cfg model needs the guidance-free CCA model too")
        self.family = family or family_for(vq)
        self.models: dict[str, torch.nn.Module] = {}
        for role, model in (("base", gpt), ("cca", cca_gpt), ("cca_cfg", cca_cfg_gpt)):
            if model is not None:
                self.family.check_model(model)
                self.models[role] = model.eval()
        self.family.tokenizer.eval()
        self.name = name
        self.num_classes = gpt.config.num_classes
        if class_names:
            self.class_names: list[str] | None = list(class_names)
        elif self.num_classes == 1000:  # a real ImageNet checkpoint: its classes have names
            self.class_names = list(imagenet_class_names())
        else:
            self.class_names = None
        self.default_cfg_scale = default_cfg_scale
        self.default_cca_cfg_scale = default_cfg_scale if default_cca_cfg_scale is None else default_cca_cfg_scale
        self.compile = compile  # torch.compile the decoding step (for CUDA)

    # ---- what the pipeline holds -------------------------------------------------------------
    @property
    def gpt(self) -> torch.nn.Module:
        return self.models["base"]

    @property
    def cca_gpt(self) -> torch.nn.Module | None:
        return self.models.get("cca")

    @property
    def cca_cfg_gpt(self) -> torch.nn.Module | None:
        return self.models.get("cca_cfg")

    @property
    def vq(self) -> torch.nn.Module:
        return self.family.tokenizer

    @property
    def modes(self) -> list[str]:
        return modes_for(self.models)

    @property
    def default_mode(self) -> str:
        return "cca" if "cca" in self.models else "cfg"

    @property
    def image_size(self) -> int:
        return self.family.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.family.tokens_per_image(self.gpt)

    @property
    def steps_per_image(self) -> int:
        return self.family.steps_per_image(self.gpt)

    @property
    def guidance(self) -> str:
        """The guidance convention, for people and /models."""
        if self.family.guidance_schedule == "linear":
            return ("cfg_scale s: logits s*c - (s-1)*u, ramped linearly from 1 at the first scale to s at the "
                    "last (VAR's cfg = s - 1); s = 1 unguided")
        return "cfg_scale s: logits u + s*(c - u) at every token; s = 1 unguided"

    def class_name(self, class_id: int) -> str:
        if self.class_names and 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return f"class {class_id}"

    def find_classes(self, query: str | int) -> list[int]:
        """Every class a query means: an id, a name, or words of names ("green ring")."""
        return resolve_classes(query, self.class_names, self.num_classes)

    def resolve_class(self, query: str | int, field: str = "class") -> int:
        """The one class a query means (InvalidRequest naming candidates when it means several)."""
        return resolve_class(query, self.class_names, self.num_classes, field)

    def weights_for(self, mode: str) -> str:
        """The role (``base``, ``cca``, ``cca_cfg``) of the weights that run a mode here."""
        try:
            return weights_for(mode, self.models)
        except InvalidRequest as e:
            if e.allowed == list(MODES):  # an unknown mode: the message says so
                raise
            raise InvalidRequest("mode", f"mode {normalize_mode(mode)!r} needs a CCA model; {self.name} offers "
                                 f"{self.modes}", allowed=self.modes) from None

    def default_scale(self, mode: str) -> float:
        """The guidance scale a mode gets when a request names none (1 for the unguided modes)."""
        if not get_mode(mode).guided:
            return 1.0
        return self.default_cca_cfg_scale if normalize_mode(mode) == "cca+cfg" else self.default_cfg_scale

    def model_for(self, mode: str) -> torch.nn.Module:
        return self.models[self.weights_for(mode)]

    def options_for(self, mode: str, *, cfg_scale: float | None = None, cfg_interval: int = -1,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_schedule: str | None = None,
                    more_smooth: bool = False) -> SamplingOptions:
        """Sampling options of a mode: guided modes use cfg_scale (default: the model's for that mode),
        the others 1."""
        scale = (self.default_scale(mode) if cfg_scale is None else cfg_scale) if get_mode(mode).guided else 1.0
        return SamplingOptions(scale, cfg_interval, temperature, top_k, top_p, cfg_schedule, more_smooth)

    # ---- the one check of a request ----------------------------------------------------------
    def check_request(self, class_id: int, mode: str, seed: int) -> str:
        """Raise ValueError for a class, mode or seed this pipeline cannot serve; return the mode's
        canonical name. (Sampling options check themselves when built.)"""
        check_class(class_id, self.num_classes)
        check_seed(seed)
        self.weights_for(mode)
        return normalize_mode(mode)

    def check_options(self, options: SamplingOptions) -> None:
        """Options this family cannot honour (InvalidRequest naming the field)."""
        self.family.check_options(options)

    # ---- codes -> images -> results ----------------------------------------------------------
    @torch.inference_mode()
    def decode_images(self, codes: Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
        """Codes [N, L] -> images [N, 3, H, W] in [-1, 1], each decoded on its own: a decoder's
        arithmetic may depend on the batch, an image must not."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        return torch.cat([self.family.codes_to_images(codes[i : i + 1]) for i in range(len(codes))])

    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        return to_pil(self.decode_images(tokens))

    def finish(self, jobs: Sequence[ImageJob], mode: str | Sequence[str], started: float | Sequence[float],
               first_step: float | Sequence[float] | None = None, gpt_s: float = 0.0) -> list[ImageResult]:
        """Finished decoder jobs -> results: images decoded one by one, latency from ``started``."""
        n = len(jobs)
        modes = [mode] * n if isinstance(mode, str) else list(mode)
        starts = [started] * n if isinstance(started, int | float) else list(started)
        firsts = starts if first_step is None else ([first_step] * n if isinstance(first_step, int | float)
                                                    else list(first_step))
        results = []
        for job, m, t0, t1 in zip(jobs, modes, starts, firsts, strict=True):
            t_decode = time.perf_counter()
            image = self.decode([job.tokens])[0]
            done = time.perf_counter()
            results.append(ImageResult(image=image, class_id=job.class_id, seed=job.seed, mode=m, tokens=job.tokens,
                                       options=job.options, latency_s=done - t0, rows_x_steps=job.rows_x_steps,
                                       queue_wait_s=t1 - t0, gpt_s=gpt_s, vq_s=done - t_decode))
        return results

    # ---- sampling ----------------------------------------------------------------------------
    def decode_batch(self, mode: str, classes: Sequence[int], seeds: Sequence[int], options: SamplingOptions,
                     progress: bool = False) -> list[ImageJob]:
        """Token generation only: one batch of images in one mode, returned as finished jobs."""
        model = self.model_for(mode)
        decoder = self.family.decoder(model, max(1, len(classes)) * options.rows, compile=self.compile)
        return run_decoder(decoder, classes, seeds, options, progress, self.family.steps_per_image(model))

    @torch.inference_mode()
    def __call__(self, classes: Sequence[int] | int, mode: str | None = None, seeds: Sequence[int] | None = None,
                 *, progress: bool = False, **options: Any) -> list[ImageResult]:
        """Generate one image per class (one batch). Options: cfg_scale, cfg_interval, temperature,
        top_k, top_p. Seeds default to random ones (returned in the results)."""
        classes = [int(classes)] if isinstance(classes, int) else [int(c) for c in classes]
        seeds = list(seeds) if seeds is not None else random_seeds(len(classes))
        mode = normalize_mode(mode or self.default_mode)
        for c, s in zip(classes, seeds, strict=True):
            self.check_request(c, mode, s)
        opts = self.options_for(mode, **options)
        start = time.perf_counter()
        jobs = self.decode_batch(mode, classes, seeds, opts, progress)
        return self.finish(jobs, mode, start, gpt_s=time.perf_counter() - start)

    @torch.inference_mode()
    def sample_images(self, classes: Sequence[int], mode: str, seeds: Sequence[int], *, batch_size: int = 500,
                      progress: bool = False, **options: Any) -> torch.Tensor:
        """Many images as one tensor [N, 3, H, W] in [-1, 1], sampled ``batch_size`` at a time
        (for evaluation: FID needs thousands of samples, not PIL objects)."""
        if len(seeds) != len(classes):
            raise ValueError(f"got {len(seeds)} seeds for {len(classes)} classes")
        for c, s in zip(classes, seeds, strict=True):
            self.check_request(c, mode, s)
        opts = self.options_for(mode, **options)
        chunks = range(0, len(classes), batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=f"sample {normalize_mode(mode)}", unit="batch", leave=False)
        out = []
        for start in chunks:
            jobs = self.decode_batch(mode, classes[start : start + batch_size], seeds[start : start + batch_size], opts)
            out.append(self.decode_images([j.tokens for j in jobs]))
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
        tokenizer = entry.load_part("vq", device)
        kw = {"tokenizer": tokenizer} if entry.family == "var" else {}
        gpt = entry.load_part("gpt", device, **kw).to(dtype=dtype)
        cca = entry.load_part("cca_gpt", device, **kw).to(dtype=dtype) if entry.has_cca else None
        cca_cfg = entry.load_part("cca_cfg_gpt", device, **kw).to(dtype=dtype) \
            if "cca_cfg_gpt" in entry.parts else None
        return cls(gpt, tokenizer, cca, name=entry.name, class_names=entry.class_names,
                   default_cfg_scale=entry.default_cfg_scale, default_cca_cfg_scale=entry.default_cca_cfg_scale,
                   cca_cfg_gpt=cca_cfg)

    @classmethod
    def from_checkpoints(cls, gpt_ckpt: str, vq_ckpt: str, cca_ckpt: str | None = None, *,
                         gpt_model: str | None = None, vq_model: str | None = None, image_size: int | None = None,
                         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         class_names: Sequence[str] | None = None, default_cfg_scale: float = 4.0,
                         cca_cfg_ckpt: str | None = None) -> Pipeline:
        from .checkpoint import checkpoint_kind, load_gpt, load_var, load_var_vae, load_vq, read_checkpoint

        kind = checkpoint_kind(read_checkpoint(vq_ckpt)[0])
        if kind == "var_vae":  # VAR: the transformers hold the VAE; the depth comes from the shapes
            vq = load_var_vae(vq_ckpt, device=device)

            def load(path: str) -> torch.nn.Module:
                return load_var(path, vq, device=device, dtype=dtype)
        else:
            vq = load_vq(vq_ckpt, vq_model, device=device)

            def load(path: str) -> torch.nn.Module:
                return load_gpt(path, gpt_model, image_size, device=device, dtype=dtype)
        gpt = load(gpt_ckpt)
        cca = load(cca_ckpt) if cca_ckpt else None
        cca_cfg = load(cca_cfg_ckpt) if cca_cfg_ckpt else None
        return cls(gpt, vq, cca, name="checkpoints", class_names=class_names, default_cfg_scale=default_cfg_scale,
                   cca_cfg_gpt=cca_cfg)


__all__ = ["Pipeline", "ImageResult"]
