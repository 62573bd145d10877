"""Named models, listed in ``weights/registry.json``.

Each entry names its family (``llamagen``, the default, or ``var``) and its parts: ``gpt`` (the
base transformer: a LlamaGen GPT or a VAR), optional ``cca_gpt`` (the CCA fine-tune), optional
``cca_cfg_gpt`` (the fine-tune the ``cca+cfg`` mode guides, when it is a separate one) and ``vq``
(the tokenizer: LlamaGen's VQ or VAR's multi-scale VQVAE).
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

from .checkpoint import load_gpt, load_var, load_var_vae, load_vq
from .gpt import GPT, build_gpt
from .var import VAR, build_var
from .var_vae import VARVAE, build_var_vae
from .vq import VQModel, build_vq

FAMILY_NAMES = ("llamagen", "var")

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
    family: str = "llamagen"
    default_cca_cfg_scale: float | None = None  # the cca+cfg mode's; None: default_cfg_scale

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

    def load_part(self, part: str, device: str | torch.device = "cpu",
                  tokenizer: VARVAE | None = None) -> GPT | VQModel | VAR | VARVAE:
        """One part; a VAR transformer needs its ``tokenizer`` (the entry's ``vq`` part)."""
        spec = self.parts[part]
        is_tokenizer = part == "vq"
        var = self.family == "var"
        if var and not is_tokenizer and tokenizer is None:
            tokenizer = self.load_part("vq", device)
        if "random" in spec:
            rnd = spec["random"]
            torch.manual_seed(int(rnd.get("seed", 0)))
            std = float(rnd.get("std", 0.02))
            if is_tokenizer:
                model = build_var_vae(rnd["config"]) if var else build_vq(rnd["config"])
            elif var:
                model = build_var(rnd["config"], tokenizer)
                _random_var_init(model, std)
            else:  # LlamaGen's init zeroes the output layer; random logits need weights
                model = build_gpt(rnd["config"])
                model.init_weights(std=std)
                torch.nn.init.normal_(model.output.weight, std=std)
            return model.to(device).eval()
        path = self.weights_dir / spec["path"]
        if is_tokenizer:
            return load_var_vae(path, device=device) if var else load_vq(path, spec.get("preset"), device=device)
        if var:
            return load_var(path, tokenizer, spec.get("depth"), device=device)
        return load_gpt(path, spec.get("preset"), spec.get("image_size"), device=device)


def _random_var_init(model: VAR, std: float) -> None:
    """Random weights that make every block matter (VAR's own init nearly zeroes the AdaLN gammas)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale_mul" in name:
                p.fill_(torch.tensor(4.0).log().item())
            elif p.dim() >= 2 or name in ("pos_start", "pos_1LC"):
                torch.nn.init.normal_(p, std=std if "ada_lin" in name else 1.0 / p.shape[-1] ** 0.5)
            else:
                torch.nn.init.normal_(p, std=0.02)


class Registry:
    def __init__(self, weights_dir: str | Path = WEIGHTS_DIR):
        self.weights_dir = Path(weights_dir)
        path = self.weights_dir / REGISTRY_FILE
        data = json.loads(path.read_text()) if path.exists() else {"default": None, "models": {}}
        self.default: str | None = data.get("default")
        # what `ccaserve serve` loads when no model is named: the shipped families, default first
        self.served: list[str] = list(data.get("serve") or ([self.default] if self.default else []))
        self.entries: dict[str, ModelEntry] = {}
        for name, e in data.get("models", {}).items():
            parts = {k: e[k] for k in ("gpt", "cca_gpt", "cca_cfg_gpt", "vq", "evalnet") if e.get(k)}
            names = e.get("class_names")
            if isinstance(names, str):
                names = json.loads((self.weights_dir / names).read_text())
            family = e.get("family", "llamagen")
            if family not in FAMILY_NAMES:
                raise ValueError(f"registry entry {name!r}: unknown family {family!r}; known: {list(FAMILY_NAMES)}")
            self.entries[name] = ModelEntry(
                name, e.get("description", ""), parts, names, float(e.get("default_cfg_scale", 4.0)),
                self.weights_dir, family,
                float(e["default_cca_cfg_scale"]) if "default_cca_cfg_scale" in e else None,
            )

        unknown = [n for n in self.served if n not in self.entries]
        if unknown:
            raise ValueError(f"registry 'serve' names {unknown}, which have no entry")

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
