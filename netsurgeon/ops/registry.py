"""The op-kind registry: which module type, function or method is which kind of op.

One registry, three tables (module types, functions, method names). Adding an op
touches one place: a ``register_*`` call with a rule that returns an :class:`OpInfo`.
A node that no rule claims is classified ``OTHER`` with ``known=False`` and is
reported by name, never guessed.

Example:
    >>> import torch.nn as nn
    >>> from netsurgeon.ops import register_module, OpInfo, OpKind
    >>> class Swap(nn.Module):
    ...     def forward(self, x):
    ...         return x.flip(1)
    >>> rule = register_module(Swap)(lambda m, node, ctx: OpInfo(OpKind.RESHAPE, "flip"))
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Protocol, TypeVar

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .._registration import put_undoable
from .kinds import OpInfo, OpKind

__all__ = [
    "arg",
    "is_inplace",
    "registered_python_functions",
    "ClassifyContext",
    "ModuleRule",
    "NodeRule",
    "register_module",
    "register_function",
    "register_method",
    "module_rule",
    "registered_module_types",
    "add_module_rule",
    "add_function_rule",
    "add_method_rule",
    "lookup_type",
    "classify",
    "unknown_hint",
]


class ClassifyContext(Protocol):
    """What a rule may ask about the graph around the node it classifies."""

    root: nn.Module

    def is_signal(self, arg: Any) -> bool:
        """True if ``arg`` is a tensor-valued node that depends on a model input."""

    def info(self, node: fx.Node) -> OpInfo:
        """The classification of an earlier node (nodes are classified in order)."""


ModuleRule = Callable[[nn.Module, fx.Node, ClassifyContext], OpInfo]
NodeRule = Callable[[fx.Node, ClassifyContext], OpInfo]

_MODULE_RULES: dict[type, ModuleRule] = {}
_FUNCTION_RULES: dict[Any, NodeRule] = {}
_METHOD_RULES: dict[str, NodeRule] = {}

T = TypeVar("T")


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem,
                      operator.ior, operator.iand}


def is_inplace(node: fx.Node) -> bool:
    """Whether ``node`` writes into its input: ``x += y``, ``x[i] = v``, ``x.add_(y)``, ``F.relu_(x)``."""
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))


def arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """The value of a call argument given by position ``pos`` or keyword ``name``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def linear_parameters(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any, int] | None:
    """``(weight, bias or None, output axis of the weight)`` of a dense linear layer node: an
    ``nn.Linear`` (``[out, in]``), Hugging Face's ``Conv1D`` module (``x @ W + b``, ``W`` ``[in, out]``),
    or ``F.linear`` / ``torch.addmm`` (what tracing through ``Conv1D`` leaves) whose weight is a
    parameter of ``gm``. None for anything else."""
    def param(a: Any) -> Any:
        if not (isinstance(a, fx.Node) and a.op == "get_attr"):
            return None
        try:
            return gm.get_parameter(a.target)
        except AttributeError:
            return None

    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            return m.weight, m.bias, 0
        w = getattr(m, "weight", None)
        if type(m).__name__ == "Conv1D" and w is not None and w.dim() == 2:
            return w, getattr(m, "bias", None), 1
        return None
    if node.op != "call_function":
        return None
    if node.target is F.linear:
        w = param(arg(node, 1, "weight"))
        return (w, param(arg(node, 2, "bias")), 0) if w is not None and w.dim() == 2 else None
    if node.target is torch.addmm and not node.kwargs and len(node.args) == 3:
        w, b = param(node.args[2]), param(node.args[0])
        if w is not None and w.dim() == 2 and (b is None or (b.dim() == 1 and b.shape[0] == w.shape[1])):
            return (w, b, 1) if b is not None or node.args[0] is None else None
    return None


def dense_weights(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any] | None:
    """``(weight as [out, in], bias or None)`` of :func:`linear_parameters`' layers (a transposed view
    of an ``[in, out]`` weight, which writes into it)."""
    found = linear_parameters(gm, node)
    if found is None:
        return None
    w, b, out_axis = found
    return (w if out_axis == 0 else w.t()), b


def add_module_rule(module_type: type, rule: ModuleRule) -> Callable[[], None]:
    """Register ``rule`` for ``module_type`` (also a leaf when tracing); returns the undo step."""
    return put_undoable(_MODULE_RULES, module_type, rule)


def add_function_rule(fn: Any, rule: NodeRule) -> Callable[[], None]:
    """Register ``rule`` for the ``call_function`` target ``fn``; returns the undo step."""
    return put_undoable(_FUNCTION_RULES, fn, rule)


def add_method_rule(name: str, rule: NodeRule) -> Callable[[], None]:
    """Register ``rule`` for the ``call_method`` target ``name``; returns the undo step."""
    return put_undoable(_METHOD_RULES, name, rule)


def register_module(*types: type) -> Callable[[ModuleRule], ModuleRule]:
    """Register a rule for module types (also makes them leaves when tracing)."""

    def deco(rule: ModuleRule) -> ModuleRule:
        for t in types:
            add_module_rule(t, rule)
        return rule

    return deco


def register_function(*fns: Any) -> Callable[[NodeRule], NodeRule]:
    """Register a rule for ``call_function`` targets (``F.relu``, ``operator.add``...)."""

    def deco(rule: NodeRule) -> NodeRule:
        for f in fns:
            add_function_rule(f, rule)
        return rule

    return deco


def register_method(*names: str) -> Callable[[NodeRule], NodeRule]:
    """Register a rule for ``call_method`` targets (``"relu"``, ``"view"``...)."""

    def deco(rule: NodeRule) -> NodeRule:
        for n in names:
            add_method_rule(n, rule)
        return rule

    return deco


def lookup_type(table: dict[type, T], module: Any) -> T | None:
    """``table``'s value for ``module``: its exact type, or a registered base class whose
    ``forward`` the subclass does not override (a subclass with its own forward may compute
    anything, so it is not assumed to be its base)."""
    cls = type(module)
    value = table.get(cls)
    if value is not None:
        return value
    for base in cls.__mro__[1:]:
        if base in table:
            return table[base] if getattr(cls, "forward", None) is getattr(base, "forward", None) else None
    return None


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule for a module: its exact type, or a registered base class whose
    ``forward`` the subclass does not override (see :func:`lookup_type`)."""
    return lookup_type(_MODULE_RULES, module)


def registered_module_types() -> tuple[type, ...]:
    """Module types with a rule: tracing keeps them as leaves."""
    return tuple(_MODULE_RULES)


def registered_python_functions() -> tuple[Callable[..., Any], ...]:
    """Plain Python functions with a rule (user code, not torch's): tracing records each call to
    one as a single node instead of tracing through it, with no ``torch.fx.wrap`` needed."""
    return tuple(f for f in _FUNCTION_RULES if inspect.isfunction(f)
                 and not (getattr(f, "__module__", "") or "").startswith(("torch", "operator", "builtins")))


def classify(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    """Classify one node. Unknown ops come back as ``OTHER`` with ``known=False``."""
    if node.op == "placeholder":
        return OpInfo(OpKind.INPUT, "input")
    if node.op == "output":
        return OpInfo(OpKind.OUTPUT, "output")
    if node.op == "get_attr":
        return OpInfo(OpKind.CONSTANT, "get_attr")
    tensor_inputs = [a for a in node.all_input_nodes if ctx.is_signal(a)]
    if node.op == "call_module":
        module = ctx.root.get_submodule(node.target)
        rule = module_rule(module)
        if rule is not None:
            return rule(module, node, ctx)
        return OpInfo(OpKind.OTHER, type(module).__name__, known=False,
                      attrs={"module_type": f"{type(module).__module__}.{type(module).__qualname__}"})
    if node.op == "call_function":
        rule = _FUNCTION_RULES.get(node.target)
        name = getattr(node.target, "__name__", str(node.target))
    else:
        rule = _METHOD_RULES.get(node.target)
        name = str(node.target)
    if rule is not None:
        return rule(node, ctx)
    if not tensor_inputs:  # arithmetic on shapes or constants only
        return OpInfo(OpKind.META, name)
    return OpInfo(OpKind.OTHER, name, known=False)


def unknown_hint(node: fx.Node) -> str:
    """How to teach netsurgeon an op it did not recognise."""
    if node.op == "call_module":
        return ("register its module type with netsurgeon.register_module_op(YourType, kind=..., kernel_rule=...), "
                "or netsurgeon.register_activation(name, fn, torch_modules=[YourType]) for an elementwise activation")
    if node.op == "call_function":
        return ("register the function with netsurgeon.register_function_op(fn, kind=..., kernel_rule=...), or "
                "netsurgeon.register_activation(name, fn) for an elementwise activation")
    return (f"register the method with netsurgeon.register_function_op({node.target!r}, kind=..., "
            f"kernel_rule=...)")
