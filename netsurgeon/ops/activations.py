"""The torch side of the activation registry: which modules, functions and methods compute
each activation, and which module rebuilds it.

The math and the traits of an activation live in :mod:`netsurgeon.kernels.registry`;
this module keys the torch forms by the same name. :func:`register_activation` adds both
in one call, and the op classifier then recognises every form it names.

Example:
    >>> import torch, netsurgeon
    >>> def bent(x, slope=0.5):
    ...     return torch.relu(x) + slope * torch.relu(x - 1.0)
    >>> with netsurgeon.register_activation("bent", bent, params={"slope": 0.5}, kinks=[0.0, 1.0],
    ...                                     one_sided=True, lipschitz=lambda slope: 1.0 + abs(slope)):
    ...     from netsurgeon.kernels import LocalMaps, activation_entry
    ...     round(float(LocalMaps("bent").q_map(1.0)), 6), activation_entry("bent").one_sided
    (0.67749, True)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .._registration import Registration
from ..errors import InvalidArgumentError
from ..kernels.registry import ActivationEntry, Lipschitz, Parts, activation_entry, add, resolve
from ..layers import FunctionActivation, Modulus
from .kinds import ActivationSpec, OpInfo, OpKind
from .registry import (_FUNCTION_RULES, _METHOD_RULES, _MODULE_RULES, ClassifyContext, add_function_rule,
                       add_method_rule, add_module_rule, register_function, register_method, register_module)
from .registry import arg

__all__ = ["TorchForms", "activation_module", "register_activation", "torch_forms"]


@dataclass(frozen=True)
class TorchForms:
    """The torch forms of one activation.

    Attributes:
        modules: module types computing it (their attributes named like the parameters hold them).
        functions: ``call_function`` targets, parameters by position after the input or by name.
        methods: tensor method names.
        module: ``factory(**params) -> nn.Module`` rebuilding it at a functional call site; None:
            the first module type, else a :class:`~netsurgeon.layers.FunctionActivation`.
    """

    modules: tuple[type, ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    module: Callable[..., nn.Module] | None = None


_TORCH: dict[str, TorchForms] = {}


def torch_forms(name: str) -> TorchForms | None:
    """The torch forms of a registered activation (an alias gives its target's), or None."""
    entry = activation_entry(name)
    return None if entry is None else _TORCH.get(entry.name)


def activation_module(spec: ActivationSpec) -> nn.Module:
    """A module computing ``spec``'s φ (no DKS/TAT transform): the registered factory, else the
    first module type, else the first torch function wrapped in a ``FunctionActivation``.

    Raises:
        InvalidArgumentError: an unknown activation, or one with no torch form.
    """
    entry, values = resolve(spec.name, dict(spec.params))
    forms = _TORCH.get(entry.name, TorchForms())
    factory = forms.module or (forms.modules[0] if forms.modules else None)
    if factory is not None:
        return factory(**values)
    if forms.functions:
        return FunctionActivation(entry.name, forms.functions[0], values)
    raise InvalidArgumentError(f"activation {spec.name} has no torch module or function to rebuild it; register one "
                               f"with netsurgeon.register_activation({spec.name!r}, torch_modules=[...])")


# ---------------------------------------------------------------- classification rules
def _module_rule(name: str, params: tuple[str, ...]) -> Callable[..., OpInfo]:
    """A module computes ``name`` with the parameters its attributes of the same names hold."""
    def rule(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        missing = [p for p in params if not hasattr(m, p)]
        if missing:
            return OpInfo(OpKind.OTHER, name, known=False,
                          attrs={"reason": f"{type(m).__name__} has no attribute {', '.join(missing)} holding the "
                                           f"parameter of activation {name}"})
        values = tuple((p, float(getattr(m, p))) for p in params)
        return OpInfo(OpKind.ACTIVATION, name, activation=ActivationSpec(name, values))
    return rule


def _node_rule(name: str, params: tuple[str, ...], defaults: Mapping[str, float]) -> Callable[..., OpInfo]:
    """A function or method computes ``name``; parameter i is argument i + 1 or a keyword."""
    def rule(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        values = []
        for pos, p in enumerate(params, start=1):
            v = arg(node, pos, p, defaults[p])
            if isinstance(v, fx.Node):
                return OpInfo(OpKind.OTHER, name, known=False,
                              attrs={"reason": f"parameter {p} is computed at run time"})
            values.append((p, float(v)))
        return OpInfo(OpKind.ACTIVATION, name, activation=ActivationSpec(name, tuple(values)))
    return rule


def _add_forms(reg: Registration, entry: ActivationEntry, modules: Sequence[type], functions: Sequence[Any],
               methods: Sequence[str], module: Callable[..., nn.Module] | None, replace: bool,
               module_rule: Callable[..., OpInfo] | None = None, node_rule: Callable[..., OpInfo] | None = None
               ) -> None:
    """Classification rules for the forms, and the forms recorded under ``entry.name``."""
    taken = [f"module {t.__qualname__}" for t in modules if t in _MODULE_RULES] + \
        [f"function {getattr(f, '__name__', f)}" for f in functions if f in _FUNCTION_RULES] + \
        [f"method {m!r}" for m in methods if m in _METHOD_RULES]
    if taken and not replace:
        raise InvalidArgumentError(f"activation {entry.name}: {', '.join(taken)} already recognised as an op; "
                                   f"pass replace=True to claim it")
    params = tuple(entry.defaults)
    mrule = module_rule or _module_rule(entry.name, params)
    nrule = node_rule or _node_rule(entry.name, params, entry.defaults)
    for t in modules:
        reg.add(add_module_rule(t, mrule))
    for f in functions:
        reg.add(add_function_rule(f, nrule))
    for m in methods:
        reg.add(add_method_rule(m, nrule))
    had, old = entry.name in _TORCH, _TORCH.get(entry.name, TorchForms())
    _TORCH[entry.name] = TorchForms(old.modules + tuple(modules), old.functions + tuple(functions),
                                    old.methods + tuple(methods), module or old.module)

    def undo() -> None:
        if had:
            _TORCH[entry.name] = old
        else:
            _TORCH.pop(entry.name, None)
    reg.add(undo)


# ---------------------------------------------------------------- math from a torch function
def _torch_math(fn: Callable[..., torch.Tensor], kinks: Sequence[float] | Callable[..., Sequence[float]],
                scale: float | None, leaky_slope: float | str | None) -> Callable[..., Parts]:
    """A kernels builder from an elementwise torch function: φ in float64, φ' and φ'' by autograd."""
    def builder(**params: float) -> Parts:
        def phi(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return fn(torch.tensor(np.asarray(x, dtype=float)), **params).detach().numpy()

        def derivative(x: np.ndarray, order: int) -> np.ndarray:
            t = torch.tensor(np.asarray(x, dtype=float), requires_grad=True)
            with torch.enable_grad():
                y = fn(t, **params)
                for _ in range(order):
                    if not y.requires_grad:
                        return np.zeros(t.shape)
                    (y,) = torch.autograd.grad(y.sum(), t, create_graph=True, allow_unused=True)
                    if y is None:
                        return np.zeros(t.shape)
            return y.detach().numpy()

        points = kinks(**params) if callable(kinks) else kinks
        slope = params[leaky_slope] if isinstance(leaky_slope, str) else leaky_slope
        return Parts(phi, lambda x: derivative(x, 1), lambda x: derivative(x, 2),
                     tuple(float(t) for t in points), scale, None if slope is None else float(slope))
    return builder


def register_activation(name: str, fn: Callable[..., torch.Tensor] | None = None, *,
                        params: Mapping[str, float] | None = None,
                        kinks: Sequence[float] | Callable[..., Sequence[float]] = (), scale: float | None = 1.0,
                        one_sided: bool = False, relu_family: bool = False, leaky_slope: float | str | None = None,
                        lipschitz: Lipschitz = None, module: Callable[..., nn.Module] | None = None,
                        torch_modules: Sequence[type] = (), torch_functions: Sequence[Any] | None = None,
                        torch_methods: Sequence[str] = (), replace: bool = False) -> Registration:
    """Register an elementwise activation in one call: its math, its traits and its torch forms.

    ``netsurgeon.analyze`` then has its local maps, the ``dks``/``tat`` passes shape it (a
    functional call site is rebuilt as ``module``, the first module type, or a
    ``FunctionActivation``), ``farkas`` treats it as one-sided when told, and the contractivity
    bound uses its Lipschitz constant. A plain Python function called in ``forward`` must be
    a leaf for torch.fx: ``torch.fx.wrap("fn_name")`` at the top of the module that calls it.

    Args:
        name: the activation's name (a Python identifier).
        fn: φ as an elementwise torch function ``fn(x, **params)``; φ' and φ'' come from
            autograd in float64. None with ``torch_modules``: φ is ``torch_modules[0](**params)``;
            None for an already registered name: only the torch forms (and ``module``) are added.
        params: the parameters and their defaults, in positional order after the input. Default: none.
        kinks: points where φ, φ' or φ'' is not smooth, or ``fn(**params)`` giving them. Default: none.
        scale: the width over which the smooth pieces vary (None for piecewise polynomials). Default: 1.0.
        one_sided: (nearly) zero for very negative inputs: ``farkas`` guards its layers. Default: False.
        relu_family: a rectifier the ``modulus`` pass replaces by ``|x|``. Default: False.
        leaky_slope: φ is ``x`` for ``x > 0`` and ``s·x`` otherwise, with ``s`` this number or the
            parameter it names: closed-form maps, and ``tat`` makes it a TReLU. Default: None.
        lipschitz: the Lipschitz constant, a number or ``fn(**params)``; None: ``max |φ'|``
            measured on a grid. Default: None.
        module: ``factory(**params) -> nn.Module`` rebuilding φ. Default: the first of
            ``torch_modules``, else a ``FunctionActivation`` around the first torch function.
        torch_modules: module types computing φ; their attributes named like the parameters
            hold them. Default: none.
        torch_functions: ``call_function`` targets computing φ. Default: ``[fn]``.
        torch_methods: tensor method names computing φ. Default: none.
        replace: replace an activation, module, function or method already registered. Default: False.

    Returns:
        A :class:`~netsurgeon._registration.Registration`; ``remove()`` it, or use it as a
        context manager, to take everything back.

    Raises:
        InvalidArgumentError: the name or a form is taken (without ``replace``), traits given
            without ``fn`` for an existing name, or nothing to compute φ with.
    """
    if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        raise InvalidArgumentError(f"register_activation({name!r}): scale={scale!r} must be a positive number (or None "
                                   f"for piecewise polynomial activations)")
    reg = Registration(f"activation {name!r}")
    entry = activation_entry(name) if isinstance(name, str) else None
    new_math = fn is not None or entry is None
    if not new_math and (params or kinks or one_sided or relu_family or leaky_slope is not None
                         or lipschitz is not None):
        raise InvalidArgumentError(f"register_activation({name!r}): {name} is registered already; pass fn (and "
                                   f"replace=True) to redefine its math or traits, or only torch forms to add them")
    if new_math:
        if fn is None and not torch_modules:
            raise InvalidArgumentError(f"register_activation({name!r}): pass fn (an elementwise torch function) or "
                                       f"torch_modules=[...] to compute the activation")
        if fn is None:
            fn = _via_module(torch_modules[0])
        elif torch_functions is None:
            torch_functions = (fn,)
        math_fn = _torch_math(fn, kinks, scale, leaky_slope)
        entry = ActivationEntry(name, math_fn, {k: float(v) for k, v in (params or {}).items()}, bool(one_sided),
                                bool(relu_family), leaky_slope, lipschitz)
        reg.add(add(entry, replace=replace))
    try:
        _add_forms(reg, entry, tuple(torch_modules), tuple(torch_functions or ()), tuple(torch_methods), module,
                   replace)
    except Exception:
        reg.remove()
        raise
    return reg


def _via_module(module_type: type) -> Callable[..., torch.Tensor]:
    """φ computed by a fresh ``module_type(**params)``."""
    def fn(x: torch.Tensor, **params: float) -> torch.Tensor:
        return module_type(**params)(x)
    return fn


def _builtin(name: str, modules: Sequence[type] = (), functions: Sequence[Any] = (), methods: Sequence[str] = (),
             module: Callable[..., nn.Module] | None = None, **rules: Callable[..., OpInfo]) -> None:
    """The torch forms of a built-in activation (whose math is in ``netsurgeon.kernels``)."""
    _add_forms(Registration(name), activation_entry(name), modules, functions, methods, module, False, **rules)


# ---------------------------------------------------------------- PyTorch's activations
_builtin("relu", (nn.ReLU,), (F.relu, torch.relu, F.relu_, torch.relu_), ("relu", "relu_"))
_builtin("leaky_relu", (nn.LeakyReLU,), (F.leaky_relu, F.leaky_relu_))
_builtin("elu", (nn.ELU,), (F.elu, F.elu_))
_builtin("celu", (nn.CELU,), (F.celu, F.celu_))
_builtin("selu", (nn.SELU,), (F.selu, torch.selu, F.selu_))
_builtin("silu", (nn.SiLU,), (F.silu,))
_builtin("mish", (nn.Mish,), (F.mish,))
_builtin("softplus", (nn.Softplus,), (F.softplus,))
_builtin("tanh", (nn.Tanh,), (torch.tanh, F.tanh), ("tanh", "tanh_"))
_builtin("sigmoid", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid", "sigmoid_"))
_builtin("hardtanh", (nn.Hardtanh,), (F.hardtanh, F.hardtanh_))
_builtin("relu6", (nn.ReLU6,), (F.relu6,))
_builtin("hardswish", (nn.Hardswish,), (F.hardswish,))
_builtin("hardsigmoid", (nn.Hardsigmoid,), (F.hardsigmoid,))
_builtin("softsign", (nn.Softsign,), (F.softsign,))
_builtin("abs", (Modulus,), (torch.abs, torch.absolute), ("abs", "abs_"))
_builtin("tanhshrink", (nn.Tanhshrink,), (F.tanhshrink,))
_builtin("softshrink", (nn.Softshrink,), (F.softshrink,))
_builtin("hardshrink", (nn.Hardshrink,), (F.hardshrink,))
_builtin("logsigmoid", (nn.LogSigmoid,), (F.logsigmoid,))


def _gelu_module(m: nn.GELU, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    name = "gelu_tanh" if m.approximate == "tanh" else "gelu"
    return OpInfo(OpKind.ACTIVATION, name, activation=ActivationSpec(name))


def _gelu_fn(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    name = "gelu_tanh" if arg(node, 1, "approximate", "none") == "tanh" else "gelu"
    return OpInfo(OpKind.ACTIVATION, name, activation=ActivationSpec(name))


_builtin("gelu", (nn.GELU,), (F.gelu,), module=lambda: nn.GELU(), module_rule=_gelu_module, node_rule=_gelu_fn)
_builtin("gelu_tanh", module=lambda: nn.GELU(approximate="tanh"))


@register_module(FunctionActivation)
def _function_activation(m: FunctionActivation, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    spec = ActivationSpec(m.name, tuple((k, float(v)) for k, v in m.params.items()))
    return OpInfo(OpKind.ACTIVATION, m.name, activation=spec)


@register_module(nn.PReLU)
def _prelu_module(m: nn.PReLU, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    w = m.weight.detach().flatten().tolist()
    slope: Any = float(w[0]) if len(w) == 1 else tuple(float(v) for v in w)
    return OpInfo(OpKind.ACTIVATION, "prelu", activation=ActivationSpec("prelu", (("negative_slope", slope),)),
                  attrs={"per_channel": len(w) > 1})


@register_module(nn.RReLU)
def _rrelu_module(m: nn.RReLU, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    # Random slope in train mode; eval uses the mean slope.
    slope = (m.lower + m.upper) / 2
    return OpInfo(OpKind.ACTIVATION, "leaky_relu",
                  activation=ActivationSpec("leaky_relu", (("negative_slope", slope),)),
                  attrs={"train_dependent": True, "module": "RReLU"})


def _buffer_scalar(ctx: ClassifyContext, value: Any) -> Any:
    """A one-element buffer read by a ``get_attr`` node, as a float (a clamp bound kept in a buffer);
    anything else as it is (a parameter may train away from its value: it stays a node)."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        try:
            t = ctx.root.get_buffer(str(value.target))
        except AttributeError:
            return value
        if t.numel() == 1:
            return float(t)
    return value


@register_method("clamp", "clamp_", "clip")
@register_function(torch.clamp, torch.clip)
def _clamp(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    lo, hi = _buffer_scalar(ctx, arg(node, 1, "min")), _buffer_scalar(ctx, arg(node, 2, "max"))
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return OpInfo(OpKind.OTHER, "clamp", known=False, attrs={"reason": "bounds computed at run time"})
    if lo == 0 and hi is None:
        return OpInfo(OpKind.ACTIVATION, "relu", activation=ActivationSpec("relu"))
    lo = float("-inf") if lo is None else float(lo)
    hi = float("inf") if hi is None else float(hi)
    if lo == float("-inf") and hi == float("inf"):  # Gemma 4's clippable linear layers, clamps off
        return OpInfo(OpKind.IDENTITY, "clamp", attrs={"reason": "infinite bounds"})
    return OpInfo(OpKind.ACTIVATION, "hardtanh",
                  activation=ActivationSpec("hardtanh", (("min_val", lo), ("max_val", hi))))
