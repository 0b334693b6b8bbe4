"""The built-in activations: φ, φ' and φ'' in numpy, kinks and scales, by canonical name.

Names and parameters follow :class:`netsurgeon.ops.kinds.ActivationSpec` (PyTorch's
``torch.nn.functional`` and timm's activations, e.g. ``hard_mish`` and ``quick_gelu``).
A ``scale`` is the width over which the smooth pieces vary, calibrated so that
Gauss–Hermite with 200 nodes stays below 1e-11 for inputs of standard deviation up to
1.5 scale (tanh: singularities at ±iπ/2 give 0.75); ``None`` marks polynomial pieces.
Each ``register`` also states the traits passes read (:mod:`.registry`); the torch
modules and functions that compute each activation are in :mod:`netsurgeon.ops.activations`.
Users add activations with ``netsurgeon.register_activation`` (docs/architecture.md).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.special import expit, ndtr

from .registry import Parts, add_alias, register, require

__all__: list[str] = []

ArrayFn = Callable[[np.ndarray], np.ndarray]
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _zero(x: np.ndarray) -> np.ndarray:
    """The zero function (φ'' of piecewise linear activations)."""
    return np.zeros_like(x)


def _leaky(a: float) -> Parts:
    """φ(x) = x for x > 0, a x otherwise."""
    return Parts(lambda x: np.where(x > 0, x, a * x), lambda x: np.where(x > 0, 1.0, a), _zero,
                 (0.0,) if a != 1.0 else (), None, float(a))


register("relu", one_sided=True, relu_family=True, leaky_slope=0.0, lipschitz=1.0)(lambda: _leaky(0.0))
register("leaky_relu", params={"negative_slope": 0.01}, relu_family=True, leaky_slope="negative_slope",
         lipschitz=lambda negative_slope: max(1.0, abs(negative_slope)))(lambda negative_slope: _leaky(negative_slope))
add_alias("prelu", "leaky_relu", negative_slope=0.25)  # nn.PReLU's default init
register("abs", lipschitz=1.0)(lambda: _leaky(-1.0))
register("identity", lipschitz=1.0)(lambda: _leaky(1.0))


def _elu_parts(alpha: float, gain: float) -> Parts:
    """ELU and SELU: gain · (x for x > 0, alpha (e^x - 1) otherwise)."""
    def neg(x: np.ndarray) -> np.ndarray:
        """e^x on the negative side."""
        return np.exp(np.minimum(x, 0.0))
    return Parts(lambda x: gain * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0))),
                 lambda x: gain * np.where(x > 0, 1.0, alpha * neg(x)),
                 lambda x: gain * np.where(x > 0, 0.0, alpha * neg(x)), (0.0,), 1.0)


register("elu", params={"alpha": 1.0}, one_sided=True)(lambda alpha: _elu_parts(alpha, 1.0))
register("selu", one_sided=True)(lambda: _elu_parts(_SELU_ALPHA, _SELU_SCALE))


@register("celu", params={"alpha": 1.0}, one_sided=True)
def _celu(alpha: float) -> Parts:
    """CELU: x for x > 0, alpha (e^{x/alpha} - 1) otherwise; varies on a width alpha."""
    require(alpha > 0, "celu", "alpha", alpha, "alpha > 0")

    def e(x: np.ndarray) -> np.ndarray:
        return np.exp(np.minimum(x, 0.0) / alpha)
    return Parts(lambda x: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0) / alpha)),
                 lambda x: np.where(x > 0, 1.0, e(x)), lambda x: np.where(x > 0, 0.0, e(x) / alpha), (0.0,), alpha)


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    """The standard normal density ϕ(x)."""
    return _INV_SQRT_2PI * np.exp(-0.5 * x * x)


register("gelu", one_sided=True)(lambda: Parts(lambda x: x * ndtr(x), lambda x: ndtr(x) + x * _normal_pdf(x),
                               lambda x: (2.0 - x * x) * _normal_pdf(x), (), 1.6))


@register("gelu_tanh", one_sided=True)
def _gelu_tanh() -> Parts:
    """GELU, tanh approximation: x (1 + tanh(sqrt(2/π) (x + 0.044715 x³))) / 2."""
    k, c = np.sqrt(2.0 / np.pi), 0.044715

    def parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        t = np.tanh(k * (x + c * x * x * x))
        return t, 1.0 - t * t, k * (1.0 + 3.0 * c * x * x), 6.0 * k * c * x  # tanh, sech², g', g''

    def d1(x: np.ndarray) -> np.ndarray:
        t, s2, g1, _ = parts(x)
        return 0.5 * (1.0 + t) + 0.5 * x * s2 * g1

    def d2(x: np.ndarray) -> np.ndarray:
        t, s2, g1, g2 = parts(x)
        return s2 * g1 + 0.5 * x * s2 * (g2 - 2.0 * t * g1 * g1)
    return Parts(lambda x: 0.5 * x * (1.0 + np.tanh(k * (x + c * x * x * x))), d1, d2, (), 1.3)


def _scaled_silu(b: float) -> Parts:
    """φ(x) = x σ(b x): SiLU (b = 1) and quick GELU (b = 1.702)."""
    def d1(x: np.ndarray) -> np.ndarray:
        s = expit(b * x)
        return s + b * x * s * (1.0 - s)

    def d2(x: np.ndarray) -> np.ndarray:
        s = expit(b * x)
        return b * s * (1.0 - s) * (2.0 + b * x * (1.0 - 2.0 * s))
    return Parts(lambda x: x * expit(b * x), d1, d2, (), 1.5 / b)


register("silu", one_sided=True)(lambda: _scaled_silu(1.0))
register("quick_gelu")(lambda: _scaled_silu(1.702))


@register("mish", one_sided=True)
def _mish() -> Parts:
    """Mish: x tanh(softplus(x))."""
    def d1(x: np.ndarray) -> np.ndarray:
        t = np.tanh(np.logaddexp(0.0, x))
        return t + x * (1.0 - t * t) * expit(x)

    def d2(x: np.ndarray) -> np.ndarray:
        t, s = np.tanh(np.logaddexp(0.0, x)), expit(x)
        return (1.0 - t * t) * s * (2.0 + x * (1.0 - s - 2.0 * t * s))
    return Parts(lambda x: x * np.tanh(np.logaddexp(0.0, x)), d1, d2, (), 1.1)


@register("softplus", params={"beta": 1.0, "threshold": 20.0}, one_sided=True)
def _softplus(beta: float, threshold: float) -> Parts:
    """PyTorch's softplus: log(1 + e^{βx})/β, and x where βx > threshold."""
    require(beta > 0, "softplus", "beta", beta, "beta > 0")
    cut = threshold / beta
    # The switch to x leaves a jump of log1p(e^-threshold)/β: a kink only when it is not negligible.
    kinks = (cut,) if np.log1p(np.exp(-threshold)) / beta > 1e-8 else ()
    return Parts(lambda x: np.where(x > cut, x, np.logaddexp(0.0, beta * x) / beta),
                 lambda x: np.where(x > cut, 1.0, expit(beta * x)),
                 lambda x: np.where(x > cut, 0.0, beta * expit(beta * x) * expit(-beta * x)), kinks, 1.5 / beta,
                 centers=(0.0,) + kinks)


register("tanh", lipschitz=1.0)(lambda: Parts(np.tanh, lambda x: 1.0 - np.tanh(x) ** 2,
                               lambda x: -2.0 * np.tanh(x) * (1.0 - np.tanh(x) ** 2), (), 0.75))
register("sigmoid")(lambda: Parts(expit, lambda x: expit(x) * expit(-x),
                                  lambda x: expit(x) * expit(-x) * (1.0 - 2.0 * expit(x)), (), 1.5))
register("tanhshrink")(lambda: Parts(lambda x: x - np.tanh(x), lambda x: np.tanh(x) ** 2,
                                     lambda x: 2.0 * np.tanh(x) * (1.0 - np.tanh(x) ** 2), (), 0.75))
register("logsigmoid")(lambda: Parts(lambda x: -np.logaddexp(0.0, -x), lambda x: expit(-x),
                                     lambda x: -expit(x) * expit(-x), (), 1.5))
register("softsign", lipschitz=1.0)(lambda: Parts(lambda x: x / (1.0 + np.abs(x)),
                                                  lambda x: 1.0 / (1.0 + np.abs(x)) ** 2,
                                                  lambda x: -2.0 * np.sign(x) / (1.0 + np.abs(x)) ** 3, (0.0,), 0.5))


def _clip_parts(lo: float, hi: float, scale: float = 1.0, shift: float = 0.0) -> Parts:
    """φ(x) = scale · clip(x + shift, lo, hi): hardtanh, relu6, hardsigmoid."""
    return Parts(lambda x: scale * np.clip(x + shift, lo, hi),
                 lambda x: np.where((x + shift > lo) & (x + shift < hi), scale, 0.0), _zero,
                 (lo - shift, hi - shift), None)


@register("hardtanh", params={"min_val": -1.0, "max_val": 1.0}, lipschitz=1.0)
def _hardtanh(min_val: float, max_val: float) -> Parts:
    """Hardtanh: clip(x, min_val, max_val)."""
    require(max_val > min_val, "hardtanh", "max_val", max_val, f"max_val > min_val = {min_val}")
    return _clip_parts(min_val, max_val)


# relu6 is ReLU up to its cap at 6, reached with probability 1e-9 at the unit input variance the shaping
# passes establish: it counts as the ReLU family (leaky_slope 0), and tat makes it a TReLU (cap dropped)
register("relu6", one_sided=True, relu_family=True, leaky_slope=0.0, lipschitz=1.0)(lambda: _clip_parts(0.0, 6.0))
register("hardsigmoid")(lambda: _clip_parts(0.0, 6.0, 1.0 / 6.0, 3.0))
register("hardswish", one_sided=True)(lambda: Parts(
    lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    lambda x: np.where(x >= 3.0, 1.0, np.where(x > -3.0, (2.0 * x + 3.0) / 6.0, 0.0)),
    lambda x: np.where((x > -3.0) & (x < 3.0), 1.0 / 3.0, 0.0), (-3.0, 3.0), None))
register("hard_mish")(lambda: Parts(
    lambda x: 0.5 * x * np.clip(x + 2.0, 0.0, 2.0),
    lambda x: np.where(x >= 0.0, 1.0, np.where(x > -2.0, x + 1.0, 0.0)),
    lambda x: np.where((x > -2.0) & (x < 0.0), 1.0, 0.0), (-2.0, 0.0), None))


@register("softshrink", params={"lambd": 0.5})
def _softshrink(lambd: float) -> Parts:
    """Softshrink: x - λ sign(x) for |x| > λ, 0 otherwise."""
    require(lambd >= 0, "softshrink", "lambd", lambd, "lambd >= 0")
    return Parts(lambda x: np.where(x > lambd, x - lambd, np.where(x < -lambd, x + lambd, 0.0)),
                 lambda x: np.where(np.abs(x) > lambd, 1.0, 0.0), _zero, (-lambd, lambd), None)


@register("hardshrink", params={"lambd": 0.5})
def _hardshrink(lambd: float) -> Parts:
    """Hardshrink: x for |x| > λ, 0 otherwise (φ jumps by λ at ±λ)."""
    require(lambd >= 0, "hardshrink", "lambd", lambd, "lambd >= 0")
    return Parts(lambda x: np.where(np.abs(x) > lambd, x, 0.0),
                 lambda x: np.where(np.abs(x) > lambd, 1.0, 0.0), _zero, (-lambd, lambd), None)
