"""Local Q and C maps of an elementwise activation (docs/theory.md §2).

With z ~ N(0, 1) and (u, v) standard bivariate normal with correlation c:
``Q(q) = E[φ(√q z)²]``, ``C(c) = E[φ(u)φ(v)] / Q(1)``, ``C'(c) = E[φ'(u)φ'(v)] / Q(1)``
(Price's theorem), and the general ``k_out = E[φ(u)φ(v)]`` for
``(u, v) ~ N(0, [[q1, k], [k, q2]])``. These are the per-layer maps of the kernel
analysis of deep networks (Martens et al., "Rapid training of deep neural networks
without skip connections or normalization layers using Deep Kernel Shaping",
arXiv:2110.01765, §3–4; Zhang et al., "Deep Learning without Shortcuts: Shaping the
Kernel with Tailored Rectifiers", arXiv:2203.08120, §3).

ReLU, leaky ReLU, PReLU, abs and identity use the closed form
``E[φ(u)φ(v)] = sqrt(q1 q2) [(1 - a)² f(ρ) + a ρ]`` with
``f(ρ) = (sqrt(1 - ρ²) + (π - arccos ρ) ρ) / (2π)``. Activations that are polynomials between
their kinks (``scale`` None: ReLU6, hardtanh, hardswish, softshrink...) use the closed form of
:mod:`netsurgeon.kernels.polynomial` for ``kernel_map`` (and so ``c_map``); every other
activation, and every other map, uses the quadrature of :mod:`netsurgeon.kernels.quadrature`.

Example:
    >>> from netsurgeon.kernels import LocalMaps, get_activation
    >>> maps = LocalMaps(get_activation("relu"))
    >>> round(float(maps.c0()), 10), float(maps.c_slope_1())
    (0.3183098862, 1.0)
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Callable

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidArgumentError
from .activations import Activation, get_activation
from .polynomial import PolynomialPieces, bivariate_moment_expectation, polynomial_pieces
from .quadrature import ACCURATE, Piecewise, Rule, bivariate_expectation, gauss_expectation

__all__ = ["LocalMaps", "relu_kernel"]

_TOL = 1e-8  # how far outside its range an input may be (rounding) before it is refused


def relu_kernel(rho: ArrayLike) -> np.ndarray:
    """E[relu(u) relu(v)] for unit variances and correlation ρ (docs/theory.md §2.2).

    ``(sqrt(1 - ρ²) + (π - arccos ρ) ρ) / (2π)``: the degree-1 arc-cosine kernel
    (Cho & Saul, "Kernel Methods for Deep Learning", NeurIPS 2009, §2.1).
    """
    r = np.clip(np.asarray(rho, dtype=float), -1.0, 1.0)
    return (np.sqrt(1.0 - r * r) + (np.pi - np.arccos(r)) * r) / (2.0 * np.pi)


def _as_output(x: np.ndarray) -> np.ndarray | float:
    """A float for 0-d results, the array otherwise."""
    return float(x) if np.ndim(x) == 0 else x


def _checked_correlation(c: ArrayLike, name: str = "c") -> np.ndarray:
    """c as an array, clipped to [-1, 1]; ValueError beyond rounding."""
    arr = np.asarray(c, dtype=float)
    if np.any(~(np.abs(arr) <= 1.0 + _TOL)):
        raise InvalidArgumentError(f"{name} must lie in [-1, 1]; got values up to {np.nanmax(np.abs(arr))!r}")
    return np.clip(arr, -1.0, 1.0)


def _checked_variance(q: ArrayLike, name: str) -> np.ndarray:
    """q as an array; ValueError when negative or not finite."""
    arr = np.asarray(q, dtype=float)
    if np.any(~(arr >= 0)) or np.any(~np.isfinite(arr)):
        raise InvalidArgumentError(f"{name} must be a finite variance >= 0; got minimum {np.min(arr)!r}")
    return arr


class LocalMaps:
    """The Q and C maps of one activation, vectorized over numpy arrays.

    Args:
        activation: an :class:`Activation`, or anything :func:`get_activation` accepts
            (name, ``ActivationSpec``, callable).
        **params: parameters passed on to :func:`get_activation`.

    Example:
        >>> maps = LocalMaps("tanh")
        >>> round(float(maps.q_map(1.0)), 4)
        0.3943
    """

    def __init__(self, activation: Any, **params: Any) -> None:
        self.activation: Activation = get_activation(activation, **params)
        self._a = self.activation.leaky_slope
        self._g2 = self.activation.leaky_gain ** 2  # closed forms of g (relu(x) - a relu(-x))

    def __repr__(self) -> str:
        return f"LocalMaps({self.activation})"

    # ------------------------------------------------------------------ 1-D maps
    def _piecewise(self, fn: Callable[[np.ndarray], np.ndarray]) -> Piecewise:
        """``fn`` (φ, φ', φ², ...) with the activation's kinks, scale and centers."""
        act = self.activation
        return Piecewise(fn, act.kinks, act.scale, act.centers)

    def _expect(self, fn: Callable[[np.ndarray], np.ndarray], q: ArrayLike = 1.0) -> np.ndarray:
        """E[fn(√q z)], split at the activation's kinks."""
        return gauss_expectation(self._piecewise(fn), 0.0, np.sqrt(q))

    def q_map(self, q: ArrayLike) -> np.ndarray | float:
        """Q(q) = E[φ(√q z)²], the output q value for input q value ``q`` (docs/theory.md §2.1)."""
        q_arr = _checked_variance(q, "q")
        if self._a is not None:
            return _as_output(q_arr * self._g2 * (1.0 + self._a ** 2) / 2.0)
        phi = self.activation.phi
        return _as_output(self._expect(lambda x: phi(x) ** 2, q_arr))

    @cached_property
    def q1(self) -> float:
        """Q(1) = E[φ(z)²], the normalizer of the C maps."""
        return float(self.q_map(1.0))

    def q_slope_1(self) -> float:
        """Q'(1) = E[φ(z)φ'(z)z], assuming input q value 1.

        Computed as ``E[φ(z)² (z² - 1)] / 2`` (the q-derivative of the Gaussian density),
        which equals E[φφ'z] by integration by parts and needs no derivative of φ.
        """
        if self._a is not None:
            return self._g2 * (1.0 + self._a ** 2) / 2.0
        phi = self.activation.phi
        return 0.5 * float(self._expect(lambda x: phi(x) ** 2 * (x * x - 1.0)))

    def c0(self) -> float:
        """C(0) = E[φ(z)]² / Q(1), assuming input q value 1."""
        if self._a is not None:
            return (1.0 - self._a) ** 2 / (np.pi * (1.0 + self._a ** 2))
        return float(self._expect(self.activation.phi)) ** 2 / self.q1

    def c_slope_1(self) -> float:
        """C'(1) = E[φ'(z)²] / Q(1), assuming input q value 1; inf when φ jumps."""
        if self._a is not None:
            return 1.0
        if any(self.activation.phi_jumps()):
            return math.inf
        dphi = self.activation.dphi
        return float(self._expect(lambda x: dphi(x) ** 2)) / self.q1

    def c_curv_1(self) -> float:
        """C''(1) = E[φ''(z)²] / Q(1), assuming input q value 1; inf when φ or φ' jumps."""
        if any(self.activation.phi_jumps()) or any(self.activation.dphi_jumps()):
            return math.inf
        d2phi = self.activation.d2phi
        return float(self._expect(lambda x: d2phi(x) ** 2)) / self.q1

    # ------------------------------------------------------------------ 2-D maps
    @cached_property
    def pieces(self) -> PolynomialPieces | None:
        """φ as polynomials between its kinks, when the activation declares polynomial pieces
        (``scale`` None) and a fit of degree <= 4 confirms them; else None (quadrature)."""
        act = self.activation
        return polynomial_pieces(act.phi, act.kinks) if act.scale is None else None

    def _kernel_pieces(self, pieces: PolynomialPieces, q1: np.ndarray, q2: np.ndarray, k: np.ndarray,
                       rule: Rule) -> np.ndarray:
        """E[φ(u)φ(v)] in closed form where both variances are positive, by quadrature elsewhere."""
        q1_b, q2_b, k_b = np.broadcast_arrays(q1, q2, k)
        out = np.empty(q1_b.shape)
        positive = (q1_b > 0) & (q2_b > 0)
        if np.any(positive):
            out[positive] = bivariate_moment_expectation(pieces, pieces, q1_b[positive], q2_b[positive],
                                                         k_b[positive])
        if not np.all(positive):
            phi = self._piecewise(self.activation.phi)
            rest = ~positive
            out[rest] = bivariate_expectation(phi, phi, q1_b[rest], q2_b[rest], k_b[rest], rule)
        return out

    def kernel_map(self, q1: ArrayLike, q2: ArrayLike, k: ArrayLike, rule: Rule = ACCURATE) -> np.ndarray | float:
        """k_out = E[φ(u)φ(v)] for (u, v) ~ N(0, [[q1, k], [k, q2]]), broadcasting (docs/theory.md §2.1).

        Requires ``q1, q2 >= 0`` and ``|k| <= sqrt(q1 q2)`` (up to rounding). ``rule``: the
        quadrature's node counts (``quadrature.FAST`` trades accuracy, about 2e-6 of Q(q), for speed);
        the closed forms (leaky family, polynomial pieces) are exact and ignore it.
        """
        q1_arr, q2_arr = _checked_variance(q1, "q1"), _checked_variance(q2, "q2")
        k_arr = np.asarray(k, dtype=float)
        prod = np.sqrt(q1_arr * q2_arr)
        if np.any(~(np.abs(k_arr) <= prod * (1.0 + _TOL) + 1e-300)):
            raise InvalidArgumentError("k must satisfy |k| <= sqrt(q1 q2) (the covariance matrix must be positive "
                             "semi-definite)")
        if self._a is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                rho = np.where(prod > 0, k_arr / np.where(prod > 0, prod, 1.0), 0.0)
            rho = np.clip(rho, -1.0, 1.0)
            return _as_output(self._g2 * prod * ((1.0 - self._a) ** 2 * relu_kernel(rho) + self._a * rho))
        pieces = self.pieces
        if pieces is not None:
            return _as_output(self._kernel_pieces(pieces, q1_arr, q2_arr, k_arr, rule))
        phi = self._piecewise(self.activation.phi)
        return _as_output(bivariate_expectation(phi, phi, q1_arr, q2_arr, k_arr, rule))

    def c_map(self, c: ArrayLike) -> np.ndarray | float:
        """C(c) = E[φ(u)φ(v)] / Q(1), assuming input q value 1 (docs/theory.md §2.1).

        For the leaky family, the normalized closed form
        ``[(1 - a)² (sqrt(1 - c²) + (π - arccos c) c) / π + 2 a c] / (1 + a²)``.
        """
        c_arr = _checked_correlation(c)
        if self._a is not None:
            a = self._a
            return _as_output(((1.0 - a) ** 2 * 2.0 * relu_kernel(c_arr) + 2.0 * a * c_arr) / (1.0 + a * a))
        return _as_output(np.asarray(self.kernel_map(1.0, 1.0, c_arr)) / self.q1)

    def c_slope(self, c: ArrayLike) -> np.ndarray | float:
        """C'(c) = E[φ'(u)φ'(v)] / Q(1), assuming input q value 1 (Price's theorem).

        φ' is taken in the sense of distributions: a jump J of φ at t adds J δ(x - t),
        which contributes ``2 J ϕ(t) E[φ'(v) | u = t]`` and ``J_i J_j p_c(t_i, t_j)``.
        """
        c_arr = _checked_correlation(c)
        if self._a is not None:
            a = self._a
            slope = a + (1.0 - a) ** 2 * (np.pi - np.arccos(c_arr)) / (2.0 * np.pi)
            return _as_output(slope / ((1.0 + a * a) / 2.0))
        act = self.activation
        ones = np.ones_like(c_arr)
        dphi = self._piecewise(act.dphi)
        value = bivariate_expectation(dphi, dphi, ones, ones, c_arr)
        jumps = [(t, j) for t, j in zip(act.kinks, act.phi_jumps()) if j]
        if jumps:
            value = value + self._jump_terms(c_arr, jumps)
        return _as_output(value / self.q1)

    def _jump_terms(self, c: np.ndarray, jumps: list[tuple[float, float]]) -> np.ndarray:
        """The delta-function terms of E[φ'(u)φ'(v)] when φ jumps (see :meth:`c_slope`)."""
        s = np.sqrt(np.clip(1.0 - c * c, 0.0, None))
        dphi = self._piecewise(self.activation.dphi)
        total = np.zeros_like(c)
        for t, jump in jumps:
            density = math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
            cond = gauss_expectation(dphi, c * t, s)  # E[φ'(v) | u = t]
            total = total + 2.0 * jump * density * cond
            for t2, jump2 in jumps:
                total = total + jump * jump2 * _bivariate_density(t, t2, c, s)
        return total


def _bivariate_density(a: float, b: float, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The standard bivariate normal density at (a, b) with correlation c; inf on a degenerate line."""
    out = np.empty_like(c)
    ok = s > 0
    s_ok = s[ok]
    out[ok] = np.exp(-(a * a - 2.0 * c[ok] * a * b + b * b) / (2.0 * s_ok * s_ok)) / (2.0 * np.pi * s_ok)
    out[~ok] = np.where(np.isclose(b, c[~ok] * a), np.inf, 0.0)
    return out
