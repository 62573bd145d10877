"""Named models, listed in ``weights/registry.json``.

Each entry names its parts: ``gpt`` (base), optional ``cca_gpt`` (the CCA fine-tune), optional
``cca_cfg_gpt`` (the fine-tune the ``cca+cfg`` mode guides, when it is a separate one) and ``vq``.
A part is either ``{"path": ..., "preset": ..., "image_size": ...}`` with a path relative to the
weights directory (a safetensors directory or a LlamaGen ``.pt``), or ``{"random": {"config": ...,
"seed": N}}`` for random-weight models used in smoke tests and speed benchmarks. Requests name
models by registry key only; paths never come from a request.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_gpt, load_vq
from .gpt import GPT, build_gpt
from .vq import VQModel, build_vq

WEIGHTS_DIR = Path(os.environ.get("CCASERVE_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
REGISTRY_FILE = "registry.json"


@dataclass
class ModelEntry:
    name: str
    description: str
    parts: dict[str, dict[str, Any]]
    class_names: list[str] | None
    default_cfg_scale: float
    weights_dir: Path

    @property
    def has_cca(self) -> bool:
        return "cca_gpt" in self.parts

    def missing_files(self) -> list[str]:
        """Files of the sampling parts (gpt, cca_gpt, cca_cfg_gpt, vq) that are absent; the evalnet is only for eval."""
        return [str(self.weights_dir / p["path"]) for k, p in self.parts.items()
                if k != "evalnet" and "path" in p and not (self.weights_dir / p["path"]).exists()]

    @property
    def available(self) -> bool:
        return not self.missing_files()

    def load_part(self, part: str, device: str | torch.device = "cpu") -> GPT | VQModel:
        spec = self.parts[part]
        is_vq = part == "vq"
        if "random" in spec:
            rnd = spec["random"]
            torch.manual_seed(int(rnd.get("seed", 0)))
            model = build_vq(rnd["config"]) if is_vq else build_gpt(rnd["config"])
            if not is_vq:  # LlamaGen's init zeroes the output layer; random logits need weights
                model.init_weights(std=float(rnd.get("std", 0.02)))
                torch.nn.init.normal_(model.output.weight, std=float(rnd.get("std", 0.02)))
            return model.to(device).eval()
        path = self.weights_dir / spec["path"]
        if is_vq:
            return load_vq(path, spec.get("preset"), device=device)
        return load_gpt(path, spec.get("preset"), spec.get("image_size"), device=device)


class Registry:
    def __init__(self, weights_dir: str | Path = WEIGHTS_DIR):
        self.weights_dir = Path(weights_dir)
        path = self.weights_dir / REGISTRY_FILE
        data = json.loads(path.read_text()) if path.exists() else {"default": None, "models": {}}
        self.default: str | None = data.get("default")
        self.entries: dict[str, ModelEntry] = {}
        for name, e in data.get("models", {}).items():
            parts = {k: e[k] for k in ("gpt", "cca_gpt", "cca_cfg_gpt", "vq", "evalnet") if e.get(k)}
            names = e.get("class_names")
            if isinstance(names, str):
                names = json.loads((self.weights_dir / names).read_text())
            self.entries[name] = ModelEntry(
                name, e.get("description", ""), parts, names, float(e.get("default_cfg_scale", 4.0)),
                self.weights_dir,
            )

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str | None = None) -> ModelEntry:
        name = name or self.default
        if name is None:
            raise KeyError("the registry has no default model")
        if name not in self.entries:
            raise KeyError(f"unknown model {name!r}; registered: {self.names()}")
        entry = self.entries[name]
        if not entry.available:
            raise FileNotFoundError(f"model {name!r} is registered but its files are missing: {entry.missing_files()}")
        return entry
