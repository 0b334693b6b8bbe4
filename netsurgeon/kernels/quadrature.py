"""Gaussian expectations of piecewise-smooth functions, vectorized over parameters.

The numerics of docs/theory.md §2.3, in standardized coordinates (z ~ N(0, 1)):

- smooth integrands whose structure is resolved (``std <= 1.5 scale``): Gauss–Hermite
  (probabilists' weight, 200 nodes, nodes of weight below 1e-18 pruned);
- otherwise Gauss–Legendre panels (12 nodes each) on [-10, 10], split at -4, 0, 4, at
  every kink, and, when a smooth piece varies faster than the Gaussian
  (``std > 1.5 scale``), at points graded geometrically around the function's centers
  (``center ± scale·3^k``). A wider range such as [-14, 14] gains nothing: beyond ±10 the Gaussian
  mass is 1.5e-23, negligible for polynomially bounded functions.

Bivariate expectations condition on ``u`` and write ``v = ρ u + sqrt(1 - ρ²) w``: the
inner (w) panels are split where ``v`` crosses a split point, the outer (x) panels
where ``u`` does and, near ``|ρ| = 1``, around the kinks of ``v`` smoothed over a
width ``sqrt(1 - ρ²)/|ρ|``.

Example:
    >>> import numpy as np
    >>> round(float(gauss_expectation(Piecewise(np.abs, kinks=(0.0,)), 0.0, 1.0)), 10)  # sqrt(2/π)
    0.7978845608
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss
from numpy.typing import ArrayLike

__all__ = ["Piecewise", "Rule", "ACCURATE", "FAST", "gauss_expectation", "bivariate_expectation", "hermite_rule",
           "hermite_rule_2d"]

ArrayFn = Callable[[np.ndarray], np.ndarray]

HERMITE_NODES = 200  # Gauss–Hermite nodes per dimension (before pruning).
LEGENDRE_NODES = 12  # Gauss–Legendre nodes per panel.
HALF_WIDTH = 10.0  # panels cover [-10, 10] in standardized coordinates.
PANEL_BREAKS = (-4.0, 0.0, 4.0)  # fixed panel ends, besides the split points.
GRADE_ABOVE = 1.5  # grade around the centers when std / scale exceeds this.
NEAR_DIAGONAL = (-9.0, -3.0, -1.0, 1.0, 3.0, 9.0)  # outer splits around a smoothed kink, in units of its width.
_PRUNE = 1e-18  # Hermite nodes below this fraction of the largest weight are dropped.
_CHUNK = 1 << 16  # integrand evaluations per vectorized block (small enough to stay in cache).
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Rule:
    """Node counts of a quadrature: Gauss–Hermite per dimension, Gauss–Legendre per panel."""

    hermite: int = HERMITE_NODES
    legendre: int = LEGENDRE_NODES


ACCURATE = Rule()  # the local maps' rule: 1e-8 and better (tests/test_local_maps.py)
# Network propagation's rule: 3.5x fewer 2-D Hermite nodes and 8 Legendre nodes per panel; kernel values
# within 2e-6 of ACCURATE relative to Q(q) (tests/test_local_maps.py, q in [0.3, 5]). Activations that are
# polynomials between their kinks (ReLU6, hardswish...) bypass both rules: LocalMaps uses the exact
# closed form of .polynomial for them.
FAST = Rule(hermite=60, legendre=8)


@dataclass(frozen=True)
class Piecewise:
    """A function smooth between its ``kinks``, varying on a width ``scale`` around ``centers``.

    Args:
        fn: the function, vectorized over numpy arrays.
        kinks: points where fn or a derivative is discontinuous. Default: none.
        scale: width of the smooth pieces' structure (0.75 for tanh, 1.5/β for softplus), or
            None for polynomial pieces, which need no grading. Default: None.
        centers: where that structure sits. Default: ``(0.0,)``.
    """

    fn: ArrayFn
    kinks: tuple[float, ...] = ()
    scale: float | None = None
    centers: tuple[float, ...] = (0.0,)

    def resolved(self, std: np.ndarray) -> np.ndarray:
        """Elementwise: True where std <= 1.5 scale, so the smooth pieces need no grading."""
        if self.scale is None:
            return np.ones(np.shape(std), dtype=bool)
        return np.asarray(std) <= GRADE_ABOVE * self.scale

    def split_points(self, std: float) -> tuple[float, ...]:
        """Kinks, plus ``center ± scale·3^k`` up to the Gaussian's reach when std > 1.5 scale."""
        if self.scale is None or not std > GRADE_ABOVE * self.scale:
            return self.kinks
        top = math.ceil(math.log(HALF_WIDTH * std / self.scale, 3.0))
        steps = [self.scale * 3.0 ** k for k in range(top + 1)]
        graded = [c + sign * d for c in self.centers for d in steps for sign in (-1.0, 1.0)]
        return tuple(sorted(set(self.kinks) | set(self.centers) | set(graded)))


@lru_cache(maxsize=8)
def hermite_rule(n: int = HERMITE_NODES) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights with ``Σ w g(x) ≈ E[g(z)]``, z ~ N(0, 1); negligible nodes pruned."""
    x, w = hermegauss(n)
    w = w / w.sum()
    keep = w > _PRUNE * w.max()
    return x[keep], w[keep]


@lru_cache(maxsize=8)
def hermite_rule_2d(n: int = HERMITE_NODES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tensor-product rule ``(x, w, weight)`` for E[g(x, w)], x, w iid N(0, 1), pruned to a disk."""
    x, w = hermite_rule(n)
    xx, ww = np.meshgrid(x, x, indexing="ij")
    weight = np.outer(w, w)
    keep = weight > _PRUNE * weight.max()
    return xx[keep], ww[keep], weight[keep]


@lru_cache(maxsize=8)
def _legendre_rule(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on [-1, 1]."""
    return leggauss(n)


def _panel_rule(breaks: np.ndarray, nodes: int = LEGENDRE_NODES) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``z`` and weights ``w·ϕ(z)`` on [-10, 10] split at ``breaks`` (last axis; no NaN).

    Breaks outside the range give empty panels, which carry zero weight.
    """
    b = np.sort(np.clip(breaks, -HALF_WIDTH, HALF_WIDTH), axis=-1)
    edge = np.full(b.shape[:-1] + (1,), HALF_WIDTH)
    lo = np.concatenate([-edge, b], axis=-1)[..., None]
    half = 0.5 * (np.concatenate([b, edge], axis=-1)[..., None] - lo)
    xi, wi = _legendre_rule(nodes)
    z = (lo + half * (xi + 1.0)).reshape(b.shape[:-1] + (-1,))
    weight = (half * (wi * _INV_SQRT_2PI)).reshape(z.shape) * np.exp(-0.5 * z * z)
    return z, weight


def _standardized(points: tuple[float, ...], shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(t - shift) / scale`` for each point t (new last axis); a zero scale sends points out of range."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = (np.asarray(points, dtype=float) - shift[..., None]) / scale[..., None]
    return np.where(np.isnan(out), np.inf, out)


def _distinct_columns(breaks: np.ndarray) -> np.ndarray:
    """Drop break columns that repeat an earlier column or lie out of range for every element."""
    keep: list[int] = []
    for j in range(breaks.shape[-1]):
        col = breaks[..., j]
        if np.all(~(np.abs(col) < HALF_WIDTH)) or any(np.array_equal(col, breaks[..., i]) for i in keep):
            continue
        keep.append(j)
    return breaks[..., keep]


def _with_fixed(cols: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The break columns ``cols`` plus the fixed panel ends, as one array of shape ``shape + (B,)``."""
    fixed = np.broadcast_to(np.asarray(PANEL_BREAKS), shape + (len(PANEL_BREAKS),))
    return np.concatenate([np.broadcast_to(c, shape + c.shape[-1:]) for c in cols] + [fixed], axis=-1)


def gauss_expectation(p: Piecewise, mean: ArrayLike, std: ArrayLike) -> np.ndarray:
    """E[p.fn(mean + std·z)] for z ~ N(0, 1), elementwise over ``broadcast(mean, std)``.

    Gauss–Hermite where p has no split points at that std, panels elsewhere.
    """
    mean_b, std_b = np.broadcast_arrays(np.asarray(mean, dtype=float), np.asarray(std, dtype=float))
    m, s = mean_b.ravel(), std_b.ravel()
    out = np.empty(m.shape)
    for mask in _regimes(p.resolved(s)):
        mm, ss = m[mask], s[mask]
        points = p.split_points(float(ss.max()))
        if not points:
            z, w = hermite_rule()
            out[mask] = p.fn(mm[:, None] + ss[:, None] * z) @ w
        else:
            z, w = _panel_rule(_distinct_columns(_with_fixed([_standardized(points, mm, ss)], mm.shape)))
            out[mask] = np.sum(w * p.fn(mm[:, None] + ss[:, None] * z), axis=-1)
    return out.reshape(mean_b.shape)


def _regimes(resolved: np.ndarray) -> list[np.ndarray]:
    """The non-empty masks of elements whose scale is resolved, and of the others."""
    return [mask for mask in (resolved, ~resolved) if np.any(mask)]


def _bivariate_hermite(f: ArrayFn, g: ArrayFn, sd1: np.ndarray, sd2: np.ndarray, rho: np.ndarray,
                       s: np.ndarray, rule: Rule) -> np.ndarray:
    """E[f(sd1 x) g(sd2 (ρx + s w))] by 2-D Gauss–Hermite; assumes f, g smooth and resolved."""
    x, w, weight = hermite_rule_2d(rule.hermite)
    out = np.empty(sd1.shape)
    step = max(1, _CHUNK // x.size)
    fu_all = f(sd1[0] * x) * weight if np.all(sd1 == sd1[0]) else None
    for a in range(0, sd1.size, step):
        sl = slice(a, a + step)
        fu = fu_all if fu_all is not None else f(sd1[sl, None] * x) * weight
        out[sl] = np.sum(fu * g(sd2[sl, None] * (rho[sl, None] * x + s[sl, None] * w)), axis=-1)
    return out


def _bivariate_panels(f: Piecewise, g: Piecewise, sd1: np.ndarray, sd2: np.ndarray, rho: np.ndarray,
                      s: np.ndarray, near: bool, rule: Rule) -> np.ndarray:
    """E[f(sd1 x) g(sd2 (ρx + s w))] by Gauss–Legendre panels in x and, for each x, in w.

    Outer splits: where u crosses a split point of f, where v crosses one of g at w = 0
    and, when ``near`` (|ρ| > 1/sqrt(2)), at ``± m s/|ρ|`` around the kinks of g, where
    the inner expectation is a kink smoothed over that width.
    Inner splits: ``(t/sd2 - ρx)/s`` for every split point t of g.
    """
    zero = np.zeros_like(sd1)
    split_g = g.split_points(float(sd2.max()))
    tau_g = _standardized(split_g, zero, sd2)  # split points of g in units of sd2
    cols = [_standardized(f.split_points(float(sd1.max())), zero, sd1), _standardized(split_g, zero, sd2 * rho)]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if near and g.kinks:
            kink_x = _standardized(g.kinks, zero, sd2 * rho)
            width = (s / np.abs(rho))[:, None, None]
            around = (kink_x[:, :, None] + width * np.asarray(NEAR_DIAGONAL)).reshape(sd1.size, -1)
            cols.append(np.where(np.isnan(around), np.inf, around))
    outer = _distinct_columns(_with_fixed(cols, sd1.shape))
    n_outer = (outer.shape[-1] + 1) * rule.legendre
    n_inner = (len(split_g) + len(PANEL_BREAKS) + 1) * rule.legendre
    out = np.empty(sd1.shape)
    step = max(1, _CHUNK // (n_inner * n_outer))
    for a in range(0, sd1.size, step):
        sl = slice(a, a + step)
        x, wx = _panel_rule(outer[sl], rule.legendre)  # (e, Po)
        shift = rho[sl, None] * x
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inner = (tau_g[sl, None, :] - shift[..., None]) / s[sl, None, None]
        w, ww = _panel_rule(_with_fixed([np.where(np.isnan(inner), np.inf, inner)], shift.shape), rule.legendre)
        gv = g.fn(sd2[sl, None, None] * (shift[..., None] + s[sl, None, None] * w))
        out[sl] = np.sum(wx * f.fn(sd1[sl, None] * x) * np.sum(ww * gv, axis=-1), axis=-1)
    return out


def bivariate_expectation(f: Piecewise, g: Piecewise, q1: ArrayLike, q2: ArrayLike, k: ArrayLike,
                          rule: Rule = ACCURATE) -> np.ndarray:
    """E[f(u) g(v)] for (u, v) ~ N(0, [[q1, k], [k, q2]]), elementwise over broadcast inputs.

    Assumes ``q1, q2 >= 0`` and ``|k| <= sqrt(q1 q2)`` (the correlation is clipped to [-1, 1]).
    Written as ``u = sqrt(q1) x``, ``v = sqrt(q2) (ρ x + sqrt(1 - ρ²) w)`` (docs/theory.md §2.3).
    """
    q1_b, q2_b, k_b = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (q1, q2, k)))
    sd1, sd2 = np.sqrt(q1_b.ravel()), np.sqrt(q2_b.ravel())
    prod = sd1 * sd2
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.clip(np.where(prod > 0, k_b.ravel() / np.where(prod > 0, prod, 1.0), 0.0), -1.0, 1.0)
    s = np.sqrt(np.clip(1.0 - rho * rho, 0.0, None))
    out = np.empty(sd1.shape)
    near = s < np.abs(rho)  # |ρ| > 1/sqrt(2): a smoothed kink narrower than the panels
    for group in _regimes(f.resolved(sd1) & g.resolved(sd2)):
        if not f.split_points(float(sd1[group].max())) and not g.split_points(float(sd2[group].max())):
            out[group] = _bivariate_hermite(f.fn, g.fn, sd1[group], sd2[group], rho[group], s[group], rule)
            continue
        for mask, is_near in ((group & near, True), (group & ~near, False)):
            if np.any(mask):
                out[mask] = _bivariate_panels(f, g, sd1[mask], sd2[mask], rho[mask], s[mask], is_near, rule)
    return out.reshape(q1_b.shape)
