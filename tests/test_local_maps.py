"""Local Q/C maps of activations (netsurgeon.kernels) against independent references.

References: the closed forms of docs/theory.md §2.2, adaptive scipy quadrature (quad with the
kinks given as breakpoints, tight tolerances), Monte Carlo with a standard-error
tolerance, and identities the maps must satisfy (C(1) = 1, Price's theorem, symmetry,
positive homogeneity, kernel_map(q, q, q) = Q(q)).
"""
from __future__ import annotations

import ast
import dataclasses
import math
import pathlib
import warnings

import numpy as np
import pytest
import scipy.integrate as si
from hypothesis import given, settings
from hypothesis import strategies as st

from netsurgeon.kernels import LocalMaps, get_activation, list_activations, relu_kernel
from netsurgeon.ops.kinds import ActivationSpec

ALL = list_activations()
SMOOTH = [n for n in ALL if not get_activation(n).kinks]
SPAN = 12.0  # scipy integrates over [-12, 12]; the Gaussian mass beyond is 4e-33


def _tol(name: str) -> float:
    """The accuracy target: 1e-8 for smooth activations, 1e-7 for kinked ones."""
    return 1e-8 if name in SMOOTH else 1e-7


def _pdf(z: float) -> float:
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _inside(points: list[float]) -> list[float] | None:
    pts = sorted({float(p) for p in points if -SPAN < p < SPAN})
    return pts or None


def _quad(fn, points: list[float], tol: float = 1e-11) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return si.quad(fn, -SPAN, SPAN, points=_inside(points), epsabs=tol, epsrel=tol, limit=1000)[0]


def _scalar(fn, x: float) -> float:
    return float(fn(np.array(x)))


def scipy_1d(h, kinks: tuple[float, ...], std: float = 1.0) -> float:
    """E[h(std z)] by scipy quad, split at the kinks."""
    return _quad(lambda z: _scalar(h, std * z) * _pdf(z), [t / std for t in kinks] + [0.0])


def scipy_kernel(f, g, kinks: tuple[float, ...], q1: float, q2: float, k: float) -> float:
    """E[f(u) g(v)], (u, v) ~ N(0, [[q1, k], [k, q2]]), by nested scipy quad split at the kinks."""
    s1, s2 = math.sqrt(q1), math.sqrt(q2)
    rho = k / (s1 * s2)
    s = math.sqrt(max(1.0 - rho * rho, 0.0))

    def inner(x: float) -> float:
        pts = [(t / s2 - rho * x) / s for t in kinks]
        return _quad(lambda w: _scalar(g, s2 * (rho * x + s * w)) * _pdf(w), pts)

    pts = [t / s1 for t in kinks] + [0.0]
    if rho:  # where v's kinks sit at w = 0, smoothed over a width s/|rho|
        pts += [t / (s2 * rho) + m * s / abs(rho) for t in kinks for m in (-9, -3, -1, 0, 1, 3, 9)]
    return _quad(lambda x: _scalar(f, s1 * x) * _pdf(x) * inner(x), pts)


# ----------------------------------------------------------------- closed forms (docs/theory.md §2.2)
def test_relu_closed_form_and_hand_numbers() -> None:
    maps = LocalMaps("relu")
    c = np.linspace(-1, 1, 41)
    math_md = (np.sqrt(1 - c ** 2) + (np.pi - np.arccos(c)) * c) / (2 * np.pi)
    np.testing.assert_allclose(maps.kernel_map(1.0, 1.0, c), math_md, atol=1e-15)
    np.testing.assert_allclose(relu_kernel(c), math_md, atol=1e-15)
    assert maps.q1 == pytest.approx(0.5, abs=1e-15)
    assert maps.c_slope_1() == pytest.approx(1.0, abs=1e-12)
    assert maps.c0() == pytest.approx(1 / np.pi, abs=1e-12)
    assert float(maps.c_map(0.0)) == pytest.approx(1 / np.pi, abs=1e-12)
    # The generic quadrature (a user callable with its kink) reproduces the closed form.
    user = LocalMaps(get_activation(lambda x: np.maximum(x, 0.0), kinks=[0.0]))
    np.testing.assert_allclose(user.c_map(c), maps.c_map(c), atol=1e-9)
    np.testing.assert_allclose(user.c_slope(c[1:-1]), maps.c_slope(c[1:-1]), atol=1e-9)
    assert user.c0() == pytest.approx(1 / np.pi, abs=1e-10)


@pytest.mark.parametrize("a", [0.0, 0.01, 0.2, 0.5, -0.3, -1.0, 1.0])
def test_normalized_leaky_relu_formula(a: float) -> None:
    c = np.linspace(-1, 1, 41)
    formula = ((1 - a) ** 2 * (np.sqrt(1 - c ** 2) + (np.pi - np.arccos(c)) * c) / np.pi + 2 * a * c) / (1 + a ** 2)
    maps = LocalMaps("leaky_relu", negative_slope=a)
    np.testing.assert_allclose(maps.c_map(c), formula, atol=1e-14)
    # the normalized activation sqrt(2/(1+a²)) leaky_relu has Q(q) = q; its k map is the C map
    user = LocalMaps(get_activation(lambda x: np.sqrt(2 / (1 + a * a)) * np.where(x > 0, x, a * x), kinks=[0.0]))
    assert user.q1 == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(user.kernel_map(1.0, 1.0, c), formula, atol=1e-9)
    np.testing.assert_allclose(user.c_slope(c[1:-1]), maps.c_slope(c[1:-1]), atol=1e-9)
    assert maps.c_slope_1() == pytest.approx(1.0) and user.c_slope_1() == pytest.approx(1.0, abs=1e-9)


def test_relu_positive_homogeneity() -> None:
    q1, q2, c = 0.7, 2.3, np.array([-0.9, -0.2, 0.4, 0.95])
    k = c * np.sqrt(q1 * q2)
    for maps in (LocalMaps("relu"), LocalMaps(get_activation(lambda x: np.maximum(x, 0.0), kinks=[0.0]))):
        base = maps.kernel_map(q1, q2, k)
        np.testing.assert_allclose(base, np.sqrt(q1 * q2) * relu_kernel(c), atol=1e-9)
        for lam in (0.3, 4.0):
            np.testing.assert_allclose(maps.kernel_map(lam ** 2 * q1, lam ** 2 * q2, lam ** 2 * k), lam ** 2 * base,
                                       rtol=1e-9, atol=1e-12)


def test_tanh_hand_number() -> None:
    assert LocalMaps("tanh").q1 == pytest.approx(0.3942, abs=2e-4)
    assert LocalMaps("tanh").q1 == pytest.approx(0.39429449, abs=1e-8)


# ----------------------------------------------------------------- scipy references, every activation
@pytest.mark.parametrize("name", ALL)
def test_one_dimensional_maps_match_scipy(name: str) -> None:
    maps = LocalMaps(name)
    act = maps.activation
    phi, dphi, d2phi, kinks = act.phi, act.dphi, act.d2phi, act.kinks
    tol = _tol(name)
    for q in (0.25, 1.0, 3.0):
        assert maps.q_map(q) == pytest.approx(scipy_1d(lambda x: phi(x) ** 2, kinks, math.sqrt(q)), abs=tol)
    q1 = scipy_1d(lambda x: phi(x) ** 2, kinks)
    mean = scipy_1d(phi, kinks)
    assert maps.c0() == pytest.approx(mean ** 2 / q1, abs=tol)
    if not any(act.phi_jumps()):  # Q'(1) = E[φ φ' z] needs a continuous φ
        assert maps.q_slope_1() == pytest.approx(scipy_1d(lambda x: phi(x) * dphi(x) * x, kinks), abs=tol)
        assert maps.c_slope_1() == pytest.approx(scipy_1d(lambda x: dphi(x) ** 2, kinks) / q1, abs=tol)
    else:
        assert maps.c_slope_1() == math.inf
    if any(act.phi_jumps()) or any(act.dphi_jumps()):
        assert maps.c_curv_1() == math.inf
    else:
        assert maps.c_curv_1() == pytest.approx(scipy_1d(lambda x: d2phi(x) ** 2, kinks) / q1, abs=tol)


@pytest.mark.parametrize("name", ALL)
def test_kernel_map_matches_scipy(name: str) -> None:
    maps = LocalMaps(name)
    act = maps.activation
    # far from the diagonal at unit q (the C-map path), and near it with unequal q
    cases = [(1.0, 1.0, -0.6), (1.5, 0.8, 0.95 * math.sqrt(1.5 * 0.8))]
    got = maps.kernel_map(*(np.array(v) for v in zip(*cases)))
    want = [scipy_kernel(act.phi, act.phi, act.kinks, *case) for case in cases]
    np.testing.assert_allclose(got, want, rtol=0, atol=_tol(name))
    assert float(maps.c_map(-0.6)) == pytest.approx(want[0] / maps.q1, abs=_tol(name))


@pytest.mark.parametrize("name", ["elu", "hardswish", "softsign", "gelu", "tanh", "relu6"])
def test_c_slope_matches_scipy(name: str) -> None:
    maps = LocalMaps(name)
    act = maps.activation
    want = scipy_kernel(act.dphi, act.dphi, act.kinks, 1.0, 1.0, 0.8) / maps.q1
    assert float(maps.c_slope(0.8)) == pytest.approx(want, abs=_tol(name))


# ----------------------------------------------------------------- Monte Carlo
@pytest.mark.parametrize("name", ["tanh", "gelu", "elu", "hardswish", "hardshrink", "softsign"])
def test_monte_carlo(name: str) -> None:
    rng = np.random.default_rng(1234)
    n = 2_000_000
    maps = LocalMaps(name)
    phi = maps.activation.phi
    q1, q2, k = 1.5, 0.7, 0.6
    x, w = rng.standard_normal(n), rng.standard_normal(n)
    rho = k / math.sqrt(q1 * q2)
    u, v = math.sqrt(q1) * x, math.sqrt(q2) * (rho * x + math.sqrt(1 - rho ** 2) * w)
    for got, samples in ((maps.kernel_map(q1, q2, k), phi(u) * phi(v)), (maps.q_map(q1), phi(u) ** 2)):
        se = samples.std() / math.sqrt(n)
        assert abs(got - samples.mean()) < 5 * se, (got, samples.mean(), se)


# ----------------------------------------------------------------- identities
@pytest.mark.parametrize("name", ALL)
def test_identities(name: str) -> None:
    maps = LocalMaps(name)
    tol = _tol(name)
    assert float(maps.c_map(1.0)) == pytest.approx(1.0, abs=tol)
    assert float(maps.c_map(0.0)) == pytest.approx(maps.c0(), abs=tol)
    for q in (0.4, 1.0, 2.5):
        assert maps.kernel_map(q, q, q) == pytest.approx(maps.q_map(q), abs=tol)
    assert maps.kernel_map(0.7, 2.0, 0.9) == pytest.approx(maps.kernel_map(2.0, 0.7, 0.9), abs=tol)
    if math.isfinite(maps.c_slope_1()):
        assert float(maps.c_slope(1.0)) == pytest.approx(maps.c_slope_1(), abs=1e-6)
    # Price's theorem: C' is the derivative of C (hardshrink's jumps included)
    c, h = np.array([-0.8, -0.3, 0.2, 0.7]), 1e-5
    fd = (maps.c_map(c + h) - maps.c_map(c - h)) / (2 * h)
    np.testing.assert_allclose(maps.c_slope(c), fd, atol=1e-6)
    assert maps.q_slope_1() == pytest.approx((maps.q_map(1 + h) - maps.q_map(1 - h)) / (2 * h), abs=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_edge_cases_have_no_nan(name: str) -> None:
    maps = LocalMaps(name)
    phi = maps.activation.phi
    values = [maps.c_map(np.array([-1.0, 1.0])), maps.c_slope(np.array([-0.999999, 0.999999])),
              maps.q_map(np.array([0.0, 1e-12])), maps.kernel_map(0.0, 0.0, 0.0),
              maps.kernel_map(np.array([0.0, 2.0]), np.array([2.0, 0.0]), 0.0)]
    for v in values:
        assert not np.any(np.isnan(v))
    assert maps.q_map(0.0) == pytest.approx(float(phi(np.array(0.0))) ** 2, abs=1e-12)
    assert maps.kernel_map(0.0, 2.0, 0.0) == pytest.approx(
        float(phi(np.array(0.0))) * scipy_1d(phi, maps.activation.kinks, math.sqrt(2.0)), abs=_tol(name))
    assert float(maps.c_map(-1.0)) == pytest.approx(
        scipy_1d(lambda x: phi(x) * phi(-x), maps.activation.kinks) / maps.q1, abs=_tol(name))


@pytest.mark.parametrize("name,fn,kinks", [
    ("elu", lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))), [0.0]),
    ("hardswish", lambda x: x * np.clip(x + 3, 0, 6) / 6, [-3.0, 3.0]),
    ("hardshrink", lambda x: np.where(np.abs(x) > 0.5, x, 0.0), [-0.5, 0.5]),
    ("tanh", np.tanh, []),
])
def test_user_callable_matches_builtin(name: str, fn, kinks: list[float]) -> None:
    built, user = LocalMaps(name), LocalMaps(get_activation(fn, kinks=kinks))
    c = np.linspace(-0.99, 0.99, 9)
    np.testing.assert_allclose(user.c_map(c), built.c_map(c), atol=1e-9)
    np.testing.assert_allclose(user.c_slope(c), built.c_slope(c), atol=1e-8)  # finite-difference φ'
    assert user.kernel_map(2.0, 0.5, 0.7) == pytest.approx(built.kernel_map(2.0, 0.5, 0.7), abs=1e-9)
    assert user.q_slope_1() == pytest.approx(built.q_slope_1(), abs=1e-9)
    assert user.c_slope_1() == pytest.approx(built.c_slope_1(), abs=1e-8)


@settings(max_examples=25, deadline=None)
@given(q1=st.floats(0.05, 4.0), q2=st.floats(0.05, 4.0), rho=st.floats(-1.0, 1.0),
       name=st.sampled_from(["elu", "tanh", "hardtanh", "gelu"]))
def test_kernel_map_properties(q1: float, q2: float, rho: float, name: str) -> None:
    maps = LocalMaps(name)
    k = rho * math.sqrt(q1 * q2)
    value = maps.kernel_map(q1, q2, k)
    # symmetric within the maps' accuracy (1e-8): the two orders may fall in different quadrature regimes
    assert value == pytest.approx(maps.kernel_map(q2, q1, k), abs=1e-8)
    assert abs(value) <= math.sqrt(maps.q_map(q1) * maps.q_map(q2)) + 1e-8  # Cauchy–Schwarz


# ----------------------------------------------------------------- API, speed, layering
def test_broadcasting() -> None:
    maps = LocalMaps("elu")
    q1, q2 = np.array([[0.5], [1.0], [2.0]]), np.array([[0.3, 1.0, 1.5, 3.0]])
    k = 0.4 * np.sqrt(q1 * q2)
    out = maps.kernel_map(q1, q2, k)
    assert out.shape == (3, 4)
    assert out[2, 1] == pytest.approx(maps.kernel_map(2.0, 1.0, 0.4 * math.sqrt(2.0)), abs=1e-12)
    assert isinstance(maps.c_map(0.3), float) and maps.c_map(np.zeros((2, 5))).shape == (2, 5)


def test_factory_and_errors() -> None:
    spec = ActivationSpec("leaky_relu", (("negative_slope", 0.2),))
    assert get_activation(spec).params == (("negative_slope", 0.2),)
    assert LocalMaps(spec).c_map(0.0) == pytest.approx(LocalMaps("leaky_relu", negative_slope=0.2).c_map(0.0))
    assert set(ALL) >= {"relu", "gelu_tanh", "hard_mish", "quick_gelu", "identity", "logsigmoid", "star_relu"} and len(ALL) == 27
    with pytest.raises(ValueError, match="Valid names:.*relu"):
        get_activation("relu7")
    with pytest.raises(ValueError, match="Valid names"):
        get_activation(ActivationSpec("unknown:Foo"))
    with pytest.raises(ValueError, match="alpha"):
        get_activation("leaky_relu", alpha=0.1)
    with pytest.raises(ValueError, match="beta"):
        get_activation("softplus", beta=-1.0)
    with pytest.raises(ValueError, match="q"):
        LocalMaps("tanh").q_map(-1.0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        LocalMaps("tanh").c_map(1.5)
    with pytest.raises(ValueError, match="semi-definite"):
        LocalMaps("elu").kernel_map(1.0, 1.0, 1.5)


@pytest.mark.parametrize("name", ["tanh", "gelu", "elu", "hardswish", "softshrink", "softsign"])
def test_c_map_evaluates_a_grid_in_one_vectorized_pass(name: str, monkeypatch) -> None:
    """C on a grid of cosines calls the activation a fixed number of times, however many
    points the grid has: the quadrature is vectorized over the grid, not run point by point,
    and each point costs a bounded number of activation values. Counted, not timed: the speed
    itself is measured by ``benchmarks/analysis_speed.py`` (docs/performance.md).

    The quadrature evaluates the integrand in cache-sized blocks of ``_CHUNK`` values, so the
    call count grows with the grid by design once a block is full; the block size is raised
    here so that only a per-point loop could make the count grow.

    Activations with polynomial pieces (hardswish, softshrink) take the closed form of
    ``kernels.polynomial``: once their pieces are fitted (cached per LocalMaps, like Q(1)), C on a
    grid evaluates φ nowhere."""
    from netsurgeon.kernels import quadrature

    monkeypatch.setattr(quadrature, "_CHUNK", 1 << 40)
    counts, sizes = {}, {}
    for n in (5, 50):
        maps = LocalMaps(name)
        maps.q1  # the cached normalizer Q(1): computed once per LocalMaps, outside the count
        maps.pieces  # likewise the polynomial pieces (None for non-polynomial activations)
        phi, calls = maps.activation.phi, []

        def counting(x, phi=phi, calls=calls):
            calls.append(np.size(x))
            return phi(x)

        monkeypatch.setattr(maps, "activation", dataclasses.replace(maps.activation, phi=counting))
        out = maps.c_map(np.linspace(-1.0, 1.0, n))
        assert out.shape == (n,) and np.all(np.isfinite(out))
        counts[n], sizes[n] = len(calls), sum(calls)
    if LocalMaps(name).pieces is not None:
        assert sizes == {5: 0, 50: 0}, f"{name}: the closed form evaluated φ {sizes} times"
        return
    assert counts[50] == counts[5] <= 8, f"{name}: activation calls {counts} grow with the grid size"
    assert sizes[50] > 5 * sizes[5], f"{name}: values per call {sizes} do not grow with the grid"
    # the cost per grid point: 5,000 to 35,000 activation values with the ACCURATE rule
    assert sizes[50] <= 50 * 50_000, f"{name}: {sizes[50] / 50:.0f} activation values per grid point"


def test_kernels_import_no_framework() -> None:
    root = pathlib.Path(__file__).resolve().parents[1] / "netsurgeon" / "kernels"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] in {"numpy", "scipy", "math", "dataclasses", "functools", "typing",
                                              "difflib", "itertools", "__future__"}, f"{path.name} imports {name}"


@pytest.mark.parametrize("name", ["tanh", "gelu", "silu", "mish", "elu", "selu", "softsign", "hardswish", "relu6"])
def test_fast_rule_within_2e6_of_accurate(name):
    """analyze() propagates with quadrature.FAST; its documented bound (relative to Q(q)), checked."""
    from netsurgeon.kernels.quadrature import FAST

    m = LocalMaps(name)
    rho = np.linspace(-1.0, 1.0, 101)
    for q in (0.3, 1.0, 2.0, 5.0):
        full = np.full_like(rho, q)
        exact = m.kernel_map(full, full, rho * q)
        fast = m.kernel_map(full, full, rho * q, FAST)
        assert np.max(np.abs(fast - exact)) / exact[-1] < 2e-6, (name, q)
