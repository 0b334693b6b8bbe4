"""Constant scales and shifts read at analysis time: the ``s``, ``t`` of an ``AFFINE`` node
``y = s·h + t`` (layer scales, learned biases, position embeddings, ``torch.addcmul``), which the
kernel rule (docs/theory.md §3.1 with ``σw² = E[s²]``, ``σb² = E[t²]``) and the DKS targets use.

A constant operand may be any subexpression of parameters and buffers: ``gamma.view(1, -1, 1, 1)``,
``gamma[None, :, None, None]``, ``gamma.to(x.dtype)``, ``cls_token.expand(x.shape[0], -1, -1)``, or
a position embedding computed by a module; it is evaluated (never on a signal), with shapes of
signals taken from their recorded ``tensor_meta``.

Example:
    >>> import torch, torch.nn as nn, netsurgeon
    >>> class Scaled(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.gamma = nn.Linear(4, 4), nn.Parameter(torch.full((4,), 0.5))
    ...     def forward(self, x):
    ...         return self.fc(x) * self.gamma.view(1, -1)
    >>> topo = netsurgeon.topology(Scaled())
    >>> node = next(n for n in topo.gm.graph.nodes if n.name == "mul")
    >>> affine_map(topo.gm, node, signal_nodes(topo.gm).__contains__).moments
    (0.25, 0.0)
"""
from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..layers import ScalarBias
from ..ops import is_inplace
from .rules import APPROX, EXACT

__all__ = ["AffineMap", "affine_map", "affine_moments", "signal_nodes"]


_MUL = {operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "__mul__", "__rmul__", "__imul__"}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "__truediv__", "__itruediv__"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__", "__iadd__"}
_SUB = {operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", "__sub__", "__isub__"}
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement"}
_BROADCASTS = {"expand", "expand_as", "broadcast_to"}  # mean squares do not depend on the target shape
_MAX_EVAL = 64  # nodes one constant may be computed from


class AffineMap(NamedTuple):
    """``y = s·h + t`` with constant ``s``, ``t`` (tensors broadcast against the signal ``h``), as
    read at analysis time; ``moments = (E s², E t²)`` over their elements (broadcasting repeats
    every element equally, so these are the mean squares over the output too)."""

    s: torch.Tensor
    t: torch.Tensor

    @property
    def moments(self) -> tuple[float, float]:
        return float(self.s.pow(2).mean()), float(self.t.pow(2).mean())

    @property
    def status(self) -> tuple[str, str]:
        """Exact for one scalar scale; a per-element scale assumes the channels (locations) it
        weights alike, a shift that the signal is uncorrelated with it (mean zero at init)."""
        parts = []
        if self.s.numel() > 1 and bool((self.s != self.s.flatten()[0]).any()):
            parts.append("per-channel scale: channels assumed alike")
        if bool(self.t.any()):
            parts.append("constant shift: signal assumed uncorrelated with it")
        return (APPROX, "; ".join(parts)) if parts else (EXACT, "")


def affine_map(gm: fx.GraphModule, node: fx.Node, is_signal: Callable[[fx.Node], bool]) -> AffineMap | None:
    """The constant ``s``, ``t`` of an ``AFFINE`` node ``y = s·h + t``, or None when they cannot be read.

    Covers :class:`~netsurgeon.layers.ChannelAffine`, ``ScalarGate``/``ScalarBias``, timm's
    ``LayerScale``/``LayerScale2d`` (as modules), and ``h * p``, ``p * h``, ``h.mul(p)``,
    ``h.mul_(p)``, ``h / p``, ``h + p``, ``p + h``, ``h - p``, ``p - h``, ``torch.add(h, p, alpha=a)``,
    ``torch.addcmul(t, s, h)`` with Python numbers or constant subexpressions ``p`` (parameters and
    buffers, reshaped, indexed, cast or computed from them, see :func:`_constant`).
    """
    if node.op == "call_module":
        return _module_affine(gm.get_submodule(node.target))
    if node.op not in ("call_function", "call_method"):
        return None
    target = node.target
    args = list(node.args)
    if len(args) == 1 and "other" in node.kwargs:  # torch.mul(h, other=p)
        args.append(node.kwargs["other"])
    signal = [i for i, a in enumerate(args) if isinstance(a, fx.Node) and is_signal(a)]
    if target in (torch.addcmul, "addcmul", "addcmul_"):
        return _addcmul_affine(gm, node, is_signal, signal)
    if len(signal) != 1 or len(args) < 2 or signal[0] > 1:
        return None
    pos = signal[0]
    other = _value(gm, args[1 - pos], is_signal)
    if other is None:
        return None
    zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    if target in _MUL:
        return AffineMap(other, zero)
    if target in _DIV and pos == 0 and "rounding_mode" not in node.kwargs:
        return AffineMap(1.0 / other, zero)
    alpha = node.kwargs.get("alpha", args[2] if len(args) > 2 else 1.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    if target in _ADD:
        return AffineMap(one, other * alpha if pos == 0 else other)
    if target in _SUB:
        return AffineMap(one, -alpha * other) if pos == 0 else AffineMap(-alpha * one, other)
    return None


def affine_moments(gm: fx.GraphModule, node: fx.Node, is_signal: Callable[[fx.Node], bool]
                   ) -> tuple[float, float] | None:
    """Mean squares ``(E s², E t²)`` of an ``AFFINE`` node ``s·h + t`` (see :func:`affine_map`); None if unknown."""
    found = affine_map(gm, node, is_signal)
    return None if found is None else found.moments


def _module_affine(m: nn.Module) -> AffineMap | None:
    """``(s, t)`` of an affine module: ChannelAffine (scale, shift), ScalarGate (scale),
    ScalarBias (bias), timm LayerScale (gamma)."""
    def get(name: str) -> torch.Tensor | None:
        v = getattr(m, name, None)
        return v.detach().double() if isinstance(v, torch.Tensor) else None

    zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    scale, shift = get("scale"), get("shift")
    if scale is not None:
        return AffineMap(scale, zero if shift is None else shift)
    if isinstance(m, ScalarBias):
        return AffineMap(one, get("bias"))
    if type(m).__name__ in ("LayerScale", "LayerScale2d") and get("gamma") is not None:  # timm's
        return AffineMap(get("gamma"), zero)
    return None


def _addcmul_affine(gm: fx.GraphModule, node: fx.Node, is_signal: Callable[[fx.Node], bool], signal: list[int]
                    ) -> AffineMap | None:
    """``addcmul(input, t1, t2, value=v) = input + v·t1·t2`` with exactly one signal operand."""
    args = list(node.args)
    if len(signal) != 1 or len(args) < 3:
        return None
    v = node.kwargs.get("value", args[3] if len(args) > 3 else 1.0)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    consts = [_value(gm, a, is_signal) if i != signal[0] else None for i, a in enumerate(args[:3])]
    if any(c is None for i, c in enumerate(consts) if i != signal[0]):
        return None
    if signal[0] == 0:
        return AffineMap(torch.ones((), dtype=torch.float64), v * consts[1] * consts[2])
    other = consts[2] if signal[0] == 1 else consts[1]
    return AffineMap(v * other, consts[0])


def _value(gm: fx.GraphModule, arg: Any, is_signal: Callable[[fx.Node], bool]) -> torch.Tensor | None:
    """A constant operand as a float64 tensor: a Python number, or a constant subexpression."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return torch.tensor(float(arg), dtype=torch.float64)
    if not isinstance(arg, fx.Node) or is_signal(arg):
        return None
    value = _constant(gm, arg, is_signal)
    return None if value is None or value.is_complex() else value.detach().double()


def _constant(gm: fx.GraphModule, node: fx.Node, is_signal: Callable[[fx.Node], bool] | None = None
              ) -> torch.Tensor | None:
    """The value of a subexpression computed from parameters and buffers only (``get_attr``,
    then any ops on them: reshapes, indexing, casts, arithmetic, a module such as a position
    embedding's conv), or None. Shape queries of a signal (``x.shape``, ``x.size(1)``) are read
    from its recorded ``tensor_meta``; nothing is run on a signal, and in-place ops act on copies."""
    memo: dict[fx.Node, Any] = {}
    value = _evaluate(gm, node, is_signal or (lambda n: False), memo)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    return value if isinstance(value, torch.Tensor) else None


_UNKNOWN = object()


def _evaluate(gm: fx.GraphModule, node: fx.Node, is_signal: Callable[[fx.Node], bool], memo: dict) -> Any:
    if node in memo:
        return memo[node]
    if len(memo) > _MAX_EVAL or node.op in ("placeholder", "output") or is_signal(node):
        return _UNKNOWN
    memo[node] = _UNKNOWN  # while evaluating (and if it fails)
    memo[node] = _run(gm, node, is_signal, memo)
    return memo[node]


def _shape_query(node: fx.Node) -> Any:
    """``x.shape``, ``x.size(...)``, ``x.dim()`` of a signal ``x`` from its ``tensor_meta``."""
    def meta(n: Any) -> Any:
        tm = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
        return tm if hasattr(tm, "shape") else None

    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        tm = meta(node.args[0])
        if tm is not None and node.args[1] in ("shape", "dtype", "ndim"):
            return tm.shape if node.args[1] == "shape" else tm.dtype if node.args[1] == "dtype" else len(tm.shape)
    if node.op == "call_method" and node.target in _SHAPE_METHODS and node.args:
        tm = meta(node.args[0])
        if tm is not None:
            dims = torch.Size(tm.shape)
            if node.target == "size":
                return dims if len(node.args) < 2 else dims[node.args[1]]
            return len(dims) if node.target in ("dim", "ndimension") else dims.numel()
    return _UNKNOWN


def _run(gm: fx.GraphModule, node: fx.Node, is_signal: Callable[[fx.Node], bool], memo: dict) -> Any:
    if node.op == "get_attr":
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return _UNKNOWN if value is None else value
    shape = _shape_query(node)
    if shape is not _UNKNOWN:
        return shape
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "device":
        # a signal's device (``torch.arange(n, device=x.device)``): where the model's tensors are
        held = next(iter(gm.parameters()), None)
        held = held if held is not None else next(iter(gm.buffers()), None)
        return held.device if held is not None else torch.device("cpu")
    failed = []

    def resolve(a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        v = _evaluate(gm, a, is_signal, memo)
        if v is _UNKNOWN:
            failed.append(a)
        return v

    args = fx.node.map_aggregate(node.args, resolve)
    kwargs = fx.node.map_aggregate(node.kwargs, resolve)
    if failed:
        if node.op == "call_method" and node.target in _BROADCASTS and failed[0] is not node.args[0]:
            return args[0]  # a broadcast to an unknown shape: the same mean squares
        return _UNKNOWN
    if node.target is operator.setitem:  # writes into a parameter or buffer
        return _UNKNOWN
    if is_inplace(node) and args and isinstance(args[0], torch.Tensor):
        args = (args[0].clone(),) + tuple(args[1:])
    try:
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            m = gm.get_submodule(node.target)
            if next(m.buffers(), None) is not None:  # running statistics: a call could update them
                return _UNKNOWN
            return m(*args, **kwargs)
    except Exception:  # noqa: BLE001 - anything that does not compute is not a constant we can read
        return _UNKNOWN


def signal_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose value depends on a model input's values (not only on its shape), from
    the classification stored on the nodes (run ``netsurgeon.topology`` first)."""
    from ..graph import op_info

    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or (n.op != "get_attr" and op_info(n).kind.traits.signal
                                     and any(a in out for a in n.all_input_nodes)):
            out.add(n)
    return out
