"""Contractivity: operator-norm bounds per layer and for the network (MATH.md §8), and a
gradient-energy diagnostic.

:func:`operator_norm_bound` computes, for every linear node (Linear, Conv with its stride,
padding and groups, average pooling), the largest singular value of the actual operator
by power iteration on ``Jᵀ J`` (the layer without its bias, at the node's input shape);
for normalizations in eval mode the Lipschitz factor of their fixed affine map
(batch norm: ``max |γ| / sqrt(var + eps)``; minimal RMS norm: ``1 / running_rms``); for
activations their Lipschitz constant. A Lipschitz bound is then propagated through the
graph: products along chains, ``Σ |w_i| L_i`` over sums, ``sqrt(Σ L_i²)`` over
concatenations. A network bound below 1 means the network is contractive.

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
from ..ops import OpKind

__all__ = ["OperatorNormBound", "operator_norm_bound", "GradientEnergy"]

_ONE_LIPSCHITZ = {"relu", "leaky_relu", "abs", "tanh", "identity", "relu6", "hardtanh", "softsign", "prelu"}


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
    if spec.name in _ONE_LIPSCHITZ and spec.transform is None:
        return 1.0
    act = get_activation("leaky_relu" if spec.name == "prelu" else spec.name, **dict(spec.params))
    x = np.linspace(-20, 20, 400001)
    lip = float(np.max(np.abs(act.dphi(x))))
    if spec.transform is not None:
        a, _, g, _ = spec.transform
        lip *= abs(a * g)
    return lip


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
        factor, what, reason = _factor(gm, topo, node, kind, info, iters, seed)
        if reason is not None:
            res.unbounded[node.name] = reason
            res.cumulative[node.name] = float("inf")
            continue
        if factor is not None:
            res.factors[node.name], res.kinds[node.name] = factor, what
        if any(math.isinf(c) for c in ins):
            res.cumulative[node.name] = float("inf")
        elif kind is OpKind.ADD:  # a term written c·h carries |c| in its own bound already
            weights = info.attrs.get("weights") or [1.0] * len(ins)
            terms = []
            for w, a, c in zip(weights, d["signal_operands"], ins):
                ai = g.nodes[a]["info"]
                f = float(ai.attrs["factor"]) if ai.kind is OpKind.AFFINE and "factor" in ai.attrs else 1.0
                terms.append(abs(float(w) / f) * c if w is not None and f != 0 else float("inf"))
            res.cumulative[node.name] = sum(terms)
        elif kind is OpKind.CONCAT:
            res.cumulative[node.name] = math.sqrt(sum(c * c for c in ins))
        else:
            res.cumulative[node.name] = (factor if factor is not None else 1.0) * (ins[0] if ins else 1.0)
    outs = [res.cumulative[a] for n, d in g.nodes(data=True) if d["kind"] is OpKind.OUTPUT
            for a in d["signal_operands"] if a in res.cumulative]
    res.network = max(outs) if outs else float("nan")
    return res


def _factor(gm: fx.GraphModule, topo: Topology, node: fx.Node, kind: OpKind, info: Any, iters: int,
            seed: int) -> tuple[float | None, str, str | None]:
    """(factor, kind, None), (None, "", None) for factor-free nodes, or (None, "", reason)."""
    shape = topo.graph.nodes[node.all_input_nodes[0].name].get("shape") if node.all_input_nodes else None
    if kind in (OpKind.LINEAR, OpKind.CONV):
        if node.op != "call_module" or not hasattr(gm.get_submodule(node.target), "weight"):
            return None, "", "functional linear op: no module to read"
        m = gm.get_submodule(node.target)
        inner = getattr(m, "layer", m)  # FarkasLayer wraps its layer
        if getattr(inner, "transposed", False) or shape is None:
            return None, "", "transposed conv or unknown input shape"
        return _power_iteration(_layer_op(inner), tuple(shape), iters, seed, inner.weight.dtype), "linear", None
    if kind is OpKind.POOL:
        if info.attrs.get("pool_type") in ("avg", "adaptive_avg", "mean") and shape is not None:
            mod = gm.get_submodule(node.target) if node.op == "call_module" else None
            op = mod if mod is not None else (lambda v, n=node: n.target(v, *n.args[1:], **n.kwargs))
            return _power_iteration(op, tuple(shape), iters, seed, torch.float32), "pool", None
        return None, "", f"{info.attrs.get('pool_type', 'unknown')} pooling: no linear operator"
    if kind is OpKind.NORM:
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        spec = info.norm
        if m is not None and spec is not None and spec.family == "batch" and m.running_var is not None:
            w = m.weight.detach() if m.weight is not None else torch.ones_like(m.running_var)
            factor = float((w.abs() / torch.sqrt(m.running_var + m.eps)).max())
            if spec.activation is not None:
                factor *= _activation_lipschitz(spec.activation)
            return factor, "norm", None
        if m is not None and hasattr(m, "running_rms"):
            return 1.0 / float(m.running_rms), "norm", None
        return None, "", f"{info.describe()}: data-dependent normalization"
    if kind is OpKind.ACTIVATION and info.activation is not None:
        return _activation_lipschitz(info.activation), "activation", None
    if kind is OpKind.AFFINE and "factor" in info.attrs:
        return abs(float(info.attrs["factor"])), "scale", None
    if kind in (OpKind.IDENTITY, OpKind.RESHAPE, OpKind.OUTPUT, OpKind.ADD, OpKind.CONCAT):
        return None, "", None
    return None, "", f"{info.describe()}: no bound"


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
