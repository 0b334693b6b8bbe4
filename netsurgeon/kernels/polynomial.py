"""Closed-form Gaussian expectations of piecewise-polynomial activations.

For φ polynomial between its kinks (ReLU6, hardtanh, hardsigmoid, hardswish, hard mish,
softshrink, hardshrink, and their DKS/TAT transforms), ``E[φ(u) ψ(v)]`` with
``(u, v) ~ N(0, [[q1, k], [k, q2]])`` is a finite sum of truncated bivariate normal moments
``F_kl = E[x^k y^l 1{x ∈ A, y ∈ B}]`` over rectangles, in standardized coordinates
``x = u/√q1``, ``y = v/√q2`` with correlation ρ. They follow from Stein's identity
``E[X h(X, Y)] = E[∂_x h] + ρ E[∂_y h]`` with ``h = X^{k-1} Y^l 1_R`` (the derivative of the
indicator gives edge terms ``t^{k-1} ϕ(t) E[Y^l 1_B(Y) | X = t]``, univariate truncated
moments of ``N(ρt, 1 - ρ²)``), down to the rectangle probabilities ``F_00``: bivariate normal
CDFs by Owen's T function (Owen, "Tables for computing bivariate normal probabilities",
Ann. Math. Statist. 27, 1956, eq. 2.1; ``scipy.special.owens_t``). At ``|ρ| = 1``, ``y = ±x``
and every ``F_kl`` is a univariate truncated moment.

The pieces are found numerically (:func:`polynomial_pieces`): a polynomial of degree at most
``MAX_DEGREE`` is fitted on each piece and accepted only if it reproduces φ at other points to
``FIT_TOL``. Activations whose pieces are not polynomials (ELU, softsign...) get None and keep
the quadrature of :mod:`.quadrature`.

Example:
    >>> import numpy as np
    >>> p = polynomial_pieces(lambda x: np.clip(x, 0.0, 6.0), (0.0, 6.0))
    >>> p.degree, [round(float(c), 12) + 0.0 for c in p.coefs[1]]  # on (0, 6): 0 + 1·x
    (1, [0.0, 1.0])
    >>> round(float(bivariate_moment_expectation(p, p, 1.0, 1.0, 0.0)), 10)  # E[relu6(z)]²: 1/(2π) less 1.3e-10
    0.159154943
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import ndtr, owens_t

__all__ = ["PolynomialPieces", "polynomial_pieces", "bivariate_moment_expectation", "bvn_cdf"]

ArrayFn = Callable[[np.ndarray], np.ndarray]

MAX_DEGREE = 4  # highest polynomial degree a piece may have
FIT_TOL = 1e-11  # a fit must reproduce φ to this, relative to max(1, |φ|) on the checked points
_REACH = 8.0  # an unbounded piece is fitted on [t, t + 8] (resp. [t - 8, t]) and checked out to ±40
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True, eq=False)
class PolynomialPieces:
    """φ(x) = Σ_k coefs[i, k] x^k for edges[i] < x < edges[i + 1] (edges[0] = -inf, edges[-1] = inf)."""

    edges: np.ndarray  # (P + 1,)
    coefs: np.ndarray  # (P, degree + 1)

    @property
    def degree(self) -> int:
        """The highest degree of any piece."""
        return self.coefs.shape[1] - 1

    def __call__(self, x: ArrayLike) -> np.ndarray:
        """φ(x) from the pieces (the value at an edge is the right piece's)."""
        x = np.asarray(x, dtype=float)
        i = np.clip(np.searchsorted(self.edges, x, side="right") - 1, 0, len(self.coefs) - 1)
        return np.sum(self.coefs[i] * x[..., None] ** np.arange(self.degree + 1), axis=-1)


def _sample_points(lo: float, hi: float, n: int) -> np.ndarray:
    """n Chebyshev points strictly inside (lo, hi); a half-line is sampled over _REACH from its end."""
    if math.isinf(lo) and math.isinf(hi):
        lo, hi = -_REACH, _REACH
    elif math.isinf(lo):
        lo = hi - _REACH
    elif math.isinf(hi):
        hi = lo + _REACH
    t = np.cos(np.pi * (np.arange(n) + 0.5) / n)
    return 0.5 * (lo + hi) + 0.5 * (hi - lo) * t


def _check_points(lo: float, hi: float) -> np.ndarray:
    """Points to verify a fit on: inside (lo, hi) and, on a half-line, far out (to ±40)."""
    inside = _sample_points(lo, hi, 2 * MAX_DEGREE + 3)
    far = []
    if math.isinf(hi):
        far += [max(lo, -_REACH) + d for d in (11.0, 23.0, 40.0)]
    if math.isinf(lo):
        far += [min(hi, _REACH) - d for d in (11.0, 23.0, 40.0)]
    return np.concatenate([inside, np.asarray(far, dtype=float)])


def _fit_piece(fn: ArrayFn, lo: float, hi: float) -> np.ndarray | None:
    """Monomial coefficients of the lowest-degree polynomial equal to fn on (lo, hi), or None."""
    check = _check_points(lo, hi)
    with np.errstate(all="ignore"):
        want = np.asarray(fn(check), dtype=float)
    if not np.all(np.isfinite(want)):
        return None
    tol = FIT_TOL * max(1.0, float(np.max(np.abs(want))))
    for degree in range(MAX_DEGREE + 1):
        x = _sample_points(lo, hi, degree + 1)
        with np.errstate(all="ignore"):
            y = np.asarray(fn(x), dtype=float)
        if not np.all(np.isfinite(y)):
            return None
        coefs = np.polynomial.polynomial.polyfit(x, y, degree)
        if np.max(np.abs(np.polynomial.polynomial.polyval(check, coefs) - want)) <= tol:
            return coefs
    return None


def polynomial_pieces(fn: ArrayFn, kinks: tuple[float, ...]) -> PolynomialPieces | None:
    """φ as polynomials between its kinks, or None when a piece is not a polynomial of degree <= 4.

    Assumes fn is vectorized over numpy arrays and ``kinks`` are all the points where it changes
    formula. The fit is checked on points other than those it was fitted on, and on unbounded
    pieces out to 40 beyond the last kink, so a smooth non-polynomial piece is refused.
    """
    edges = np.concatenate([[-np.inf], np.sort(np.asarray(kinks, dtype=float)), [np.inf]])
    pieces = [_fit_piece(fn, float(lo), float(hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    if any(p is None for p in pieces):
        return None
    degree = max(len(p) for p in pieces) - 1
    coefs = np.zeros((len(pieces), degree + 1))
    for i, p in enumerate(pieces):
        coefs[i, :len(p)] = p
    return PolynomialPieces(edges, coefs)


# ----------------------------------------------------------------- Gaussian building blocks
def _edge_weights(t: np.ndarray, order: int) -> list[np.ndarray]:
    """``t^m ϕ(t)`` for m = 0..order, and 0 at t = ±inf."""
    finite = np.isfinite(t)
    tf = np.where(finite, t, 0.0)
    out = [np.where(finite, _INV_SQRT_2PI * np.exp(-0.5 * tf * tf), 0.0)]
    for _ in range(order):
        out.append(out[-1] * tf)
    return out


def _interval_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(a < z < b) for z ~ N(0, 1), 0 when b <= a; upper tails taken from the right for accuracy."""
    upper = a > 0
    mass = np.where(upper, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))
    return np.where(b > a, mass, 0.0)


def _truncated_moments(a: np.ndarray, b: np.ndarray, order: int) -> list[np.ndarray]:
    """``M_r = ∫_a^b z^r ϕ(z) dz`` for r = 0..order (0 where b <= a), by
    ``M_r = (r - 1) M_{r-2} + a^{r-1} ϕ(a) - b^{r-1} ϕ(b)``."""
    empty = ~(b > a)
    a, b = np.where(empty, 0.0, a), np.where(empty, 0.0, b)
    out = [_interval_mass(a, b)]
    wa, wb = _edge_weights(a, order - 1), _edge_weights(b, order - 1)
    for r in range(1, order + 1):
        prev = (r - 1) * out[r - 2] if r >= 2 else 0.0
        out.append(prev + wa[r - 1] - wb[r - 1])
    return out


def _minus_rho_times(a: np.ndarray, t: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``a - ρt``, accurate near |ρ| = 1: ``(a - σt) + (σ - ρ)t`` with σ = sign ρ (σ - ρ is exact
    for |ρ| >= 1/2), so that a = t (equal edges) leaves no rounding error of ρt behind."""
    sign = np.where(rho < 0, -1.0, 1.0)
    return (a - sign * t) + (sign - rho) * t


def _owen(h: np.ndarray, k: np.ndarray, rho: np.ndarray, s: np.ndarray) -> np.ndarray:
    """:func:`bvn_cdf` for finite h and k (1-D arrays of one length)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a_h = np.where(h != 0, _minus_rho_times(k, h, rho) / (h * s), np.where(k >= 0, np.inf, -np.inf))
        a_k = np.where(k != 0, _minus_rho_times(h, k, rho) / (k * s), np.where(h >= 0, np.inf, -np.inf))
    beta = np.where((h >= 0) != (k >= 0), 0.5, 0.0)
    out = 0.5 * ndtr(h) + 0.5 * ndtr(k) - owens_t(h, a_h) - owens_t(k, a_k) - beta
    return np.where((h == 0) & (k == 0), 0.25 + np.arcsin(rho) / (2.0 * np.pi), out)


def bvn_cdf(h: ArrayLike, k: ArrayLike, rho: ArrayLike, s: ArrayLike) -> np.ndarray:
    """P(X < h, Y < k) for a standard bivariate normal with correlation ρ, ``s = sqrt(1 - ρ²) > 0``.

    Owen (1956): ``Φ(h)/2 + Φ(k)/2 - T(h, a_h) - T(k, a_k) - β`` with
    ``a_h = (k - ρh)/(h s)``, ``a_k = (h - ρk)/(k s)`` and ``β = 1/2`` when h and k have opposite
    signs (a zero counted as positive; the limit ``a = ±inf`` is taken from that side), else 0.
    ``h`` or ``k`` may be ±inf (then a univariate CDF, or 0 or 1); Owen's T is evaluated only where
    both are finite.
    """
    h, k, rho, s = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (h, k, rho, s)))
    out = np.where(np.isposinf(h), ndtr(np.where(np.isfinite(k), k, 1.0)), 0.0)
    out = np.where(np.isposinf(k), ndtr(np.where(np.isfinite(h), h, 1.0)), out)
    out[np.isposinf(h) & np.isposinf(k)] = 1.0
    out[np.isneginf(h) | np.isneginf(k)] = 0.0
    finite = np.isfinite(h) & np.isfinite(k)
    out[finite] = _owen(h[finite], k[finite], rho[finite], s[finite])
    return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------- rectangle moments
def _conditional_moments(t: np.ndarray, lo: np.ndarray, hi: np.ndarray, rho: np.ndarray, s: np.ndarray,
                         order: int) -> list[np.ndarray]:
    """``E[Y^l 1{lo < Y < hi} | X = t]`` for l = 0..order, with ``Y | X = t ~ N(ρt, s²)``, s > 0.

    Shapes: t (n, E, 1), lo and hi (n, 1, P), rho and s (n, 1, 1); infinite t gives finite junk
    (its edge weight is 0).
    """
    t = np.where(np.isfinite(t), t, 0.0)
    mean = rho * t
    with np.errstate(invalid="ignore"):
        m = _truncated_moments(_minus_rho_times(lo, t, rho) / s, _minus_rho_times(hi, t, rho) / s, order)
    out = []
    for l in range(order + 1):
        out.append(sum(math.comb(l, r) * mean ** (l - r) * s ** r * m[r] for r in range(l + 1)))
    return out


def _rectangle_moments(xe: np.ndarray, ye: np.ndarray, rho: np.ndarray, s: np.ndarray, dx: int, dy: int
                       ) -> np.ndarray:
    """``F[k, l] = E[x^k y^l 1{xe_i < x < xe_{i+1}, ye_j < y < ye_{j+1}}]``, shape (dx+1, dy+1, n, P, Q).

    ``xe`` (n, P + 1) and ``ye`` (n, Q + 1): standardized edges; ρ, s: (n,), with s > 0.
    """
    r3, s3 = rho[:, None, None], s[:, None, None]
    corners = bvn_cdf(xe[:, :, None], ye[:, None, :], r3, s3)  # (n, P+1, Q+1)
    f00 = corners[:, 1:, 1:] - corners[:, :-1, 1:] - corners[:, 1:, :-1] + corners[:, :-1, :-1]
    # edge terms: G[l] (n, P+1, Q) = E[y^l 1_B_j | x = xe_e]; H[k] (n, Q+1, P) = E[x^k 1_A_i | y = ye_e]
    g = _conditional_moments(xe[:, :, None], ye[:, None, :-1], ye[:, None, 1:], r3, s3, max(dy, 0))
    h = _conditional_moments(ye[:, :, None], xe[:, None, :-1], xe[:, None, 1:], r3, s3, max(dx - 1, 0))
    wx = [w[:, :, None] for w in _edge_weights(xe, dx)]  # (n, P+1, 1)
    wy = [w[:, :, None] for w in _edge_weights(ye, dy)]  # (n, Q+1, 1)

    def bx(m: int, l: int) -> np.ndarray:
        """x-edge terms: lo^m ϕ(lo) G_l(lo) - hi^m ϕ(hi) G_l(hi), shape (n, P, Q)."""
        t = wx[m] * g[l]
        return t[:, :-1] - t[:, 1:]

    def by(m: int, k: int) -> np.ndarray:
        """y-edge terms, shape (n, P, Q)."""
        t = wy[m] * h[k]  # (n, Q+1, P)
        return np.swapaxes(t[:, :-1] - t[:, 1:], 1, 2)

    f = np.empty((dx + 1, dy + 1) + f00.shape)
    f[0, 0] = f00
    for l in range(1, dy + 1):  # E[Y h], h = Y^{l-1} 1_R
        f[0, l] = (l - 1) * (f[0, l - 2] if l >= 2 else 0.0) + by(l - 1, 0) + r3 * bx(0, l - 1)
    for k in range(1, dx + 1):  # E[X h], h = X^{k-1} Y^l 1_R
        for l in range(dy + 1):
            f[k, l] = ((k - 1) * (f[k - 2, l] if k >= 2 else 0.0) + bx(k - 1, l)
                       + r3 * ((l * f[k - 1, l - 1] if l >= 1 else 0.0) + by(l, k - 1)))
    return f


def _degenerate_moments(xe: np.ndarray, ye: np.ndarray, rho: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The same moments when y = ρx, ρ = ±1: ``ρ^l ∫ x^{k+l} ϕ`` over A_i ∩ {ρx ∈ B_j}."""
    r3 = rho[:, None, None]
    y_lo, y_hi = ye[:, None, :-1] * r3, ye[:, None, 1:] * r3  # {ρx ∈ B_j} as an x-interval
    lo = np.maximum(xe[:, :-1, None], np.minimum(y_lo, y_hi))
    hi = np.minimum(xe[:, 1:, None], np.maximum(y_lo, y_hi))
    m = _truncated_moments(lo, hi, dx + dy)
    f = np.empty((dx + 1, dy + 1) + lo.shape)
    for k in range(dx + 1):
        for l in range(dy + 1):
            f[k, l] = r3 ** l * m[k + l]
    return f


def bivariate_moment_expectation(f: PolynomialPieces, g: PolynomialPieces, q1: ArrayLike, q2: ArrayLike,
                                 k: ArrayLike) -> np.ndarray:
    """E[f(u) g(v)] for (u, v) ~ N(0, [[q1, k], [k, q2]]), elementwise over broadcast inputs; exact.

    Assumes ``q1, q2 > 0`` (the caller keeps zero variances for the quadrature) and
    ``|k| <= sqrt(q1 q2)`` (the correlation is clipped to [-1, 1]). Returns a float array of the
    broadcast shape.
    """
    q1_b, q2_b, k_b = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (q1, q2, k)))
    sd1, sd2 = np.sqrt(q1_b.ravel()), np.sqrt(q2_b.ravel())
    rho = np.clip(k_b.ravel() / (sd1 * sd2), -1.0, 1.0)
    s = np.sqrt((1.0 - np.abs(rho)) * (1.0 + np.abs(rho)))  # accurate near |ρ| = 1
    xe, ye = f.edges[None, :] / sd1[:, None], g.edges[None, :] / sd2[:, None]
    a = f.coefs[None] * sd1[:, None, None] ** np.arange(f.degree + 1)  # (n, P, dx+1), in x units
    b = g.coefs[None] * sd2[:, None, None] ** np.arange(g.degree + 1)
    out = np.empty(sd1.shape)
    inner, line = s > 0, ~(s > 0)  # |ρ| < 1, and |ρ| = 1 (y = ±x)
    if np.any(inner):
        fm = _rectangle_moments(xe[inner], ye[inner], rho[inner], s[inner], f.degree, g.degree)
        out[inner] = np.einsum("nik,njl,klnij->n", a[inner], b[inner], fm)
    if np.any(line):
        fm = _degenerate_moments(xe[line], ye[line], rho[line], f.degree, g.degree)
        out[line] = np.einsum("nik,njl,klnij->n", a[line], b[line], fm)
    return out.reshape(q1_b.shape)
