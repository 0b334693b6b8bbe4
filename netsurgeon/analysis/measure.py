"""Empirical kernel quantities at every node (docs/theory.md §1).

For a pair of inputs ``x``, ``x2`` the traced module is run on both; at every node with
a tensor output ``h`` (batch first) the per-example

* ``q(h) = ||h||² / dim(h)`` (the mean square; for conv features this is the per-location
  value averaged over locations, which is the same number),
* ``k(h, h') = <h, h'> / dim(h)`` and ``c = k / sqrt(q q')`` (uncentered cosine)

are computed and averaged over the batch of pairs.

Example:
    >>> import torch, netsurgeon
    >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    >>> stats = netsurgeon.measure(m, torch.randn(4, 64), torch.randn(4, 64))
    >>> sorted(stats.nodes)[:2]
    ['_0', '_1']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import InvalidArgumentError, UnknownNodeError
from ..graph import trace
from ..graph.running import eval_mode, example_run

__all__ = ["NodeStats", "Measurement", "measure", "kernel_stats", "pair_stats", "gram_stats", "gram_ready"]


@dataclass(frozen=True)
class NodeStats:
    """Measured q, q', k and c at one node (means over the batch of input pairs)."""

    q: float
    q2: float
    k: float
    c: float
    c_std: float  # spread of c over the batch of pairs


@dataclass
class Measurement:
    """Per-node measured kernel quantities, keyed by node name, in graph order."""

    nodes: dict[str, NodeStats] = field(default_factory=dict)

    def __getitem__(self, name: str) -> NodeStats:
        if name not in self.nodes:
            raise UnknownNodeError(f"no measurement for node {name!r} (not tensor-valued, or not in the graph)")
        return self.nodes[name]


def kernel_stats(h: torch.Tensor, h2: torch.Tensor) -> NodeStats:
    """q, q', k, c of two batches of features ``[B, ...]``, averaged over the batch."""
    a = h.detach().double().flatten(1)
    b = h2.detach().double().flatten(1)
    q, q2, k = (a * a).mean(1), (b * b).mean(1), (a * b).mean(1)
    c = k / torch.sqrt(q * q2).clamp_min(1e-300)
    return NodeStats(float(q.mean()), float(q2.mean()), float(k.mean()), float(c.mean()),
                     float(c.std()) if c.numel() > 1 else 0.0)


def pair_stats(h: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], pooled: bool = False
               ) -> list[NodeStats]:
    """:func:`kernel_stats` of ``(h[i], h[j])`` for each ``(i, j)`` (index tensors) of ``pairs``,
    from one Gram matrix of the examples of ``h`` (``[N, ...]``): the examples of several pairs
    may be shared (a star of inputs: ``engine._pairs``). ``pooled``: see :func:`gram_stats`."""
    a = gram_ready(h).reshape(h.shape[0], -1)
    return gram_stats((a @ a.T).double() / max(a.shape[1], 1), pairs, pooled)


def gram_stats(gram: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], pooled: bool = False
               ) -> list[NodeStats]:
    """:func:`pair_stats` from the examples' Gram matrix ``<h_i, h_j> / dim(h)`` (``[N, N]``).

    ``pooled``: every example has the same distribution (inputs of the same mean square), so
    ``q`` and ``q'`` are the mean square over all ``N`` of them rather than over the pairs'
    (``c`` still uses each pair's own)."""
    out = []
    q_all = float(gram.diagonal().mean())
    for i, j in pairs:
        q, q2, k = gram[i, i], gram[j, j], gram[i, j]
        c = k / torch.sqrt(q * q2).clamp_min(1e-300)
        q_mean, q2_mean = (q_all, q_all) if pooled else (float(q.mean()), float(q2.mean()))
        out.append(NodeStats(q_mean, q2_mean, float(k.mean()), float(c.mean()),
                             float(c.std()) if c.numel() > 1 else 0.0))
    return out


def gram_ready(h: torch.Tensor) -> torch.Tensor:
    """``h`` contiguous in float32 or float64 (its own when one of these): a Gram matrix in float32
    is within about 1e-6 (relative) of float64, far below the sampling noise of any measurement."""
    dtype = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    return h.detach().to(dtype, memory_format=torch.contiguous_format)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 1:
            self.outputs[n.name] = out
        return out


def measure(model: nn.Module, x: torch.Tensor, x2: torch.Tensor) -> Measurement:
    """Run ``x`` and ``x2`` (same shape, batch first) through ``model`` in eval mode and
    record q, q', k, c at every tensor-valued node.

    Args:
        model: an ``nn.Module`` (traced here) or a netsurgeon/fx GraphModule.
        x: first inputs, ``[B, ...]``.
        x2: second inputs, same shape; pair ``i`` is ``(x[i], x2[i])``.
    """
    if x.shape != x2.shape:
        raise InvalidArgumentError(f"x and x2 must have the same shape; got {tuple(x.shape)} and {tuple(x2.shape)}")
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    with eval_mode(gm), torch.no_grad(), example_run(gm.__class__.__name__, (x,)):
        r1, r2 = _Recorder(gm), _Recorder(gm)
        r1.run(x)
        r2.run(x2)
    result = Measurement()
    for name, h in r1.outputs.items():
        h2 = r2.outputs.get(name)
        if h2 is not None and h2.shape == h.shape and h.shape[0] == x.shape[0]:
            result.nodes[name] = kernel_stats(h, h2)
    return result
