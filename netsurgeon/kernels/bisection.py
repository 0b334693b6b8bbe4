"""Bisection on a monotone condition: the one root finder the target derivations share.

Example:
    >>> round(bisect(lambda x: x * x < 2.0, 1.0, 2.0, tol=1e-12), 10)
    1.4142135624
"""
from __future__ import annotations

from typing import Callable

__all__ = ["bisect"]


def bisect(below: Callable[[float], bool], lo: float, hi: float, tol: float, steps: int = 200) -> float:
    """The point of ``[lo, hi]`` where ``below`` turns from True to False, to within ``tol``.

    ``below(x)`` must be True for ``x`` under the point and False above it (a monotone
    condition such as ``C'_f(ξ) < ζ``); the midpoint of the final bracket is returned, after at
    most ``steps`` halvings.
    """
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if below(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return 0.5 * (lo + hi)
