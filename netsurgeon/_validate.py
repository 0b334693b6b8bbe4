"""Checks of values users hand to the public API, and the short listings their messages use.

Example:
    >>> require_bool("transform", "inplace", False)
    >>> short_list([f"bn{i}" for i in range(8)], limit=3)
    'bn0, bn1, bn2 and 5 more'
    >>> problem_list([("bn1", "batch norm"), ("bn2", "batch norm"), ("pool", "max pooling")], limit=2)
    'bn1 and 1 more: batch norm; pool: max pooling'
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .errors import InvalidArgumentError

__all__ = ["require_bool", "short_list", "printable", "problem_list", "non_finite"]


def require_bool(where: str, name: str, value: Any) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is ``True`` or ``False``.

    A string such as ``"no"`` is truthy, and an int or a numpy bool hides a mistake, so only a
    real ``bool`` is accepted.

    Args:
        where: the function the flag belongs to (``"transform"``), for the message.
        name: the parameter name (``"inplace"``).
        value: the value given.
    """
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{where}: {name} must be True or False; got {value!r} of type "
                                   f"{type(value).__name__}")


def printable(name: str) -> str:
    """``name`` as is when printable, else its ``repr`` (names from files reach the terminal: an
    escape sequence or a newline in a tensor name must not)."""
    return name if name.isprintable() else repr(name)


def short_list(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` joined by commas, then ``"and N more"`` for the rest
    (each made :func:`printable`)."""
    names = [printable(str(n)) for n in names]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def problem_list(problems: Sequence[tuple[str, str]], limit: int = 5) -> str:
    """``(node, reason)`` pairs on one line, grouped by reason in first-seen order:
    ``"a, b and 3 more: reason; c: other reason"``.

    At most ``limit`` node names appear in all: each reason gets one before any gets a second,
    and reasons past the ``limit``-th are counted at the end.
    """
    groups: dict[str, list[str]] = {}
    for node, reason in problems:
        groups.setdefault(reason, []).append(node)
    shown = list(groups)[:limit]
    quota = dict.fromkeys(shown, 1)
    left = limit - len(shown)
    for reason in shown:
        extra = min(left, len(groups[reason]) - 1)
        quota[reason] += extra
        left -= extra
    parts = [f"{short_list(groups[r], quota[r])}: {r}" for r in shown]
    rest = list(groups)[limit:]
    if rest:
        parts.append(f"and {sum(len(groups[r]) for r in rest)} more node(s) for {len(rest)} other reason(s)")
    return "; ".join(parts)


def _counts(t: torch.Tensor, nan_only: bool) -> tuple[int, int]:
    """How many NaN and how many ±inf values ``t`` holds (0, 0 for non-float and meta tensors)."""
    if isinstance(t, nn.parameter.UninitializedTensorMixin) or t.device.type == "meta" or not (
            t.is_floating_point() or t.is_complex()):
        return 0, 0
    with torch.no_grad():
        if bool(torch.isfinite(t).all()):  # one sync in the common case
            return 0, 0
        nan = int(torch.isnan(t).sum())
        inf = 0 if nan_only else int(torch.isinf(t).sum())
    return nan, inf


def non_finite(named: Iterable[tuple[str, torch.Tensor]], nan_only: bool = False) -> list[str]:
    """``"name (3 NaN, 1 inf)"`` for every tensor of ``named`` that holds NaN (or, unless
    ``nan_only``, inf) values, in order; empty when all are finite."""
    out = []
    for name, t in named:
        nan, inf = _counts(t, nan_only)
        if nan or inf:
            parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} inf"] if inf else [])
            out.append(f"{name} ({', '.join(parts)})")
    return out

