"""Adapter from the op registry's :class:`ActivationSpec` to the local maps of
:mod:`netsurgeon.kernels`, cached per spec."""
from __future__ import annotations

import functools

import numpy as np

from ..kernels import LocalMaps, get_activation
from ..kernels.transforms import transformed
from ..kernels.quadrature import FAST, Piecewise, gauss_expectation
from ..kernels.registry import version as registry_version
from ..ops import ActivationSpec

__all__ = ["ActivationMaps", "maps_for"]


class ActivationMaps:
    """Q map, kernel map and ``dK/dk`` at ``c = 1`` of one activation."""

    def __init__(self, spec: ActivationSpec) -> None:
        act = get_activation(spec.name, **dict(spec.params))  # an alias (prelu) builds its target
        self.local = LocalMaps(act if spec.transform is None else transformed(act, *spec.transform))

    def q_map(self, q: np.ndarray) -> np.ndarray:
        return np.atleast_1d(self.local.q_map(q))

    def kernel_map(self, q1: np.ndarray, q2: np.ndarray, k: np.ndarray) -> np.ndarray:
        return np.atleast_1d(self.local.kernel_map(q1, q2, k, FAST))

    def kernel_slope_at_one(self, q: float) -> float:
        """``dK/dk`` at ``k = q = q'`` (Price's theorem): ``E[φ'(√q z)²]``."""
        act = self.local.activation
        if act.leaky_slope is not None:
            return act.leaky_gain ** 2 * (1.0 + act.leaky_slope ** 2) / 2.0
        if any(act.phi_jumps()):
            return float("inf")
        integrand = Piecewise(lambda x: act.dphi(x) ** 2, act.kinks, act.scale, act.centers)
        return float(gauss_expectation(integrand, 0.0, float(np.sqrt(q))))


@functools.lru_cache(maxsize=256)
def _cached(spec: ActivationSpec, version: int) -> ActivationMaps | None:
    """``version``: the activation registry's, so a re-registered name is never served stale."""
    if any(isinstance(v, tuple) for _, v in spec.params):  # per-channel PReLU slopes
        return None
    try:
        return ActivationMaps(spec)
    except ValueError:
        return None


def maps_for(spec: ActivationSpec) -> ActivationMaps | None:
    """The maps of ``spec``, or None when netsurgeon has no local map for it."""
    return _cached(spec, registry_version())
