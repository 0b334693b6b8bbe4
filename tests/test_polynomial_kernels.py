"""The closed-form kernel maps of piecewise-polynomial activations (netsurgeon.kernels.polynomial).

References: the ACCURATE Gauss–Legendre quadrature these maps replaced (kernels.quadrature), scipy's
adaptive quad for the bivariate normal CDF and for the degenerate |ρ| = 1 case, and Monte Carlo.
Grids include unequal variances, q from 0.05 to 100 and cosines within 1e-15 of ±1, where the
closed form's cancellations would show.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.integrate as si
from scipy.special import ndtr

from netsurgeon.kernels import LocalMaps, get_activation, list_activations
from netsurgeon.kernels.polynomial import bivariate_moment_expectation, bvn_cdf, polynomial_pieces
from netsurgeon.kernels.quadrature import ACCURATE, Piecewise, bivariate_expectation, gauss_expectation
from netsurgeon.kernels.transforms import transformed

POLYNOMIAL = ["relu6", "hardtanh", "hardsigmoid", "hardswish", "hard_mish", "softshrink", "hardshrink"]
NEAR_ONE = [1e-15, 1e-12, 1e-8, 1e-4]
COSINES = np.concatenate([np.linspace(-1.0, 1.0, 41), [-1 + e for e in NEAR_ONE], [1 - e for e in NEAR_ONE],
                          [1.0 - 2.0 ** -52]])
VARIANCES = [(1.0, 1.0), (0.3, 0.3), (2.0, 0.7), (0.05, 3.0), (30.0, 30.0), (100.0, 80.0)]


def _quadrature(act, q1: float, q2: float, k: np.ndarray) -> np.ndarray:
    pw = Piecewise(act.phi, act.kinks, act.scale, act.centers)
    return bivariate_expectation(pw, pw, np.full_like(k, q1), np.full_like(k, q2), k, ACCURATE)


def _q(act, q: float) -> float:
    pw = Piecewise(lambda x: act.phi(x) ** 2, act.kinks, act.scale, act.centers)
    return float(gauss_expectation(pw, 0.0, math.sqrt(q)))


def test_pieces_found_exactly_where_polynomial() -> None:
    for name in list_activations():  # registered later ones included: no fixed list of names
        act = get_activation(name)
        pieces = polynomial_pieces(act.phi, act.kinks)
        if name in POLYNOMIAL + ["relu", "leaky_relu", "prelu", "abs", "identity"]:
            assert pieces is not None, name
        if act.scale is not None:  # smooth pieces varying on a width: not polynomials
            assert pieces is None, name
        if pieces is not None:
            x = np.linspace(-50.0, 50.0, 2001) + 0.0123  # off the kinks, where φ's value is immaterial
            np.testing.assert_allclose(pieces(x), act.phi(x), rtol=1e-12, atol=1e-12)
    assert polynomial_pieces(get_activation("hardswish").phi, (-3.0, 3.0)).degree == 2
    assert polynomial_pieces(lambda x: np.where(x > 0, x ** 3, 0.0), (0.0,)).degree == 3
    # a smooth non-polynomial piece, even one close to a polynomial near the kink, is refused
    assert polynomial_pieces(lambda x: np.where(x > 0, np.log1p(x), 0.0), (0.0,)) is None
    assert polynomial_pieces(lambda x: np.where(x > 0, x + 1e-6 * np.sin(x), 0.0), (0.0,)) is None


@pytest.mark.parametrize("name", POLYNOMIAL)
def test_closed_form_matches_accurate_quadrature(name: str) -> None:
    """Within 1e-9 of sqrt(Q(q1) Q(q2)) everywhere (measured: 4.4e-11 at worst)."""
    act = get_activation(name)
    pieces = polynomial_pieces(act.phi, act.kinks)
    for q1, q2 in VARIANCES:
        k = COSINES * math.sqrt(q1 * q2)
        got = bivariate_moment_expectation(pieces, pieces, q1, q2, k)
        want = _quadrature(act, q1, q2, k)
        scale = math.sqrt(_q(act, q1) * _q(act, q2))
        err = np.abs(got - want) / scale
        assert np.max(err) < 1e-9, (name, q1, q2, COSINES[np.argmax(err)], np.max(err))


@pytest.mark.parametrize("name", ["relu6", "hardswish", "hardshrink"])
def test_degenerate_correlation_is_the_one_dimensional_expectation(name: str) -> None:
    """At ρ = ±1 (v = ±u scaled), E[φ(u)φ(v)] is a 1-D integral: scipy quad with the kinks split."""
    act = get_activation(name)
    pieces = polynomial_pieces(act.phi, act.kinks)
    for q1, q2 in [(1.0, 1.0), (2.0, 0.5), (40.0, 9.0)]:
        s1, s2 = math.sqrt(q1), math.sqrt(q2)
        for sign in (1.0, -1.0):
            pts = sorted({t / s1 for t in act.kinks} | {sign * t / s2 for t in act.kinks})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                want = si.quad(lambda z: float(act.phi(s1 * z) * act.phi(sign * s2 * z)) * math.exp(-z * z / 2)
                               / math.sqrt(2 * math.pi), -12, 12, points=pts, epsabs=1e-13, epsrel=1e-13,
                               limit=500)[0]
            got = float(bivariate_moment_expectation(pieces, pieces, q1, q2, sign * s1 * s2))
            assert got == pytest.approx(want, abs=1e-11 * max(1.0, abs(want))), (name, q1, q2, sign)


def _bvn_quad(h: float, k: float, rho: float) -> float:
    """P(X < h, Y < k) = ∫_{-40}^h ϕ(x) Φ((k - ρx)/s) dx by scipy quad, split around the step of Φ
    (at x = k/ρ, of width s/|ρ|)."""
    s = math.sqrt(1 - rho * rho)
    around = [k / rho + m * s / abs(rho) for m in (-10, -3, -1, 0, 1, 3, 10)] if rho else []
    step = sorted(t for t in around if -40 < t < h) or None
    return si.quad(lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi) * float(ndtr((k - rho * x) / s)),
                   -40.0, h, points=step, epsabs=1e-14, epsrel=1e-13, limit=500)[0]


def test_bivariate_normal_cdf() -> None:
    cases = [(0.0, 0.0, 0.3), (0.0, 1.2, -0.5), (-0.7, 0.0, 0.9), (1.1, -2.0, 0.99), (-1.0, -1.0, -0.999),
             (2.0, 3.0, 0.2), (0.0, -1.0, 0.5), (0.5, 0.5, 1 - 1e-10), (-3.0, 2.5, -0.3), (1.5, -0.2, 0.0)]
    for h, k, rho in cases:
        s = math.sqrt((1 - abs(rho)) * (1 + abs(rho)))
        assert float(bvn_cdf(h, k, rho, s)) == pytest.approx(_bvn_quad(h, k, rho), abs=1e-12), (h, k, rho)
    s = math.sqrt(1 - 0.4 ** 2)
    assert float(bvn_cdf(np.inf, 0.3, 0.4, s)) == pytest.approx(float(ndtr(0.3)), abs=1e-15)
    assert float(bvn_cdf(-0.2, np.inf, 0.4, s)) == pytest.approx(float(ndtr(-0.2)), abs=1e-15)
    assert float(bvn_cdf(-np.inf, 0.3, 0.4, s)) == 0.0 and float(bvn_cdf(np.inf, np.inf, 0.4, s)) == 1.0


def test_transformed_activation_uses_the_closed_form() -> None:
    """A DKS/TAT transform ψ(x) = γ(φ(αx + β) + δ) of a polynomial-piece activation keeps polynomial pieces."""
    act = transformed(get_activation("hardswish"), 1.3, 0.4, 0.9, -0.2)
    maps = LocalMaps(act)
    assert maps.pieces is not None
    for q1, q2 in [(1.0, 1.0), (2.0, 0.7)]:
        k = COSINES * math.sqrt(q1 * q2)
        np.testing.assert_allclose(maps.kernel_map(q1, q2, k), _quadrature(act, q1, q2, k), rtol=0, atol=1e-9)


def test_monte_carlo_beyond_the_cap() -> None:
    """At q = 30 the ReLU6 cap at 6 matters (P(u > 6) = 0.14); Monte Carlo within 5 standard errors."""
    rng = np.random.default_rng(7)
    n = 2_000_000
    maps = LocalMaps("relu6")
    q1, q2, k = 30.0, 20.0, 12.0
    rho = k / math.sqrt(q1 * q2)
    x, w = rng.standard_normal(n), rng.standard_normal(n)
    u, v = math.sqrt(q1) * x, math.sqrt(q2) * (rho * x + math.sqrt(1 - rho ** 2) * w)
    samples = maps.activation.phi(u) * maps.activation.phi(v)
    assert abs(maps.kernel_map(q1, q2, k) - samples.mean()) < 5 * samples.std() / math.sqrt(n)


def test_zero_variance_falls_back_to_quadrature() -> None:
    maps = LocalMaps("relu6")
    out = maps.kernel_map(np.array([0.0, 2.0, 1.0]), np.array([2.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.5]))
    assert out[0] == pytest.approx(0.0, abs=1e-15) and out[1] == pytest.approx(0.0, abs=1e-15)
    assert out[2] == pytest.approx(float(_quadrature(maps.activation, 1.0, 1.0, np.array([0.5]))[0]), abs=1e-10)
