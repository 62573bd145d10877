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
type in ``FAMILIES``; nothing else in the core changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import torch

from .generate import Decoder, ImageJob
from .gpt import GPT
from .modes import SamplingOptions
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

    @abstractmethod
    def decoder(self, model: torch.nn.Module, max_rows: int, compile: bool = False) -> StepDecoder: ...

    @abstractmethod
    def codes_to_images(self, codes: torch.Tensor) -> torch.Tensor:
        """Token sequences [B, L] -> images [B, 3, H, W] in [-1, 1]."""

    @abstractmethod
    def tokens_per_image(self, model: torch.nn.Module) -> int: ...

    def steps_per_image(self, model: torch.nn.Module) -> int:
        return self.tokens_per_image(model)

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

    def decoder(self, model: torch.nn.Module, max_rows: int, compile: bool = False) -> Decoder:
        return Decoder(model, max_rows, compile=compile)

    @torch.inference_mode()
    def codes_to_images(self, codes: torch.Tensor) -> torch.Tensor:
        grid = (self.grid_size, self.grid_size)
        return self.tokenizer.decode_code(codes.to(self.device), grid)

    def tokens_per_image(self, model: torch.nn.Module) -> int:
        return model.config.block_size

    @property
    def image_size(self) -> int:
        return self.grid_size * self.tokenizer.config.downsample


# Tokenizer type -> family; a new family adds its tokenizer here.
FAMILIES: dict[type, type[ModelFamily]] = {VQModel: LlamaGenFamily}


def family_for(tokenizer: Any) -> ModelFamily:
    for kind, family in FAMILIES.items():
        if isinstance(tokenizer, kind):
            return family(tokenizer)
    raise ValueError(f"no model family takes a {type(tokenizer).__name__} tokenizer; known: "
                     f"{[k.__name__ for k in FAMILIES]}")


__all__ = ["ModelFamily", "StepDecoder", "LlamaGenFamily", "FAMILIES", "family_for"]
