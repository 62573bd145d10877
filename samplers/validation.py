"""Predicates for untrusted values (request fields, config.json entries): exact types, finite
numbers, closed ranges, and a short form of a value for error messages (never echo 5 MB back)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def clip(text: str, limit: int = 200) -> str:
    """A string cut to ``limit`` characters (for text that is already a message, not a value)."""
    return text if len(text) <= limit else text[:limit] + "..."


def is_int_in(value: Any, low: int, high: int) -> bool:
    """An integer (not a bool, not a float) in [low, high]."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and low <= value <= high


def is_number_in(value: Any, low: float, high: float, low_open: bool = False) -> bool:
    """A finite real (not a bool) in [low, high], or (low, high] with ``low_open``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def interval(low: float, high: float, low_open: bool = False) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}]"
