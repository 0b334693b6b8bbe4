"""Activation transforms of DKS and TAT (docs/theory.md §4–§5): ``ψ(x) = γ (φ(α x + β) + δ)``.

Pure math: the transformed :class:`Activation`, and the solvers for its constants.

* :func:`solve_dks`: ``δ = -E[φ(αz+β)]`` (so ``C(0) = 0``), ``γ`` for ``Q(1) = 1``, and
  ``(α, β)`` with ``Q'(1) = 1``, ``C'(1) = ξ``; :func:`solve_dks_leaky`: the same conditions for
  the leaky ReLU, its negative slope solved with the constants.
* where several solutions exist, the tame one closest to φ (``_choose``: peak slope under twice
  the RMS slope, DeepMind dks' ``α·γ < 2``; then nearest ``(1, 0, 1, 0)``).
* :func:`solve_tat`: ``γ`` for ``Q(1) = 1`` and ``(α, β, δ)`` with ``Q'(1) = 1``,
  ``C'(1) = 1``, ``C''(1) = κ`` (smooth activations).
* :func:`solve_gate`: the gate ``ψ`` of a gated linear unit ``ψ(W₁x) ⊙ W₂x`` (SwiGLU, GeGLU):
  ``Q'(1) = 0`` (so the unit's Q map, ``Q_ψ(q)·q``, has slope 1 at ``q = 1``), ``γ`` for
  ``Q(1) = 1``, and either ``C'(1) = s`` (the unit's ``C'(1)`` is ``1 + s``: dks' ``ξ``) or the
  unit's ``C''(1) = C''_ψ(1) + 2 C'_ψ(1) = κ`` (tat); β from a fixed list, the smallest that solves.
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

__all__ = ["Transform", "transformed", "solve_dks", "solve_dks_leaky", "leaky_dks_slope", "peak_ratio", "solve_gate",
           "solve_tat", "trelu_gain", "trelu_c_map", "TransformError"]

_SOLVE_TOL = 1e-11  # residual accepted from the root finder
_TAME = 2.0  # a solution is tame when its peak_ratio is below this (DeepMind dks: α·γ < 2)
_ENOUGH = 2  # distinct solutions to collect (with a tame one) before the search stops


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


def _peak_slope(act: Activation) -> float:
    """``sup |φ'|`` (the Lipschitz constant), on a fine grid over [-50, 50] and both sides of each kink."""
    xs = np.concatenate([np.linspace(-50.0, 50.0, 40001)] + [np.array([t - 1e-9, t + 1e-9]) for t in act.kinks])
    with np.errstate(all="ignore"):
        values = np.abs(np.asarray(act.dphi(xs), dtype=float))
    peak = float(np.nanmax(values)) if np.any(np.isfinite(values)) else math.inf
    return peak if math.isfinite(peak) and peak > 0 else math.inf


def peak_ratio(act: Activation, t: Transform, c_slope: float, peak: float | None = None) -> float:
    """``sup |ψ'| / E[ψ'(z)²]^{1/2} = α γ sup|φ'| / sqrt(C'(1))``: how much steeper ψ gets anywhere than
    on average over its input. A solution whose Gaussian sits on a flat stretch of φ (saturated
    tanh or sigmoid, softplus' left tail) needs a large γ to reach its slope and has a large ratio.
    For ``sup|φ'| = 1`` (tanh, softplus) under TAT (``C'(1) = 1``) it is DeepMind dks' ``α·γ``."""
    peak = _peak_slope(act) if peak is None else peak
    return t.alpha * abs(t.gamma) * peak / math.sqrt(c_slope)


def _distance(t: Transform) -> float:
    """How far ``(α, β, γ, δ)`` is from the identity transform ``(1, 0, 1, 0)``."""
    return abs(math.log(t.alpha)) + abs(math.log(abs(t.gamma))) + abs(t.beta) + abs(t.delta)


def _choose(act: Activation, found: list[Transform], c_slope: float) -> Transform:
    """The solution to keep when several meet the conditions (docs/theory.md §4.2).

    Rule: prefer a *tame* solution, one with :func:`peak_ratio` ``< 2`` (DeepMind dks rejects TAT
    solutions with ``α·γ >= 2`` for having unstable Q maps and larger kernel approximation
    errors; the ratio is that test made independent of φ's scale, so sigmoid, whose slope is at
    most 1/4, is judged like tanh); among those (or among all when none is tame) the one closest to the
    untransformed activation, smallest ``|log α| + |log γ| + |β| + |δ|``; a tie (the mirror images of an odd φ)
    goes to the larger β. The mirror images of a point-symmetric φ's solutions are candidates too."""
    peak = _peak_slope(act)
    found = found + _mirrors(act, found)
    return min(found, key=lambda t: (peak_ratio(act, t, c_slope, peak) >= _TAME, round(_distance(t), 9), -t.beta))


def _mirrors(act: Activation, found: list[Transform]) -> list[Transform]:
    """For a point-symmetric φ (``φ(-x) = s - φ(x)``: tanh, sigmoid, ...) each solution's mirror image
    ``(α, -β, γ, -s - δ)``, ``ψ_m(x) = -ψ(-x)``: the same kernel maps, so it meets the same conditions."""
    xs = np.linspace(-6.0, 6.0, 121)
    with np.errstate(all="ignore"):
        sums = np.asarray(act.phi(xs), dtype=float) + np.asarray(act.phi(-xs), dtype=float)
    if not np.all(np.isfinite(sums)) or np.ptp(sums) > 1e-12 * max(1.0, float(np.max(np.abs(sums)))):
        return []
    s = float(sums[0])
    return [Transform(t.alpha, -t.beta, t.gamma, -s - t.delta) for t in found]


def _distinct(found: list[np.ndarray], x: np.ndarray) -> bool:
    return not any(np.allclose(x, s, rtol=0.0, atol=1e-7) for s in found)


def _search(residual, starts, done) -> list[np.ndarray]:
    """Roots of ``residual`` from ``starts`` (hybrid Powell), distinct; stops when ``done(roots)``."""
    sols: list[np.ndarray] = []
    for x0 in starts:
        r = root(residual, np.asarray(x0, dtype=float), method="hybr", options={"xtol": 1e-13, "maxfev": 400})
        if r.x[0] > 0 and np.max(np.abs(residual(r.x))) < _SOLVE_TOL and _distinct(sols, r.x):
            sols.append(r.x)
            if done(sols):
                break
    return sols


def _enough(act: Activation, c_slope: float, complete):
    """Stop the search once a tame solution and ``_ENOUGH`` distinct ones are known."""
    peak = _peak_slope(act)

    def done(sols: list[np.ndarray]) -> bool:
        return len(sols) >= _ENOUGH and any(peak_ratio(act, complete(s), c_slope, peak) < _TAME for s in sols)
    return done


def solve_dks(act: Activation, xi: float) -> Transform:
    """DKS constants for local slope target ``ξ`` (docs/theory.md §4.2); of several solutions, the
    one :func:`_choose` keeps.

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

    def complete(v: np.ndarray) -> Transform:
        m = _moments(act, float(v[0]), float(v[1]), None)
        return Transform(float(v[0]), float(v[1]), 1.0 / math.sqrt(m["q1"]), m["delta"])

    starts = [(a0 * math.sqrt(xi - 1.0) * 4.0, b0)
              for a0, b0 in itertools.product((0.3, 1.0, 3.0, 0.1), (0.0, 0.5, -0.5, 1.5, -1.5))]
    sols = _search(residual, starts, _enough(act, xi, complete))
    if not sols and homogeneous_degree(act) is not None:
        # s·relu(x)² + b: α only rescales β, as for ReLU; Q'(1) = 1 is dropped (the caller reports it)
        return _solve_dks_homogeneous(act, xi)
    if not sols:
        raise TransformError(f"no (alpha, beta) gives Q'(1) = 1 and C'(1) = {xi:.10g} for {act}; DKS cannot "
                             f"shape this activation (try the tat pass, or a different activation)")
    return _choose(act, [complete(s) for s in sols], xi)


def homogeneous_degree(act: Activation) -> float | None:
    """``p`` when φ is positively homogeneous of degree ``p > 0`` up to a constant,
    ``φ(t x) - φ(0) = t^p (φ(x) - φ(0))`` for ``t > 0`` (ReLU: 1; StarReLU's ``s·relu(x)² + b``: 2),
    checked at t = 2 on a grid; else None. Then ``φ(α x + β)`` is ``α^p φ(x + β/α)`` up to a
    constant, and α adds nothing a DKS or TAT transform does not already have in γ and δ."""
    x = np.concatenate([np.linspace(-4.0, -0.05, 40), np.linspace(0.05, 4.0, 40)])
    f0 = float(np.asarray(act.phi(np.zeros(1)), dtype=float)[0])
    base = np.asarray(act.phi(x), dtype=float) - f0
    doubled = np.asarray(act.phi(2.0 * x), dtype=float) - f0
    norm = float(base @ base)
    if not (norm > 0 and np.all(np.isfinite(doubled))):
        return None
    ratio = float(base @ doubled) / norm
    if not ratio > 1.0 or np.max(np.abs(doubled - ratio * base)) > 1e-9 * max(1.0, float(np.max(np.abs(doubled)))):
        return None
    return math.log2(ratio)


def _solve_dks_homogeneous(act: Activation, xi: float) -> Transform:
    """ReLU and the other members of the leaky-ReLU family with a fixed slope: α only rescales β
    (φ is positively homogeneous), so only the shift is solved, for ``C'(1) = ξ``; ``Q'(1) = 1`` is
    then out of reach (as in DeepMind dks, which drops that condition for ReLU; docs/theory.md
    §4.2) and the caller reports the achieved value. A leaky ReLU whose slope may change is
    solved by :func:`solve_dks_leaky` instead."""
    def slope(beta: float) -> float:
        return _moments(act, 1.0, beta, None)["c_slope"] - xi

    try:
        lo, hi = (0.0, 8.0) if slope(0.0) > 0 else (-8.0, 0.0)  # C'(1) falls towards 1 as β grows
        if slope(lo) * slope(hi) > 0:
            raise TransformError(f"no shift gives C'(1) = {xi:.10g} for {act}")
        beta = brentq(slope, lo, hi, xtol=1e-14)
    except _Degenerate:  # φ(x + β) constant over the Gaussian's reach on the way
        raise TransformError(f"no shift gives C'(1) = {xi:.10g} for {act}") from None
    m = _moments(act, 1.0, beta, None)
    return Transform(1.0, float(beta), 1.0 / math.sqrt(m["q1"]), m["delta"])


_LEAKY_XI_MAX = math.pi / (math.pi - 2.0)  # C'(1) of the centred |x| (a = -1): the unshifted family's reach


def leaky_dks_slope(a: float) -> float:
    """``C'(1)`` of the centred, unshifted leaky ReLU with negative slope ``a``:
    ``(1 + a²) / ((1 + a²) - (1 - a)²/π)``; it falls from π/(π - 2) at ``a = -1`` through
    ``1/(1 - 1/π)`` at ``a = 0`` (ReLU) to 1 at ``a = 1``."""
    return (1.0 + a * a) / ((1.0 + a * a) - (1.0 - a) ** 2 / math.pi)


def solve_dks_leaky(xi: float) -> tuple[float, Transform]:
    """DKS for the leaky ReLU with its negative slope ``a`` as a free constant, as DeepMind dks
    does: the slope and the transform ``ψ(x) = γ (leaky_relu(α x + β, a) + δ)`` meeting every
    condition, ``Q(1) = 1``, ``Q'(1) = 1``, ``C(0) = 0`` and ``C'(1) = ξ`` (docs/theory.md §4.2).

    Unshifted (α = 1, β = 0) the leaky ReLU is homogeneous, ``Q(q) ∝ q``, so ``Q'(1) = 1`` for every
    ``a``; centring (δ = -(1 - a)/sqrt(2π)) gives ``C(0) = 0``, γ gives ``Q(1) = 1``, and
    :func:`leaky_dks_slope` ``(a) = ξ`` has one root in (-1, 1) for ``1 < ξ < π/(π - 2) ≈ 2.75``:
    ``a = (1 - r)/(1 + sqrt(1 - (1 - r)²))`` with ``r = π (1 - 1/ξ)``. (dks finds the same
    point numerically: ``a = 0.876``, a shift of 0.) With a shift, solutions have ``|a| > 1`` or
    ``β ≠ 0`` and none reaches further (checked numerically), so this is the one kept.

    Returns:
        ``(a, transform)``.

    Raises:
        TransformError: ``ξ <= 1`` or ``ξ >= π/(π - 2)``.
    """
    if not xi > 1.0:
        raise TransformError(f"the local C'(1) target must exceed 1, got {xi!r} (zeta too close to 1 for the depth?)")
    if not xi < _LEAKY_XI_MAX:
        raise TransformError(f"the leaky ReLU reaches C'(1) = {xi:.10g} with Q'(1) = 1 for no negative slope: its "
                             f"reach is pi/(pi - 2) = {_LEAKY_XI_MAX:.6f} (a = -1, |x|); lower zeta, or use a smooth "
                             f"activation")
    r = math.pi * (1.0 - 1.0 / xi)
    a = (1.0 - r) / (1.0 + math.sqrt(max(0.0, 1.0 - (1.0 - r) ** 2)))
    var = (1.0 + a * a) / 2.0 - (1.0 - a) ** 2 / (2.0 * math.pi)
    return a, Transform(1.0, 0.0, 1.0 / math.sqrt(var), -(1.0 - a) / math.sqrt(2.0 * math.pi))


def solve_tat(act: Activation, kappa: float) -> Transform:
    """TAT constants for smooth activations (docs/theory.md §5.3): ``Q(1) = 1``, ``Q'(1) = 1``,
    ``C'(1) = 1``, ``C''(1) = κ``; of several solutions, the one :func:`_choose` keeps.

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

    def complete(v: np.ndarray) -> Transform:
        m = _moments(act, float(v[0]), float(v[1]), float(v[2]))
        return Transform(float(v[0]), float(v[1]), 1.0 / math.sqrt(m["q1"]), float(v[2]))

    def starts():
        scale = math.sqrt(kappa)
        for a0, b0, d0 in itertools.product((1.0, 0.3, 3.0), (0.0, 0.5, -0.5, 1.0, -1.0), (0.0, 1.0, -1.0)):
            x0 = np.array([a0 * scale, b0, d0])
            try:
                m0 = _moments(act, float(x0[0]), float(x0[1]), None)  # start δ at the centering value
            except _Degenerate:  # φ constant over the start's reach (relu² with β < 0 and a small α)
                continue
            x0[2] = m0["delta"] + d0 * math.sqrt(m0["q1"])
            yield x0

    sols = _search(residual, starts(), _enough(act, 1.0, complete))
    if not sols:
        raise TransformError(f"no (alpha, beta, delta) gives Q'(1) = 1, C'(1) = 1, C''(1) = {kappa:.6g} for {act}; "
                             f"TAT cannot shape this activation (try the dks pass, or a different activation)")
    return _choose(act, [complete(s) for s in sols], 1.0)


_GATE_BETAS = (0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 2.0, -2.0)  # tried in turn; odd φ (tanh) need β != 0


def solve_gate(act: Activation, c_slope: float | None = None, unit_curvature: float | None = None) -> Transform:
    """Constants of the gate ``ψ = γ (φ(α x + β) + δ)`` of a gated linear unit ``u = ψ(W₁x) ⊙ W₂x``
    (docs/theory.md §4.9). With independent weights and input q = 1 the unit's maps are
    ``Q_u(q) = Q_ψ(q)·q`` and ``C_u(c) = C_ψ(c)·c``; ``Q_ψ(1) = 1`` and ``Q'_ψ(1) = 0`` give ``Q_u(1) = 1``
    with slope 1 (slope 2 with an ordinary activation: finite-width deviations of q then double
    at every unit), and ``C_u(0) = 0`` holds whatever ψ is. The remaining condition is one of:

    * ``c_slope = s > 0``: ``C'_ψ(1) = s``, the unit's ``C'(1) = 1 + s`` (dks: ``s = ξ - 1``);
    * ``unit_curvature = κ > 0``: the unit's ``C''(1) = C''_ψ(1) + 2 C'_ψ(1) = κ`` (tat; the unit's
      ``C'(1)`` is then ``1 + C'_ψ(1)``, about ``1 + κ/2``: a gate's slope cannot be 0 unless it is constant).

    ``β`` is taken from ``0, ±0.5, ±1, ...``, the first that solves (``(α, δ)`` by root finding).

    Raises:
        TransformError: both or neither target given, a target <= 0, φ (or, for a curvature, φ')
            jumps, or no solution for any β.
    """
    if (c_slope is None) == (unit_curvature is None):
        raise TransformError("solve_gate needs exactly one of c_slope and unit_curvature")
    target = float(c_slope if c_slope is not None else unit_curvature)
    what = "C'(1)" if c_slope is not None else "unit C''(1)"
    if not (target > 0 and math.isfinite(target)):
        raise TransformError(f"the gate's {what} target must be positive and finite, got {target!r}")
    _check_continuous(act, "gate", derivative=unit_curvature is not None)

    for beta in _GATE_BETAS:
        def residual(v: np.ndarray) -> np.ndarray:
            try:
                m = _moments(act, float(v[0]), beta, float(v[1])) if v[0] > 0 else None
            except _Degenerate:
                m = None
            if m is None:
                return np.array([1e3, 1e3])
            reached = m["c_slope"] if c_slope is not None else m["c_curv"] + 2.0 * m["c_slope"]
            return np.array([m["q_slope"], reached - target])

        starts = itertools.product((0.3 * math.sqrt(target), math.sqrt(target), 1.0, 0.1, 3.0), (-1.0, 0.0, 1.0, -0.3))
        sols = _search(residual, starts, lambda found: bool(found))
        if sols:
            alpha, delta = map(float, sols[0])
            return Transform(alpha, beta, 1.0 / math.sqrt(_moments(act, alpha, beta, delta)["q1"]), delta)
    raise TransformError(f"no (alpha, delta) with beta in {_GATE_BETAS} gives Q'(1) = 0 and {what} = {target:.6g} "
                         f"for the gate {act}")


def trelu_gain(a: float) -> float:
    """``sqrt(2 / (1 + a²))``: the gain that gives the leaky ReLU ``Q(q) = q``."""
    return math.sqrt(2.0 / (1.0 + a * a))


def trelu_c_map(a: float, c: np.ndarray | float) -> np.ndarray:
    """C map of the (normalized) leaky ReLU with negative slope ``a`` (docs/theory.md §2.2)."""
    c = np.clip(np.asarray(c, dtype=float), -1.0, 1.0)
    relu = (np.sqrt(1.0 - c * c) + (np.pi - np.arccos(c)) * c) / np.pi
    return ((1.0 - a) ** 2 * relu + 2.0 * a * c) / (1.0 + a * a)
