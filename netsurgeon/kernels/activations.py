"""Elementwise activations as numpy functions: φ, φ', φ'' and the kink points.

The names and parameters are those of :class:`netsurgeon.ops.kinds.ActivationSpec`
(PyTorch's and timm's functions). A kink is a point where φ, φ' or φ'' is not smooth;
the local maps (docs/theory.md §2.3) split their integrals there.

Example:
    >>> act = get_activation("leaky_relu", negative_slope=0.2)
    >>> act.kinks, float(act.phi(-1.0)), float(act.dphi(-1.0))
    ((0.0,), -0.2, 0.2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidArgumentError
from . import builtin_activations as _builtins  # noqa: F401  (registers the built-ins)
from .registry import list_names, require, resolve

__all__ = ["Activation", "get_activation", "list_activations"]

ArrayFn = Callable[[np.ndarray], np.ndarray]
_JUMP_TOL = 1e-8  # a one-sided limit difference above this (relative to the values) is a jump


@dataclass(frozen=True, eq=False)
class Activation:
    """An elementwise activation φ with its derivatives, defined almost everywhere.

    Args:
        name: canonical name (``"elu"``) or the user callable's name.
        phi: φ, vectorized over numpy arrays.
        dphi: φ' away from the kinks.
        d2phi: φ'' away from the kinks.
        kinks: points where φ, φ' or φ'' is discontinuous (or has a discontinuous derivative).
        params: the parameter values, e.g. ``(("alpha", 1.0),)``.
        scale: width over which the smooth pieces vary (0.75 for tanh, 1.5/β for softplus),
            or None when they are polynomials; the quadrature refines around ``centers``
            when the input's standard deviation exceeds 1.5 scale.
        centers: where that variation sits (the kinks, or 0 for smooth activations).
        leaky_slope: ``a`` when ``φ(x) = g (relu(x) - a relu(-x))`` (ReLU, leaky ReLU, abs,
            identity, and their positive multiples), which has closed-form maps; ``None`` otherwise.
        leaky_gain: ``g`` of that form. Default: 1.
    """

    name: str
    phi: ArrayFn
    dphi: ArrayFn
    d2phi: ArrayFn
    kinks: tuple[float, ...] = ()
    params: tuple[tuple[str, float], ...] = ()
    scale: float | None = None
    centers: tuple[float, ...] = (0.0,)
    leaky_slope: float | None = None
    leaky_gain: float = 1.0

    def __call__(self, x: ArrayLike) -> np.ndarray:
        """φ(x), elementwise."""
        return self.phi(np.asarray(x, dtype=float))

    @property
    def smooth(self) -> bool:
        """True when φ has no kinks (Gauss–Hermite applies while its scale is resolved)."""
        return not self.kinks

    def phi_jumps(self) -> tuple[float, ...]:
        """φ(t+) - φ(t-) at each kink t (0 where φ is continuous)."""
        return tuple(_jump(self.phi, t) for t in self.kinks)

    def dphi_jumps(self) -> tuple[float, ...]:
        """φ'(t+) - φ'(t-) at each kink t (0 where φ' is continuous)."""
        return tuple(_jump(self.dphi, t) for t in self.kinks)

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v:g}" for k, v in self.params)
        return f"{self.name}({inner})" if inner else self.name


def _jump(fn: ArrayFn, t: float) -> float:
    """fn(t+) - fn(t-) by linear extrapolation of one-sided values; 0 below a relative 1e-8."""
    d = 1e-6 * max(1.0, abs(t))
    v = np.asarray(fn(np.array([t - 2 * d, t - d, t + d, t + 2 * d], dtype=float)), dtype=float)
    left, right = 2 * v[1] - v[0], 2 * v[2] - v[3]
    jump = float(right - left)
    return jump if abs(jump) > _JUMP_TOL * max(1.0, abs(left), abs(right)) else 0.0


def list_activations() -> list[str]:
    """The names :func:`get_activation` accepts (canonical names and aliases such as ``prelu``)."""
    return list_names()


def _from_name(name: str, params: dict[str, Any]) -> Activation:
    """Build a registered activation (an alias builds its target); unknown names and parameters
    raise ValueError."""
    entry, values = resolve(name, params)
    for k, v in values.items():
        require(bool(np.isfinite(v)), name, k, v, "a finite number")
    parts = entry.builder(**values)
    kinks = tuple(sorted(float(t) for t in parts.kinks))
    centers = parts.centers if parts.centers is not None else (kinks or (0.0,))
    return Activation(entry.name, parts.phi, parts.dphi, parts.d2phi, kinks, tuple(values.items()), parts.scale,
                      tuple(centers), parts.leaky_slope)


def get_activation(spec_or_name: Any, **params: Any) -> Activation:
    """An :class:`Activation` from a name, an ``ActivationSpec``, an ``Activation`` or a callable.

    Args:
        spec_or_name: a canonical name (see :func:`list_activations`), an object with
            ``name`` and ``params`` (``netsurgeon.ops.kinds.ActivationSpec``), an
            ``Activation`` (returned as is), or a numpy callable φ.
        **params: the activation's parameters (override the spec's). For a callable:
            ``kinks`` (points where φ, φ' or φ'' is not smooth; default none),
            ``dphi`` and ``d2phi`` (default: finite differences), ``scale`` (width of the
            smooth pieces' variation, default 1.0; None for polynomial pieces),
            ``centers`` (default: the kinks, or 0) and ``name``.

    Returns:
        The activation.

    Example:
        >>> get_activation("elu", alpha=0.5).params
        (('alpha', 0.5),)
        >>> round(float(get_activation(lambda x: x ** 2, kinks=[]).dphi(3.0)), 9)  # finite differences
        6.0
    """
    if isinstance(spec_or_name, Activation):
        if params:
            raise InvalidArgumentError(f"parameters {sorted(params)} given with a ready Activation {spec_or_name}")
        return spec_or_name
    if isinstance(spec_or_name, str):
        return _from_name(spec_or_name, params)
    if hasattr(spec_or_name, "name") and hasattr(spec_or_name, "params") and not callable(spec_or_name):
        return _from_name(str(spec_or_name.name), {**dict(spec_or_name.params), **params})
    if callable(spec_or_name):
        return _from_callable(spec_or_name, **params)
    raise InvalidArgumentError(f"expected an activation name, ActivationSpec or callable, got "
                               f"{type(spec_or_name).__name__}")


def _from_callable(fn: ArrayFn, kinks: Sequence[float] = (), dphi: ArrayFn | None = None,
                   d2phi: ArrayFn | None = None, name: str | None = None, scale: float | None = 1.0,
                   centers: Sequence[float] | None = None) -> Activation:
    """A user activation; missing derivatives by finite differences that never straddle a kink."""
    kinks_t = tuple(sorted(float(t) for t in kinks))
    if scale is not None and not scale > 0:
        raise InvalidArgumentError(f"scale={scale!r} must be > 0 (or None for piecewise polynomial activations)")
    centers_t = tuple(float(c) for c in centers) if centers is not None else (kinks_t or (0.0,))

    def phi(x: np.ndarray) -> np.ndarray:
        return np.asarray(fn(np.asarray(x, dtype=float)), dtype=float)
    return Activation(name or getattr(fn, "__name__", "callable"), phi,
                      dphi or _finite_difference(phi, kinks_t, 1), d2phi or _finite_difference(phi, kinks_t, 2),
                      kinks_t, (), scale, centers_t)


def _finite_difference(fn: ArrayFn, kinks: tuple[float, ...], order: int) -> ArrayFn:
    """The first or second derivative of ``fn``: 5-point central differences (step 1e-3),
    one-sided 4-point differences (step 1e-5 resp. 1e-4) within two central steps of a kink."""
    def deriv(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        scale = np.maximum(1.0, np.abs(x))
        h = 1e-3 * scale
        f = [fn(x + j * h) for j in (-2, -1, 0, 1, 2)]
        if order == 1:
            out = (f[0] - 8 * f[1] + 8 * f[3] - f[4]) / (12 * h)
        else:
            out = (-f[0] + 16 * f[1] - 30 * f[2] + 16 * f[3] - f[4]) / (12 * h * h)
        if not kinks:
            return out
        gap = x[..., None] - np.asarray(kinks)
        nearest = np.take_along_axis(gap, np.abs(gap).argmin(axis=-1)[..., None], axis=-1)[..., 0]
        near = np.abs(nearest) < 2 * h
        if not np.any(near):
            return out
        xs = x[near]
        hs = (1e-5 if order == 1 else 1e-4) * scale[near] * np.where(nearest[near] >= 0, 1.0, -1.0)
        g = [fn(xs + j * hs) for j in range(4)]
        if order == 1:
            one_sided = (-11 * g[0] + 18 * g[1] - 9 * g[2] + 2 * g[3]) / (6 * hs)
        else:
            one_sided = (2 * g[0] - 5 * g[1] + 4 * g[2] - g[3]) / (hs * hs)
        out = np.array(out, dtype=float)
        out[near] = one_sided
        return out
    return deriv
