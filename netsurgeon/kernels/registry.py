"""The activation registry: one entry per name with the math and the traits passes read.

An entry holds a builder of :class:`Parts` (φ, φ', φ'', kinks, scale) with the parameter
defaults, and the facts the passes and analyses act on:

* ``one_sided``: φ is (nearly) zero for very negative inputs and grows on the positive
  side (ReLU, ELU, GELU, SiLU...): a layer whose units all sit on the flat side is dead,
  which the ``farkas`` pass prevents (docs/theory.md §6.4).
* ``relu_family``: a rectifier the consistency paper's modulus unit ``|x|`` replaces
  (ReLU, leaky ReLU, ReLU6; the ``modulus`` pass, docs/theory.md §8.4).
* ``leaky_slope``: for the leaky-ReLU family ``φ(x) = x (x > 0), s x (x ≤ 0)``, the slope
  ``s``: a number (ReLU: 0.0) or the name of the parameter holding it (``"negative_slope"``).
  TAT replaces such activations by TReLU (docs/theory.md §5.1); None outside the family.
* ``lipschitz``: the Lipschitz constant, a number or a function of the parameters; None
  means ``max |φ'|`` is measured (contractivity, docs/theory.md §8.5).

An alias (``prelu`` for ``leaky_relu``) has its own parameter defaults and the target's
math and traits. Names and parameters follow :class:`netsurgeon.ops.kinds.ActivationSpec`.
This module imports no framework: the torch side of an activation (which modules and
functions compute it) lives in :mod:`netsurgeon.ops.activations`, keyed by the same name.

Example:
    >>> from netsurgeon.kernels import activation_entry
    >>> e = activation_entry("prelu")
    >>> e.name, e.negative_slope({"negative_slope": 0.25}), e.relu_family, e.one_sided
    ('leaky_relu', 0.25, True, False)
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Union

import numpy as np

from .._registration import put_undoable
from ..errors import InvalidArgumentError

__all__ = ["ActivationEntry", "Parts", "REGISTRY", "activation_entry", "add", "add_alias", "list_names", "register",
           "require", "resolve", "version"]

ArrayFn = Callable[[np.ndarray], np.ndarray]
Lipschitz = Union[float, Callable[..., float], None]


class Parts(NamedTuple):
    """φ, φ', φ'', kinks, scale, leaky slope and centers of one activation (see ``Activation``)."""

    phi: ArrayFn
    dphi: ArrayFn
    d2phi: ArrayFn
    kinks: tuple[float, ...] = ()
    scale: float | None = 1.0
    leaky_slope: float | None = None
    centers: tuple[float, ...] | None = None


@dataclass(frozen=True, eq=False)
class ActivationEntry:
    """One registered activation: its math and its traits (see the module docstring).

    Args:
        name: the canonical name.
        builder: ``builder(**params) -> Parts``.
        defaults: the parameters in call order, with their defaults.
        one_sided: dead on the negative side (the ``farkas`` pass applies). Default: False.
        relu_family: a rectifier the ``modulus`` pass replaces by ``|x|``. Default: False.
        leaky_slope: the leaky-ReLU-family slope, a number or a parameter name; None
            outside the family. Default: None.
        lipschitz: Lipschitz constant, a number or ``fn(**params)``; None: measured. Default: None.
    """

    name: str
    builder: Callable[..., Parts]
    defaults: Mapping[str, float] = field(default_factory=dict)
    one_sided: bool = False
    relu_family: bool = False
    leaky_slope: float | str | None = None
    lipschitz: Lipschitz = None

    def values(self, params: Mapping[str, float]) -> dict[str, float]:
        """Every parameter's value: ``params`` over the defaults."""
        return {k: float(params.get(k, v)) for k, v in self.defaults.items()}

    def negative_slope(self, params: Mapping[str, float]) -> float | None:
        """The leaky-family slope ``s`` at ``params``, or None outside the family."""
        if isinstance(self.leaky_slope, str):
            return self.values(params)[self.leaky_slope]
        return None if self.leaky_slope is None else float(self.leaky_slope)

    def lipschitz_constant(self, params: Mapping[str, float]) -> float | None:
        """The registered Lipschitz constant at ``params``, or None (to be measured)."""
        if callable(self.lipschitz):
            return float(self.lipschitz(**self.values(params)))
        return None if self.lipschitz is None else float(self.lipschitz)


REGISTRY: dict[str, ActivationEntry] = {}
_ALIASES: dict[str, tuple[str, dict[str, float]]] = {}  # alias -> (canonical name, its own defaults)
_VERSION = [0]  # bumped on every change, so caches keyed on it never serve a replaced entry


def version() -> int:
    """A counter that changes whenever an entry or alias is added or removed."""
    return _VERSION[0]


def _bump() -> None:
    _VERSION[0] += 1


def _put(table: dict, key: str, value: object) -> Callable[[], None]:
    """Set ``table[key]`` and return the undo step; either bumps :func:`version`."""
    return put_undoable(table, key, value, _bump)


def _pop(table: dict, key: str) -> Callable[[], None]:
    """Remove ``table[key]`` (present) and return the undo step that puts it back."""
    old = table.pop(key)
    _VERSION[0] += 1

    def undo() -> None:
        table[key] = old
        _VERSION[0] += 1
    return undo


def _claim(name: str, replace: bool) -> list[Callable[[], None]]:
    """Check that ``name`` may be (re)defined; free it and return the undo steps."""
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidArgumentError(f"activation name {name!r} must be a Python identifier such as 'bent_relu'")
    if (name in REGISTRY or name in _ALIASES) and not replace:
        raise InvalidArgumentError(f"activation {name!r} is already registered; pass replace=True to replace it")
    return [_pop(table, name) for table in (REGISTRY, _ALIASES) if name in table]


def _chain(steps: list[Callable[[], None]]) -> Callable[[], None]:
    """One undo step running ``steps`` in reverse order."""
    def undo() -> None:
        for step in reversed(steps):
            step()
    return undo


def add(entry: ActivationEntry, replace: bool = False) -> Callable[[], None]:
    """Register ``entry`` under ``entry.name``; returns the undo step.

    Raises:
        InvalidArgumentError: the name is taken (without ``replace``), a default is not a
            finite number, or ``leaky_slope`` names no parameter.
    """
    for k, v in entry.defaults.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise InvalidArgumentError(f"activation {entry.name}: default {k}={v!r} must be a finite number")
    if isinstance(entry.leaky_slope, str) and entry.leaky_slope not in entry.defaults:
        raise InvalidArgumentError(f"activation {entry.name}: leaky_slope={entry.leaky_slope!r} names no parameter; "
                                   f"parameters: {', '.join(entry.defaults) or 'none'}")
    steps = _claim(entry.name, replace)
    steps.append(_put(REGISTRY, entry.name, entry))
    return _chain(steps)


def register(name: str, *, params: Mapping[str, float] | None = None, one_sided: bool = False,
             relu_family: bool = False, leaky_slope: float | str | None = None, lipschitz: Lipschitz = None
             ) -> Callable[[Callable[..., Parts]], Callable[..., Parts]]:
    """Decorator: register a builder of ``Parts`` under ``name`` (the built-ins' form; see :func:`add`)."""
    def deco(builder: Callable[..., Parts]) -> Callable[..., Parts]:
        add(ActivationEntry(name, builder, dict(params or {}), one_sided, relu_family, leaky_slope, lipschitz))
        return builder
    return deco


def add_alias(name: str, target: str, replace: bool = False, **defaults: float) -> Callable[[], None]:
    """Make ``name`` stand for ``target`` with its own parameter defaults; returns the undo step."""
    canonical = activation_entry(target)
    if canonical is None:
        raise InvalidArgumentError(f"alias {name!r}: unknown target activation {target!r}")
    unknown = sorted(set(defaults) - set(canonical.defaults))
    if unknown:
        raise InvalidArgumentError(f"alias {name!r}: {canonical.name} has no parameter {', '.join(unknown)}")
    steps = _claim(name, replace)
    steps.append(_put(_ALIASES, name, (canonical.name, {k: float(v) for k, v in defaults.items()})))
    return _chain(steps)


def list_names() -> list[str]:
    """Every registered name and alias, sorted."""
    return sorted(set(REGISTRY) | set(_ALIASES))


def activation_entry(name: str) -> ActivationEntry | None:
    """The entry of a registered name, an alias's target entry, or None for an unknown name."""
    if name in _ALIASES:
        name = _ALIASES[name][0]
    return REGISTRY.get(name)


def resolve(name: str, params: Mapping[str, float]) -> tuple[ActivationEntry, dict[str, float]]:
    """The canonical entry of ``name`` and every parameter's value (an alias's defaults apply).

    Raises:
        InvalidArgumentError: unknown name (with close matches and the valid names) or parameter.
    """
    entry = activation_entry(name)
    if entry is None:
        names = list_names()
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InvalidArgumentError(f"unknown activation {name!r}.{hint} Valid names: {', '.join(names)}; "
                                   "or pass a numpy callable with its kinks=[...], or register it with "
                                   "netsurgeon.register_activation.")
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        valid = ", ".join(entry.defaults) or "none"
        raise InvalidArgumentError(f"activation {name!r} has no parameter {', '.join(unknown)}; "
                                   f"valid parameters: {valid}")
    own = _ALIASES[name][1] if name in _ALIASES else {}
    return entry, entry.values({**own, **params})


def require(ok: bool, name: str, param: str, value: float, valid: str) -> None:
    """Raise ValueError naming the activation, the parameter and its valid range unless ``ok``."""
    if not ok:
        raise InvalidArgumentError(f"activation {name}: parameter {param}={value!r} is out of range; valid: {valid}")
