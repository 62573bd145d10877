"""What a request asks for: its mode, its sampling options, and the one check of both.

The table of modes lives here and nowhere else; the pipeline, the engine, the CLI, the UI, the
benchmarks and the evaluation read it instead of deciding for themselves.

| mode      | weights   | guided | rows per image per step |
|-----------|-----------|--------|-------------------------|
| free      | base      | no     | 1                       |
| cfg       | base      | yes    | 2 (cond + uncond)       |
| cca       | cca       | no     | 1                       |
| cca+cfg   | cca_cfg   | yes    | 2                       |

``cca+cfg`` guides its own fine-tune when a model ships one (the paper tunes the model it guides
with lambda 1), else the guidance-free CCA weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from .validation import interval, is_int_in, is_number_in, short

MAX_SEED = 2**63 - 1

# Bounds shared by the HTTP API, the UI and in-process callers (one validation for all of them).
MAX_CFG_SCALE = 50.0
MAX_TEMPERATURE = 10.0
MAX_TOP_K = 1_000_000
MAX_CFG_INTERVAL = 1_000_000
CFG_SCHEDULES = ("linear", "constant")  # how a next-scale model applies the scale over its steps


class InvalidRequest(ValueError):
    """A request value out of range; ``field`` names it (the HTTP API answers 422 with it)."""

    def __init__(self, field: str, message: str, allowed: str | list[str] | None = None):
        super().__init__(message)
        self.field, self.allowed = field, allowed


@dataclass(frozen=True)
class Mode:
    name: str
    weights: str  # which fine-tune runs it: "base", "cca" or "cca_cfg"
    guided: bool  # conditional + unconditional rows, logits mixed with the guidance scale
    fallback: str | None = None  # weights to use when a model lacks ``weights``
    description: str = ""

    @property
    def rows_per_image(self) -> int:
        return 2 if self.guided else 1


MODES_TABLE: dict[str, Mode] = {m.name: m for m in (
    Mode("free", "base", False, description="base weights, no guidance"),
    Mode("cfg", "base", True, description="base weights, classifier-free guidance"),
    Mode("cca", "cca", False, description="CCA fine-tune, no guidance"),
    Mode("cca+cfg", "cca_cfg", True, fallback="cca", description="CCA fine-tune with guidance"),
)}
MODES = tuple(MODES_TABLE)
MODE_ALIASES = {"cca_cfg": "cca+cfg", "cca cfg": "cca+cfg", "cca-cfg": "cca+cfg", "guided": "cfg"}
MODE_HELP = "free | cfg | cca | cca+cfg (also cca_cfg, or 'cca cfg' as an unencoded '+' arrives)"


def get_mode(name: str) -> Mode:
    """The mode of a name; accepts the aliases (``cca_cfg``, ``cca cfg``: an unencoded ``+`` in a URL)."""
    key = str(name).strip().lower()
    key = MODE_ALIASES.get(key, key)
    if key not in MODES_TABLE:
        raise InvalidRequest("mode", f"unknown mode {short(name)}; choose from {list(MODES)} (or cca_cfg)",
                             allowed=list(MODES))
    return MODES_TABLE[key]


def normalize_mode(name: str) -> str:
    """Canonical mode name (see ``get_mode``)."""
    return get_mode(name).name


def mode_is_guided(name: str) -> bool:
    return get_mode(name).guided


def weights_for(name: str, available: set[str] | list[str] | tuple[str, ...]) -> str:
    """Which of the available weights (``base``, ``cca``, ``cca_cfg``) run a mode; ValueError if none."""
    mode = get_mode(name)
    for weights in (mode.weights, mode.fallback):
        if weights is not None and weights in available:
            return weights
    raise InvalidRequest("mode", f"mode {mode.name!r} needs a CCA model; this model has none",
                         allowed=modes_for(available))


def modes_for(available: set[str] | list[str] | tuple[str, ...]) -> list[str]:
    """The modes a model with these weights can run, in table order."""
    out = []
    for name, mode in MODES_TABLE.items():
        if mode.weights in available or (mode.fallback is not None and mode.fallback in available):
            out.append(name)
    return out


@dataclass(frozen=True)
class SamplingOptions:
    """Per-image sampling options (LlamaGen's names and meanings).

    cfg_scale: logits = uncond + cfg_scale * (cond - uncond); 1.0 is guidance-free (one row).
    cfg_interval: -1 guides every token; N >= 0 guides image tokens 0..N+1 only, as LlamaGen's
        ``generate()`` does, after which the unconditional row is dropped.
    temperature: logits are divided by it; 0 means greedy.
    top_k: keep the k most likely tokens (0 = all); 1 is greedy.
    top_p: nucleus sampling threshold (1.0 = off).
    cfg_schedule: how the scale applies over a next-scale model's steps: "linear" (VAR's ramp from
        1 at the first scale to cfg_scale at the last) or "constant"; None = the family's default.
        Token-by-token families guide every token alike.
    more_smooth: VAR's display option (a soft Gumbel mix of codes per scale); VAR family only.
    """

    cfg_scale: float = 1.0
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_schedule: str | None = None
    more_smooth: bool = False

    def __post_init__(self) -> None:
        _check_number("cfg_scale", self.cfg_scale, 0.0, MAX_CFG_SCALE)
        _check_number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("cfg_interval", self.cfg_interval, -1, MAX_CFG_INTERVAL)
        _check_int("top_k", self.top_k, 0, MAX_TOP_K)
        if self.cfg_schedule is not None and self.cfg_schedule not in CFG_SCHEDULES:
            raise InvalidRequest("cfg_schedule", "cfg_schedule must be linear or constant, got "
                                 f"{short(self.cfg_schedule)}", allowed=list(CFG_SCHEDULES))
        if not isinstance(self.more_smooth, bool):
            raise InvalidRequest("more_smooth", f"more_smooth must be true or false, got {short(self.more_smooth)}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def rows(self) -> int:
        """Rows of the KV cache an image with these options takes: two while guided."""
        return 2 if self.guided else 1

    def guides_token(self, index: int) -> bool:
        return self.guided and (self.cfg_interval < 0 or index <= self.cfg_interval + 1)


def check_seed(seed: object) -> int:
    if not is_int_in(seed, 0, MAX_SEED):
        raise InvalidRequest("seed", f"seed must be an integer in [0, 2**63 - 1], got {short(seed)}",
                             allowed=f"[0, {MAX_SEED}]")
    return int(seed)


def check_class(class_id: object, num_classes: int, *, allow_null: bool = False) -> int:
    """A class id in [0, num_classes - 1] (or the null class ``num_classes`` when allowed)."""
    top = num_classes if allow_null else num_classes - 1
    if not is_int_in(class_id, 0, top):
        raise InvalidRequest("class", f"class id {short(class_id)} out of range [0, {top}]", allowed=f"[0, {top}]")
    return int(class_id)


def _check_number(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if not is_number_in(value, low, high, low_open):
        allowed = interval(low, high, low_open)
        raise InvalidRequest(name, f"{name} must be a number in {allowed}, got {short(value)}", allowed=allowed)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not is_int_in(value, low, high):
        raise InvalidRequest(name, f"{name} must be an integer in [{low}, {high}], got {short(value)}",
                             allowed=f"[{low}, {high}]")


__all__ = [
    "InvalidRequest", "Mode", "MODES", "MODES_TABLE", "MODE_ALIASES", "MODE_HELP", "get_mode", "normalize_mode",
    "mode_is_guided", "weights_for", "modes_for", "SamplingOptions", "MAX_SEED", "check_seed", "check_class",
]
