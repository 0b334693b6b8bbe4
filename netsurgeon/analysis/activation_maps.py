"""Adapter from the op registry's :class:`ActivationSpec` to the local maps of
:mod:`netsurgeon.kernels`, cached per spec."""
from __future__ import annotations

import functools

import numpy as np

from ..kernels import LocalMaps
from ..ops import ActivationSpec

__all__ = ["ActivationMaps", "maps_for"]


class ActivationMaps:
    """Q map, kernel map and ``dK/dk`` at ``c = 1`` of one activation."""

    def __init__(self, spec: ActivationSpec) -> None:
        params = {k: v for k, v in spec.params}
        name = "leaky_relu" if spec.name == "prelu" else spec.name
        self.local = LocalMaps(name, **params)

    def q_map(self, q: np.ndarray) -> np.ndarray:
        return np.atleast_1d(self.local.q_map(q))

    def kernel_map(self, q1: np.ndarray, q2: np.ndarray, k: np.ndarray) -> np.ndarray:
        return np.atleast_1d(self.local.kernel_map(q1, q2, k))

    def kernel_slope_at_one(self, q: float) -> float:
        """``dK/dk`` at ``k = q = q'`` (Price's theorem): ``E[φ'(√q z)²]``."""
        act = self.local.activation
        if act.leaky_slope is not None:
            return (1.0 + act.leaky_slope ** 2) / 2.0
        if any(act.phi_jumps()):
            return float("inf")
        return _expect_split(lambda x: act.dphi(x) ** 2, float(np.sqrt(q)), act.kinks)


_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(96)


def _expect_split(fn, std: float, kinks: tuple[float, ...]) -> float:
    """E[fn(std·z)], z ~ N(0, 1): Gauss–Legendre on [-14 std, 14 std] split at the kinks."""
    if std == 0:
        return float(fn(np.zeros(1))[0])
    edges = np.unique(np.clip(np.array([-14 * std, *kinks, 14 * std], dtype=float), -14 * std, 14 * std))
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        x = 0.5 * (hi - lo) * _NODES + 0.5 * (hi + lo)
        pdf = np.exp(-0.5 * (x / std) ** 2) / (std * np.sqrt(2 * np.pi))
        total += 0.5 * (hi - lo) * float(np.sum(_WEIGHTS * fn(x) * pdf))
    return total


@functools.lru_cache(maxsize=256)
def _cached(spec: ActivationSpec) -> ActivationMaps | None:
    if any(isinstance(v, tuple) for _, v in spec.params):  # per-channel PReLU slopes
        return None
    try:
        return ActivationMaps(spec)
    except ValueError:
        return None


def maps_for(spec: ActivationSpec) -> ActivationMaps | None:
    """The maps of ``spec``, or None when netsurgeon has no local map for it."""
    return _cached(spec)
