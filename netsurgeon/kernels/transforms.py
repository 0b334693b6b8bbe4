"""Activation transforms of DKS and TAT (docs/theory.md §4–§5): ``ψ(x) = γ (φ(α x + β) + δ)``.

Pure math: the transformed :class:`Activation`, and the solvers for its constants.

* :func:`solve_dks`: ``δ = -E[φ(αz+β)]`` (so ``C(0) = 0``), ``γ`` for ``Q(1) = 1``, and
  ``(α, β)`` with ``Q'(1) = 1``, ``C'(1) = ξ``.
* :func:`solve_tat`: ``γ`` for ``Q(1) = 1`` and ``(α, β, δ)`` with ``Q'(1) = 1``,
  ``C'(1) = 1``, ``C''(1) = κ`` (smooth activations).
* :func:`trelu_gain` and :func:`trelu_c_map`: TAT's tailored leaky ReLU
  ``sqrt(2/(1+a²)) · leaky_relu(x, a)``.

Example:
    >>> from netsurgeon.kernels import LocalMaps, get_activation
    >>> t = solve_dks(get_activation("tanh"), 1.0081422716)
    >>> maps = LocalMaps(transformed(get_activation("tanh"), *t))
    >>> round(maps.q1, 9), round(maps.q_slope_1(), 9), round(maps.c_slope_1(), 9)
    (1.0, 1.0, 1.008142272)
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
from scipy.optimize import brentq, root

from ..errors import InvalidArgumentError, TransformError
from .activations import Activation
from .quadrature import Piecewise, gauss_expectation

__all__ = ["Transform", "transformed", "solve_dks", "solve_tat", "trelu_gain", "trelu_c_map", "TransformError"]

_SOLVE_TOL = 1e-11  # residual accepted from the root finder


class _Degenerate(Exception):
    """ψ is constant over the Gaussian's reach (saturated or vanishing): no normalization exists."""


class Transform(NamedTuple):
    """The constants of ``ψ(x) = γ (φ(α x + β) + δ)``."""

    alpha: float
    beta: float
    gamma: float
    delta: float


def transformed(act: Activation, alpha: float, beta: float, gamma: float, delta: float) -> Activation:
    """The activation ``ψ(x) = γ (φ(α x + β) + δ)`` with its derivatives and kinks (α > 0)."""
    if not alpha > 0:
        raise InvalidArgumentError(f"alpha must be > 0, got {alpha!r}")
    a, b, g, d = float(alpha), float(beta), float(gamma), float(delta)
    leaky = act.leaky_slope if act.leaky_slope is not None and b == 0.0 and d == 0.0 and g > 0 else None
    params = act.params + (("alpha", a), ("beta", b), ("gamma", g), ("delta", d))
    return Activation(
        name=f"transformed_{act.name}",
        phi=lambda x: g * (act.phi(a * np.asarray(x, dtype=float) + b) + d),
        dphi=lambda x: g * a * act.dphi(a * np.asarray(x, dtype=float) + b),
        d2phi=lambda x: g * a * a * act.d2phi(a * np.asarray(x, dtype=float) + b),
        kinks=tuple(sorted((t - b) / a for t in act.kinks)),
        params=params,
        scale=None if act.scale is None else act.scale / a,
        centers=tuple((c - b) / a for c in act.centers),
        leaky_slope=leaky,
        leaky_gain=act.leaky_gain * g * a if leaky is not None else 1.0,
    )


def _expect(act: Activation, fn, alpha: float, beta: float) -> float:
    """E[fn(α z + β, z)] for z ~ N(0, 1), split at φ's kinks."""
    pw = Piecewise(lambda x: fn(x, (x - beta) / alpha), act.kinks, act.scale, act.centers)
    return float(gauss_expectation(pw, beta, alpha))


def _moments(act: Activation, alpha: float, beta: float, delta: float | None) -> dict[str, float]:
    """Q(1), Q'(1), C'(1), C''(1) and C(0) of ψ before the γ normalization (γ = 1)."""
    phi, dphi, d2phi = act.phi, act.dphi, act.d2phi
    mean = _expect(act, lambda x, z: phi(x), alpha, beta)
    d = -mean if delta is None else delta
    q1 = _expect(act, lambda x, z: (phi(x) + d) ** 2, alpha, beta)
    if not q1 > 1e-200:
        raise _Degenerate
    q_slope = 0.5 * _expect(act, lambda x, z: (phi(x) + d) ** 2 * (z * z - 1.0), alpha, beta)
    c_slope = alpha ** 2 * _expect(act, lambda x, z: dphi(x) ** 2, alpha, beta)
    c_curv = alpha ** 4 * _expect(act, lambda x, z: d2phi(x) ** 2, alpha, beta)
    return {"delta": d, "q1": q1, "q_slope": q_slope / q1, "c_slope": c_slope / q1, "c_curv": c_curv / q1,
            "c0": (mean + d) ** 2 / q1}


def _check_continuous(act: Activation, what: str, derivative: bool) -> None:
    if any(act.phi_jumps()) or (derivative and any(act.dphi_jumps())):
        kind = "its derivative jumps" if derivative and any(act.dphi_jumps()) else "it jumps"
        raise TransformError(f"{act} cannot take a {what} transform: {kind} at {act.kinks}, so C'(1)"
                             f"{' or C″(1)' if derivative else ''} is infinite")


def _best(solutions: list[np.ndarray]) -> np.ndarray:
    """The solution nearest the untransformed activation (α = 1, β = 0): smallest |log α| + |β|."""
    return min(solutions, key=lambda s: abs(math.log(s[0])) + abs(s[1]))


def solve_dks(act: Activation, xi: float) -> Transform:
    """DKS constants for local slope target ``ξ`` (docs/theory.md §4.2).

    Raises:
        TransformError: ``ξ <= 1``, φ jumps, or no ``(α, β)`` found from any starting point.
    """
    if not xi > 1.0:
        raise TransformError(f"the local C'(1) target must exceed 1, got {xi!r} (zeta too close to 1 for the depth?)")
    _check_continuous(act, "DKS", derivative=False)
    if act.leaky_slope is not None:
        return _solve_dks_homogeneous(act, xi)

    def residual(v: np.ndarray) -> np.ndarray:
        try:
            m = _moments(act, float(v[0]), float(v[1]), None) if v[0] > 0 else None
        except _Degenerate:
            m = None
        if m is None:
            return np.array([1e3, 1e3])
        return np.array([m["q_slope"] - 1.0, m["c_slope"] - xi])

    sols = []
    for a0, b0 in itertools.product((0.3, 1.0, 3.0, 0.1), (0.0, 0.5, -0.5, 1.5, -1.5)):
        r = root(residual, np.array([a0 * math.sqrt(xi - 1.0) * 4.0, b0]), method="hybr", options={"xtol": 1e-13})
        if r.x[0] > 0 and np.max(np.abs(residual(r.x))) < _SOLVE_TOL:
            sols.append(r.x)
        if len(sols) >= 3:
            break
    if not sols:
        raise TransformError(f"no (alpha, beta) gives Q'(1) = 1 and C'(1) = {xi:.10g} for {act}; DKS cannot "
                             f"shape this activation (try the tat pass, or a different activation)")
    a, b = _best(sols)
    m = _moments(act, float(a), float(b), None)
    return Transform(float(a), float(b), 1.0 / math.sqrt(m["q1"]), m["delta"])


def _solve_dks_homogeneous(act: Activation, xi: float) -> Transform:
    """The leaky-ReLU family: α only rescales β (φ is positively homogeneous), so only the shift
    is solved, for ``C'(1) = ξ``; ``Q'(1) = 1`` is then out of reach (DKS works poorly with ReLU:
    docs/theory.md §4.2) and the caller reports the achieved value."""
    def slope(beta: float) -> float:
        return _moments(act, 1.0, beta, None)["c_slope"] - xi

    lo, hi = (0.0, 8.0) if slope(0.0) > 0 else (-8.0, 0.0)  # C'(1) falls towards 1 as β grows
    if slope(lo) * slope(hi) > 0:
        raise TransformError(f"no shift gives C'(1) = {xi:.10g} for {act}")
    beta = brentq(slope, lo, hi, xtol=1e-14)
    m = _moments(act, 1.0, beta, None)
    return Transform(1.0, float(beta), 1.0 / math.sqrt(m["q1"]), m["delta"])


def solve_tat(act: Activation, kappa: float) -> Transform:
    """TAT constants for smooth activations (docs/theory.md §5.3): ``Q(1) = 1``, ``Q'(1) = 1``,
    ``C'(1) = 1``, ``C''(1) = κ``.

    Raises:
        TransformError: ``κ <= 0``, φ or φ' jumps, or no solution found.
    """
    if not kappa > 0:
        raise TransformError(f"the local C''(1) target must be > 0, got {kappa!r}")
    _check_continuous(act, "TAT", derivative=True)

    def residual(v: np.ndarray) -> np.ndarray:
        try:
            m = _moments(act, float(v[0]), float(v[1]), float(v[2])) if v[0] > 0 else None
        except _Degenerate:
            m = None
        if m is None:
            return np.array([1e3, 1e3, 1e3])
        return np.array([m["q_slope"] - 1.0, m["c_slope"] - 1.0, m["c_curv"] - kappa])

    sols = []
    scale = math.sqrt(kappa)
    for a0, b0, d0 in itertools.product((1.0, 0.3, 3.0), (0.0, 0.5, -0.5, 1.0, -1.0), (0.0, 1.0, -1.0)):
        x0 = np.array([a0 * scale, b0, d0])
        m0 = _moments(act, float(x0[0]), float(x0[1]), None)  # start δ at the centering value
        x0[2] = m0["delta"] + d0 * math.sqrt(m0["q1"])
        r = root(residual, x0, method="hybr", options={"xtol": 1e-13})
        if r.x[0] > 0 and np.max(np.abs(residual(r.x))) < _SOLVE_TOL:
            sols.append(r.x)
        if len(sols) >= 3:
            break
    if not sols:
        raise TransformError(f"no (alpha, beta, delta) gives Q'(1) = 1, C'(1) = 1, C''(1) = {kappa:.6g} for {act}")
    a, b, d = min(sols, key=lambda s: abs(math.log(s[0] / scale)) + abs(s[1]) + abs(s[2]))
    m = _moments(act, float(a), float(b), float(d))
    return Transform(float(a), float(b), 1.0 / math.sqrt(m["q1"]), float(d))


def trelu_gain(a: float) -> float:
    """``sqrt(2 / (1 + a²))``: the gain that gives the leaky ReLU ``Q(q) = q``."""
    return math.sqrt(2.0 / (1.0 + a * a))


def trelu_c_map(a: float, c: np.ndarray | float) -> np.ndarray:
    """C map of the (normalized) leaky ReLU with negative slope ``a`` (docs/theory.md §2.2)."""
    c = np.clip(np.asarray(c, dtype=float), -1.0, 1.0)
    relu = (np.sqrt(1.0 - c * c) + (np.pi - np.arccos(c)) * c) / np.pi
    return ((1.0 - a) ** 2 * relu + 2.0 * a * c) / (1.0 + a * a)
