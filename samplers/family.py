"""The model-family interface: everything the pipeline, the engine, the benchmarks and the
evaluation need from a family of class-conditional AR image models, and nothing more.

A family is a tokenizer plus the knowledge of how its transformers decode:

- ``decoder(model, max_rows)``: a ``StepDecoder`` over one model's KV cache, which admits images
  between steps (``add``), advances them all by one step (``step``, returning finished images)
  and drops abandoned ones (``cancel``). For LlamaGen one step is one token; for a next-scale
  family it is one scale.
- ``codes_to_images(codes)``: finished token sequences [B, L] -> images [B, 3, H, W] in [-1, 1].
- ``tokens_per_image`` / ``steps_per_image`` / ``image_size``: the shape of the work.
- ``check_model(model)``: a transformer that does not fit the tokenizer fails here, before use.

The rows a mode takes per image and which weights run it are not the family's business: they
come from ``samplers.modes``. A third family implements this class and registers its tokenizer
and model types in ``FAMILIES`` and ``MODEL_FAMILIES``; nothing else in the core changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch

from .generate import Decoder, ImageJob, check_llamagen_options, random_seeds, run_decoder
from .gpt import GPT
from .modes import SamplingOptions
from .var import VAR, VARDecoder, check_var_options
from .var_vae import VARVAE
from .vq import VQModel


class StepDecoder(Protocol):
    """Rows of one model's KV cache decoded together; what the engine and ``run_decoder`` drive."""

    max_rows: int
    jobs: list[ImageJob]

    @property
    def rows_in_use(self) -> int: ...

    def free_rows(self) -> int: ...

    def add(self, class_id: int, seed: int, options: SamplingOptions, tag: object = None) -> ImageJob: ...

    def cancel(self, job: ImageJob) -> None: ...

    def step(self) -> list[ImageJob]: ...


class ModelFamily(ABC):
    """A tokenizer and the rules of one family of AR transformers."""

    name: ClassVar[str]
    guidance_schedule: ClassVar[str] = "constant"  # how cfg_scale is applied over the steps

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @abstractmethod
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError when the transformer does not fit this tokenizer."""

    @classmethod
    @abstractmethod
    def decoder(cls, model: torch.nn.Module, max_rows: int, compile: bool = False) -> StepDecoder: ...

    @abstractmethod
    def codes_to_images(self, codes: torch.Tensor) -> torch.Tensor:
        """Token sequences [B, L] -> images [B, 3, H, W] in [-1, 1]."""

    @abstractmethod
    def images_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> the token sequences [B, L] a transformer of this family reads."""

    @abstractmethod
    def check_options(self, options: SamplingOptions) -> None:
        """Raise InvalidRequest for options this family cannot honour."""

    @classmethod
    @abstractmethod
    def tokens_per_image(cls, model: torch.nn.Module) -> int: ...

    @classmethod
    def steps_per_image(cls, model: torch.nn.Module) -> int:
        return cls.tokens_per_image(model)

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device


class LlamaGenFamily(ModelFamily):
    """LlamaGen's class-conditional GPT (next-token prediction over a square grid) and its VQ."""

    name = "llamagen"

    def __init__(self, vq: VQModel, grid_size: int | None = None):
        super().__init__(vq)
        self.grid_size = grid_size

    def check_model(self, model: torch.nn.Module) -> None:
        if not isinstance(model, GPT):
            raise ValueError(f"the LlamaGen family runs GPT models, got {type(model).__name__}")
        if model.config.vocab_size > self.tokenizer.config.codebook_size:
            raise ValueError(f"GPT vocabulary {model.config.vocab_size} exceeds the VQ codebook "
                             f"{self.tokenizer.config.codebook_size}")
        if self.grid_size is None:
            self.grid_size = model.config.grid_size
        elif model.config.grid_size != self.grid_size:
            raise ValueError("base and CCA models have different token grids")

    @classmethod
    def decoder(cls, model: torch.nn.Module, max_rows: int, compile: bool = False) -> Decoder:
        return Decoder(model, max_rows, compile=compile)

    def check_options(self, options: SamplingOptions) -> None:
        check_llamagen_options(options)

    @torch.inference_mode()
    def codes_to_images(self, codes: torch.Tensor) -> torch.Tensor:
        grid = (self.grid_size, self.grid_size)
        return self.tokenizer.decode_code(codes.to(self.device), grid)

    def images_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode_to_codes(images.to(self.device))

    @classmethod
    def tokens_per_image(cls, model: torch.nn.Module) -> int:
        return model.config.block_size

    @property
    def image_size(self) -> int:
        return self.grid_size * self.tokenizer.config.downsample


class VARFamily(ModelFamily):
    """VAR: next-scale prediction over a multi-scale VQVAE; one step is one scale."""

    name = "var"
    guidance_schedule = "linear"  # VAR's ramp over the scales, unless a request says constant

    def check_model(self, model: torch.nn.Module) -> None:
        if not isinstance(model, VAR):
            raise ValueError(f"the VAR family runs VAR models, got {type(model).__name__}")
        model.attach_vae(self.tokenizer)  # raises when the scales, vocabulary or width differ

    @classmethod
    def decoder(cls, model: torch.nn.Module, max_rows: int, compile: bool = False) -> VARDecoder:
        return VARDecoder(model, max_rows, compile=compile)

    def check_options(self, options: SamplingOptions) -> None:
        check_var_options(options)

    @torch.inference_mode()
    def codes_to_images(self, codes: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_code(codes)

    def images_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.tokenizer.img_to_idx(images), dim=1)  # every scale, coarse to fine

    @classmethod
    def tokens_per_image(cls, model: torch.nn.Module) -> int:
        return model.config.block_size

    @classmethod
    def steps_per_image(cls, model: torch.nn.Module) -> int:
        return model.config.num_scales

    @property
    def image_size(self) -> int:
        return self.tokenizer.config.image_size


# Tokenizer type and model type -> family; a new family adds its two types here.
FAMILIES: dict[type, type[ModelFamily]] = {VQModel: LlamaGenFamily, VARVAE: VARFamily}
MODEL_FAMILIES: dict[type, type[ModelFamily]] = {GPT: LlamaGenFamily, VAR: VARFamily}


def family_for(tokenizer: Any) -> ModelFamily:
    for kind, family in FAMILIES.items():
        if isinstance(tokenizer, kind):
            return family(tokenizer)
    raise ValueError(f"no model family takes a {type(tokenizer).__name__} tokenizer; known: "
                     f"{[k.__name__ for k in FAMILIES]}")


def model_family(model: torch.nn.Module) -> type[ModelFamily]:
    for kind, family in MODEL_FAMILIES.items():
        if isinstance(model, kind):
            return family
    raise ValueError(f"no model family runs a {type(model).__name__}; known: {[k.__name__ for k in MODEL_FAMILIES]}")


def decoder_for(model: torch.nn.Module, max_rows: int, compile: bool = False) -> StepDecoder:
    """The decoding loop of a model's family (LlamaGen: a token per step; VAR: a scale per step)."""
    return model_family(model).decoder(model, max_rows, compile=compile)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    classes: Sequence[int] | torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Sequence[int] | torch.Tensor | None = None,
    cfg_schedule: str | None = None,
    more_smooth: bool = False,
    progress: bool = False,
    compile: bool = False,
) -> torch.Tensor:
    """Sample one image's tokens per class with any family's model: LongTensor [B, tokens].

    One guidance convention: ``cfg_scale=1`` is unguided (one row per image), logits mix as
    ``u + s (c - u)``; VAR models ramp the scale over their steps unless ``cfg_schedule="constant"``
    (so VAR's own ``cfg=1.5`` is ``cfg_scale=2.5``). ``top_k=1`` is greedy; ``top_p=1`` is off.
    ``seeds`` gives one seed per image (default: drawn from torch's global RNG); an image depends
    only on the weights, its class, its seed and the options, never on the rest of the batch.
    """
    classes = classes.tolist() if isinstance(classes, torch.Tensor) else list(classes)
    seeds = random_seeds(len(classes)) if seeds is None else seeds
    seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
    options = SamplingOptions(cfg_scale, cfg_interval, temperature, top_k, top_p, cfg_schedule, more_smooth)
    family = model_family(model)
    decoder = family.decoder(model, max(1, len(classes)) * options.rows, compile=compile)
    jobs = run_decoder(decoder, classes, seeds, options, progress, family.steps_per_image(model))
    return torch.tensor([job.tokens for job in jobs], dtype=torch.long, device=model.device)


__all__ = ["ModelFamily", "StepDecoder", "LlamaGenFamily", "VARFamily", "FAMILIES", "MODEL_FAMILIES", "family_for",
           "model_family", "decoder_for", "generate"]
