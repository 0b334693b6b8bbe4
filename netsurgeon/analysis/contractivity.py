"""Contractivity: operator-norm bounds per layer and for the network (docs/theory.md §8.5), and a
gradient-energy diagnostic.

:func:`operator_norm_bound` computes, for every linear node (Linear, Conv with its stride,
padding and groups, average pooling), the largest singular value of the actual operator
by power iteration on ``Jᵀ J`` (the layer without its bias, at the node's input shape);
for normalizations in eval mode the Lipschitz factor of their fixed affine map
(batch norm: ``max |γ| / sqrt(var + eps)``; minimal RMS norm: ``1 / running_rms``); for
activations their Lipschitz constant. A Lipschitz bound is then propagated through the
graph: products along chains, ``Σ |w_i| L_i`` over sums, ``sqrt(Σ L_i²)`` over
concatenations. A network bound below 1 means the network is contractive. Each kind's
factor is a ``@bound_rule``; activations take the ``lipschitz`` of their registry entry,
module ops the ``lipschitz`` given to ``netsurgeon.register_module_op``.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> b = operator_norm_bound(net, torch.randn(1, 4))
    >>> b.network > 0
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph import Topology, trace
from ..graph.running import eval_mode
from ..kernels import get_activation
from ..kernels.registry import resolve
from ..ops import NormFamily, OpInfo, OpKind, pool_type
from .rules import BOUND_RULES, Bound, bound_rule

__all__ = ["OperatorNormBound", "operator_norm_bound", "GradientEnergy"]


@dataclass
class OperatorNormBound:
    """Per-node factors and the cumulative Lipschitz bound.

    Attributes:
        factors: node -> its own factor (singular value, norm factor, Lipschitz constant).
        kinds: node -> what the factor is (``"linear"``, ``"norm"``, ``"activation"``, ``"pool"``).
        cumulative: node -> bound on the Lipschitz constant from the input to the node.
        unbounded: nodes without a bound (max pooling, products of signals, unknown ops),
            with the reason; the cumulative bound past them is ``inf``.
        network: the bound at the output (the largest over outputs).
    """

    factors: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    cumulative: dict[str, float] = field(default_factory=dict)
    unbounded: dict[str, str] = field(default_factory=dict)
    network: float = float("nan")

    def table(self) -> str:
        lines = [f"{'node':34s} {'kind':10s} {'factor':>10s} {'cumulative':>12s}"]
        for n, f in self.factors.items():
            lines.append(f"{n[:34]:34s} {self.kinds[n]:10s} {f:10.4g} {self.cumulative.get(n, float('nan')):12.4g}")
        lines += [f"{n[:34]:34s} unbounded: {r}" for n, r in self.unbounded.items()]
        lines.append(f"network bound: {self.network:.4g} ({'contractive' if self.network < 1 else 'not shown contractive'})")
        return "\n".join(lines)


def _power_iteration(op: Any, shape: tuple[int, ...], iters: int, seed: int, dtype: torch.dtype) -> float:
    """Largest singular value of the linear map ``op`` on inputs of ``shape`` (power iteration on JᵀJ)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=g, dtype=dtype)
    v /= v.norm()
    sigma = 0.0
    for _ in range(iters):
        v = v.detach().requires_grad_(True)
        out = op(v)
        (back,) = torch.autograd.grad(out, v, grad_outputs=out)  # Jᵀ J v
        norm = back.norm()
        if norm == 0:
            return 0.0
        sigma = float(out.detach().norm())  # ||J v|| with ||v|| = 1
        v = back / norm
    return sigma


def _activation_lipschitz(spec: Any) -> float:
    """The registered Lipschitz constant of an untransformed activation (the largest over
    per-channel parameters), else ``max |φ'|`` on a grid over [-20, 20], times ``|α γ|``."""
    if spec.transform is None:
        entry, _ = resolve(spec.name, {})
        known = [entry.lipschitz_constant(resolve(spec.name, p)[1]) for p in _per_channel(dict(spec.params))]
        if all(k is not None for k in known):
            return max(known)
    act = get_activation(spec.name, **dict(spec.params))
    x = np.linspace(-20, 20, 400001)
    lip = float(np.max(np.abs(act.dphi(x))))
    if spec.transform is not None:
        a, _, g, _ = spec.transform
        lip *= abs(a * g)
    return lip


def _per_channel(params: dict[str, Any]) -> list[dict[str, Any]]:
    """``params`` with per-channel values (PReLU's slopes) split into one dict per channel."""
    n = max((len(v) for v in params.values() if isinstance(v, tuple)), default=0)
    if n == 0:
        return [params]
    return [{k: (v[i] if isinstance(v, tuple) else v) for k, v in params.items()} for i in range(n)]


def _layer_op(m: nn.Module) -> Any:
    """The bias-free linear map of a Linear/Conv module."""
    if isinstance(m, nn.Linear):
        return lambda v: F.linear(v, m.weight)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[m.weight.dim() - 2]
    return lambda v: conv(v, m.weight, None, m.stride, m.padding, m.dilation, m.groups)


def operator_norm_bound(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, iters: int = 100,
                        seed: int = 0) -> OperatorNormBound:
    """Per-layer operator norms and the network's Lipschitz bound (eval mode).

    Args:
        model: an ``nn.Module`` or netsurgeon GraphModule.
        example_inputs: one batch; gives every node's input shape (one example is used).
        iters: power-iteration steps per layer. Default: 100.
        seed: seed of the starting vectors. Default: 0.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with eval_mode(gm):
        topo = Topology(gm, tuple(x[:1] for x in inputs))
        return _bound(gm, topo, iters, seed)


@dataclass
class BoundContext:
    """What a bound rule may read: the node, the graph, and the power-iteration settings."""

    gm: fx.GraphModule
    topo: Topology
    node: fx.Node
    info: OpInfo
    iters: int
    seed: int

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The shape of the node's first input (one example)."""
        args = self.node.all_input_nodes
        return self.topo.graph.nodes[args[0].name].get("shape") if args else None


def _bound(gm: fx.GraphModule, topo: Topology, iters: int, seed: int) -> OperatorNormBound:
    res = OperatorNormBound()
    g = topo.graph
    for node in gm.graph.nodes:
        d = g.nodes[node.name]
        if not d["signal"] and d["kind"] is not OpKind.OUTPUT:
            continue
        kind, info = d["kind"], d["info"]
        ins = [res.cumulative.get(a, float("inf")) for a in d["signal_operands"]]
        if kind is OpKind.INPUT:
            res.cumulative[node.name] = 1.0
            continue
        rule = BOUND_RULES.find(info, gm.get_submodule(node.target) if node.op == "call_module" else None)
        b = rule(BoundContext(gm, topo, node, info, iters, seed)) if rule is not None else \
            Bound(unbounded=f"{info.describe()}: no bound")
        if b.unbounded is not None:
            res.unbounded[node.name] = b.unbounded
            res.cumulative[node.name] = float("inf")
            continue
        if b.factor is not None:
            res.factors[node.name], res.kinds[node.name] = b.factor, b.what
        if any(math.isinf(c) for c in ins):
            res.cumulative[node.name] = float("inf")
        elif b.combine is not None:
            res.cumulative[node.name] = b.combine(ins)
        else:
            res.cumulative[node.name] = (b.factor if b.factor is not None else 1.0) * (ins[0] if ins else 1.0)
    outs = [res.cumulative[a] for n, d in g.nodes(data=True) if d["kind"] is OpKind.OUTPUT
            for a in d["signal_operands"] if a in res.cumulative]
    res.network = max(outs) if outs else float("nan")
    return res


# ---------------------------------------------------------------- bound rules per kind
@bound_rule(OpKind.LINEAR, OpKind.CONV)
def _layer(ctx: BoundContext) -> Bound:
    """The largest singular value of the bias-free layer at its input shape."""
    node, gm, shape = ctx.node, ctx.gm, ctx.shape
    if node.op != "call_module" or not hasattr(gm.get_submodule(node.target), "weight"):
        return Bound(unbounded="functional linear op: no module to read")
    m = gm.get_submodule(node.target)
    inner = getattr(m, "layer", m)  # FarkasLayer wraps its layer
    if getattr(inner, "transposed", False) or shape is None:
        return Bound(unbounded="transposed conv or unknown input shape")
    return Bound(_power_iteration(_layer_op(inner), tuple(shape), ctx.iters, ctx.seed, inner.weight.dtype), "linear")


@bound_rule(OpKind.POOL)
def _pool(ctx: BoundContext) -> Bound:
    """Average pooling: the operator's largest singular value; other pools: unbounded."""
    node, shape, kind = ctx.node, ctx.shape, pool_type(ctx.info)
    if kind is not None and kind.averages and shape is not None:
        mod = ctx.gm.get_submodule(node.target) if node.op == "call_module" else None
        op = mod if mod is not None else (lambda v, n=node: n.target(v, *n.args[1:], **n.kwargs))
        return Bound(_power_iteration(op, tuple(shape), ctx.iters, ctx.seed, torch.float32), "pool")
    return Bound(unbounded=f"{ctx.info.attrs.get('pool_type', 'unknown')} pooling: no linear operator")


@bound_rule(OpKind.NORM)
def _norm(ctx: BoundContext) -> Bound:
    """Eval batch norm: ``max |γ| / sqrt(var + eps)`` (times a composite's activation); minimal
    RMS norm: ``1 / running_rms``; other norms depend on the data."""
    node, info = ctx.node, ctx.info
    m = ctx.gm.get_submodule(node.target) if node.op == "call_module" else None
    spec = info.norm
    if m is not None and spec is not None and spec.family is NormFamily.BATCH and m.running_var is not None:
        w = m.weight.detach() if m.weight is not None else torch.ones_like(m.running_var)
        factor = float((w.abs() / torch.sqrt(m.running_var + m.eps)).max())
        if spec.activation is not None:
            factor *= _activation_lipschitz(spec.activation)
        return Bound(factor, "norm")
    if m is not None and hasattr(m, "running_rms"):
        return Bound(1.0 / float(m.running_rms), "norm")
    return Bound(unbounded=f"{info.describe()}: data-dependent normalization")


@bound_rule(OpKind.ACTIVATION)
def _activation(ctx: BoundContext) -> Bound:
    if ctx.info.activation is None:
        return Bound(unbounded=f"{ctx.info.describe()}: no bound")
    return Bound(_activation_lipschitz(ctx.info.activation), "activation")


@bound_rule(OpKind.AFFINE)
def _affine(ctx: BoundContext) -> Bound:
    factor = ctx.info.constant_factor
    if factor is None:
        return Bound(unbounded=f"{ctx.info.describe()}: no bound")
    return Bound(abs(factor), "scale")


@bound_rule(*(kind for kind in OpKind if kind.traits.unchanged))
def _unchanged(ctx: BoundContext) -> Bound:
    return Bound()


@bound_rule(OpKind.ADD)
def _add(ctx: BoundContext) -> Bound:
    """``Σ |w_i| L_i``; a term written ``c·h`` carries ``|c|`` in its own bound already."""
    g = ctx.topo.graph
    operands = g.nodes[ctx.node.name]["signal_operands"]
    weights = ctx.info.attrs.get("weights") or [1.0] * len(operands)

    def combine(ins: list[float]) -> float:
        terms = []
        for w, a, c in zip(weights, operands, ins):
            f = g.nodes[a]["info"].constant_factor
            f = 1.0 if f is None else f
            terms.append(abs(float(w) / f) * c if w is not None and f != 0 else float("inf"))
        return sum(terms)
    return Bound(combine=combine)


@bound_rule(OpKind.CONCAT)
def _concat(ctx: BoundContext) -> Bound:
    """``sqrt(Σ L_i²)``."""
    return Bound(combine=lambda ins: math.sqrt(sum(c * c for c in ins)))


class GradientEnergy:
    """Average gradient norm per layer over training steps (call :meth:`record` after each
    ``backward``), with a table and a plot.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        >>> ge = GradientEnergy(net)
        >>> net(torch.randn(8, 4)).sum().backward(); ge.record()
        >>> sorted(ge.mean())
        ['0.weight', '1.weight']
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = {n: p for n, p in model.named_parameters() if p.dim() > 1}
        self.history: dict[str, list[float]] = {n: [] for n in self.params}

    def record(self) -> None:
        for n, p in self.params.items():
            self.history[n].append(float(p.grad.norm()) if p.grad is not None else 0.0)

    def mean(self) -> dict[str, float]:
        return {n: float(np.mean(h)) if h else float("nan") for n, h in self.history.items()}

    def plot(self) -> Any:
        """Mean gradient norm against layer depth (log scale); returns the figure."""
        from matplotlib.figure import Figure

        means = self.mean()
        fig = Figure(figsize=(7, 3.5))
        ax = fig.add_subplot(1, 1, 1)
        ax.semilogy(range(len(means)), list(means.values()), marker="o")
        ax.set_xlabel("layer (parameter order)")
        ax.set_ylabel("mean gradient norm")
        ax.set_title(f"gradient energy over {len(next(iter(self.history.values()), []))} steps")
        fig.tight_layout()
        return fig
