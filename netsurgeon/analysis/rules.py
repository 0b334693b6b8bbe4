"""The rule tables of the analyses: what each op kind, or a registered module type, does to
the quantity an analysis propagates.

Three tables, one mechanism (:class:`RuleTable`), each filled by a decorator next to the
analysis it serves:

* ``KERNEL_RULES`` (``@kernel_rule``, in :mod:`.propagate`): the predicted ``q, q', k`` and
  ``dk/dk_in`` at a node, for ``netsurgeon.analyze`` (docs/theory.md §3);
* ``IDEAL_RULES`` (``@ideal_rule``, in :mod:`.ideal_rules`): ``(q, value)`` under the DKS
  assumptions, for the ``dks``/``tat`` targets (docs/theory.md §4.4–§4.5);
* ``BOUND_RULES`` (``@bound_rule``, in :mod:`.contractivity`): Lipschitz factors, for
  ``operator_norm_bound`` (docs/theory.md §8.5).

A node's rule is its module type's when one is registered (the exact type, or a base class
whose ``forward`` the subclass keeps), else its :class:`~netsurgeon.ops.OpKind`'s.
:func:`register_module_op` teaches every analysis a custom module in one call.

Example:
    >>> import torch, torch.nn as nn, netsurgeon
    >>> class Gain(nn.Module):  # y = 3 x
    ...     def forward(self, x):
    ...         return 3.0 * x
    >>> def gain_rule(ctx, inputs):
    ...     return inputs[0].linear(9.0)  # q, q', k times 3²
    >>> with netsurgeon.register_module_op(Gain, kind=netsurgeon.OpKind.AFFINE, kernel_rule=gain_rule,
    ...                                    lipschitz=3.0):
    ...     a = netsurgeon.analyze(nn.Sequential(nn.Linear(8, 8), Gain()))
    ...     round(a.q("_1") / a.q("_0"), 12)
    9.0
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, NamedTuple, TypeVar

import numpy as np
import torch.fx as fx
import torch.nn as nn

from .._registration import Registration, put_undoable
from ..errors import InvalidArgumentError
from ..ops import OpInfo, OpKind
from ..ops.registry import (_FUNCTION_RULES, _METHOD_RULES, _MODULE_RULES, add_function_rule, add_method_rule,
                            add_module_rule, lookup_type)

__all__ = ["APPROX", "BOUND_RULES", "Bound", "EXACT", "IDEAL_RULES", "KERNEL_RULES", "KernelContext", "NodeKernel",
           "RuleTable", "UNSUPPORTED", "bound_rule", "kernel_rule", "register_function_op", "register_module_op"]

EXACT, APPROX, UNSUPPORTED = "exact", "approximate", "unsupported"
R = TypeVar("R")


def worse(*statuses: str) -> str:
    """The least exact of ``statuses``."""
    order = [EXACT, APPROX, UNSUPPORTED]
    return max(statuses, key=order.index)


def reasons(*parts: str) -> str:
    """The distinct reasons of ``parts`` (each a "; "-joined list), in first-seen order."""
    return "; ".join(dict.fromkeys(r for p in parts if p for r in p.split("; ")))


@dataclass
class NodeKernel:
    """Predicted kernel quantities at one node, over the grid of input cosines.

    Attributes:
        q: mean square of the first input's features (scalar).
        q2: mean square of the second input's features (scalar).
        k: cross term, one value per grid point.
        dk: ``dk_node / dk_in`` at input ``c = 1``.
        status: ``"exact"``, ``"approximate"`` or ``"unsupported"``.
        reason: why approximate or unsupported.
        dims: feature count per example (for concatenation weights), when known.
    """

    q: float
    q2: float
    k: np.ndarray
    dk: float
    status: str = EXACT
    reason: str = ""
    dims: int | None = None

    @property
    def c(self) -> np.ndarray:
        return self.k / np.sqrt(max(self.q * self.q2, 1e-300))

    def linear(self, sw: float, sb: float = 0.0, status: str = EXACT, reason: str = "") -> "NodeKernel":
        """After ``y = W h + b`` with ``σw² = sw``, ``σb² = sb``: ``q ← sw q + sb``, ``k ← sw k + sb``
        (docs/theory.md §3.1); ``status``/``reason`` join this kernel's."""
        return NodeKernel(sw * self.q + sb, sw * self.q2 + sb, sw * self.k + sb, sw * self.dk,
                          worse(self.status, status), reasons(self.reason, reason))


@dataclass
class KernelContext:
    """What a kernel rule may read about its node.

    Attributes:
        node: the fx node; ``info``: its classification; ``gm``: the graph module.
        dims: the node's feature count per example, when known.
        activation_maps: ``ActivationSpec -> maps`` (None when netsurgeon has none).
        cache: one analysis's store (layer weight statistics), or None.
    """

    node: fx.Node
    info: OpInfo
    gm: fx.GraphModule
    dims: int | None
    activation_maps: Callable[[Any], Any]
    cache: dict[int, Any] | None = None

    @property
    def module(self) -> nn.Module | None:
        """The called module of a ``call_module`` node, else None."""
        return self.gm.get_submodule(self.node.target) if self.node.op == "call_module" else None


KernelRule = Callable[[KernelContext, "list[NodeKernel]"], "NodeKernel | None"]


class Bound(NamedTuple):
    """One node's part in a Lipschitz bound.

    Attributes:
        factor: its own factor (singular value, Lipschitz constant), or None (factor-free).
        what: what the factor is (``"linear"``, ``"norm"``, ``"activation"``...).
        unbounded: why there is no bound (the bound past the node is ``inf``), or None.
        combine: ``inputs' bounds -> bound`` for merges; None multiplies the first input's by ``factor``.
    """

    factor: float | None = None
    what: str = ""
    unbounded: str | None = None
    combine: Callable[[list[float]], float] | None = None


class RuleTable(Generic[R]):
    """Rules keyed by :class:`~netsurgeon.ops.OpKind`, by module type, or by the op key a
    registered function or method op carries in ``OpInfo.attrs["op_key"]``.

    Args:
        what: what the rules compute, for messages.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._kinds: dict[OpKind, R] = {}
        self._types: dict[type, R] = {}
        self._ops: dict[str, R] = {}

    def add(self, key: OpKind | type | str, rule: R) -> Callable[[], None]:
        """Register ``rule`` for a kind, a module type or an op key; returns the undo step."""
        table: dict = self._kinds if isinstance(key, OpKind) else self._ops if isinstance(key, str) else self._types
        return put_undoable(table, key, rule)

    def register(self, *keys: OpKind | type) -> Callable[[R], R]:
        """Decorator: register the rule for each kind or module type in ``keys``."""
        def deco(rule: R) -> R:
            for key in keys:
                self.add(key, rule)
            return rule
        return deco

    def for_module(self, module: nn.Module | None) -> R | None:
        """The rule registered for ``module``'s type (see :func:`netsurgeon.ops.registry.lookup_type`)."""
        return None if module is None else lookup_type(self._types, module)

    def for_kind(self, kind: OpKind) -> R | None:
        return self._kinds.get(kind)

    def for_op(self, info: OpInfo, module: nn.Module | None) -> R | None:
        """The rule of this very op: its module type's, or its registered function/method op's."""
        rule = self.for_module(module)
        key = info.attrs.get("op_key")
        return rule if rule is not None or not isinstance(key, str) else self._ops.get(key)

    def find(self, info: OpInfo, module: nn.Module | None) -> R | None:
        """The op's own rule (:meth:`for_op`), else the kind's, else None."""
        rule = self.for_op(info, module)
        return rule if rule is not None else self.for_kind(info.kind)


KERNEL_RULES: RuleTable[KernelRule] = RuleTable("kernel map")
IDEAL_RULES: RuleTable[Any] = RuleTable("DKS target rule")
BOUND_RULES: RuleTable[Callable[[Any], Bound]] = RuleTable("Lipschitz bound")
kernel_rule = KERNEL_RULES.register
bound_rule = BOUND_RULES.register


def register_module_op(module_type: type, *, kind: OpKind, name: str | None = None,
                       kernel_rule: KernelRule | None = None,
                       lipschitz: float | Callable[[nn.Module], float] | None = None,
                       attrs: dict[str, Any] | None = None, replace: bool = False) -> Registration:
    """Teach netsurgeon a custom module in one call: what kind of op it is and how it maps kernels.

    The module becomes a leaf when tracing and is classified as ``kind``; ``netsurgeon.analyze``
    applies ``kernel_rule`` at its nodes, the ``dks``/``tat`` targets use the rule's q (a rule
    must keep the C map, as a scaling or normalization does; one that changes it is refused
    by name), and ``operator_norm_bound`` uses ``lipschitz``. For an elementwise activation use
    ``netsurgeon.register_activation`` instead.

    Args:
        module_type: the ``nn.Module`` subclass (subclasses keeping its forward included).
        kind: its :class:`~netsurgeon.ops.OpKind` (``AFFINE`` for a fixed scaling, ``NORM``,
            ``OTHER``...), which structural passes read (``KIND_TRAITS``).
        name: the op name in reports. Default: the class name, lower case.
        kernel_rule: ``rule(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None``;
            None (no rule) leaves the kind's rule. Default: None.
        lipschitz: its Lipschitz constant, a number or ``fn(module)``. Default: None (no bound).
        attrs: facts stored in the node's ``OpInfo.attrs``. Default: none.
        replace: replace an existing rule for ``module_type``. Default: False.

    Returns:
        A :class:`~netsurgeon._registration.Registration` (``remove()`` or ``with``) that takes it back.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise InvalidArgumentError(f"register_module_op: module_type must be an nn.Module subclass, got "
                                   f"{module_type!r}")
    if not isinstance(kind, OpKind):
        raise InvalidArgumentError(f"register_module_op: kind must be an OpKind, got {kind!r}")
    if module_type in _MODULE_RULES and not replace:
        raise InvalidArgumentError(f"register_module_op: {module_type.__qualname__} is already recognised as an op; "
                                   f"pass replace=True to replace its rule")
    op_name, facts = name or module_type.__name__.lower(), dict(attrs or {})
    reg = Registration(f"module op {module_type.__qualname__}")
    reg.add(add_module_rule(module_type, lambda m, node, ctx: OpInfo(kind, op_name, attrs=dict(facts))))
    _add_rules(reg, module_type, kernel_rule, lipschitz, lambda ctx: ctx.gm.get_submodule(ctx.node.target))
    return reg


def _add_rules(reg: Registration, key: type | str, kernel_rule: KernelRule | None,
               lipschitz: float | Callable[[Any], float] | None, subject: Callable[[Any], Any]) -> None:
    if kernel_rule is not None:
        reg.add(KERNEL_RULES.add(key, kernel_rule))
    if lipschitz is not None:
        def bound(ctx: Any) -> Bound:
            return Bound(float(lipschitz(subject(ctx)) if callable(lipschitz) else lipschitz), "lipschitz")
        reg.add(BOUND_RULES.add(key, bound))


def register_function_op(target: Callable[..., Any] | str, *, kind: OpKind, name: str | None = None,
                         kernel_rule: KernelRule | None = None,
                         lipschitz: float | Callable[[Any], float] | None = None,
                         attrs: dict[str, Any] | None = None, replace: bool = False) -> Registration:
    """Teach netsurgeon a function (``call_function``) or, given a string, a tensor method
    (``call_method``, e.g. ``"my_op"``) in one call, as :func:`register_module_op` does a module.

    A plain Python function defined at module level is traced as one node without
    ``torch.fx.wrap``. ``lipschitz`` is a number or ``fn(node)``; the other arguments are those
    of :func:`register_module_op`.

    Returns:
        A :class:`~netsurgeon._registration.Registration` that takes it back.
    """
    if not isinstance(kind, OpKind):
        raise InvalidArgumentError(f"register_function_op: kind must be an OpKind, got {kind!r}")
    method = isinstance(target, str)
    if not method and not callable(target):
        raise InvalidArgumentError(f"register_function_op: target must be a function or a method name, got "
                                   f"{target!r}")
    label = target if method else getattr(target, "__qualname__", repr(target))
    key = f"{'method' if method else 'function'}:{getattr(target, '__module__', '')}.{label}"
    table = _METHOD_RULES if method else _FUNCTION_RULES
    if target in table and not replace:
        raise InvalidArgumentError(f"register_function_op: {label} is already recognised as an op; pass "
                                   f"replace=True to replace its rule")
    op_name, facts = name or (label if method else getattr(target, "__name__", str(label))), dict(attrs or {})
    reg = Registration(f"{'method' if method else 'function'} op {label}")
    rule = lambda node, ctx: OpInfo(kind, op_name, attrs={**facts, "op_key": key})  # noqa: E731
    reg.add(add_method_rule(target, rule) if method else add_function_rule(target, rule))
    _add_rules(reg, key, kernel_rule, lipschitz, lambda ctx: ctx.node)
    return reg
