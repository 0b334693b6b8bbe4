"""Local measurement of nodes without a kernel map (max pooling, hard norms...).

A node P that sits a few elementwise or per-channel ops after a linear/conv node L (or
after the network input) sees, under the analysis's own model (random weights, Gaussian
inputs), a function of a Gaussian field at L whose kernel the propagation already knows.
So P is measured on Gaussian pairs drawn with L's predicted ``(q, q', k)``, through the
chain L → ... → P only, on a small spatial patch (locations independent, as the model
assumes) instead of running the network's prefix on full-size inputs.

The result is tagged measured (``unsupported``) with the reason saying it was local;
:func:`local_chain` returns None when the path to P is not such a chain, and the engine
then measures P by running the network (``engine._measure_nodes``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import Topology
from ..graph.state import nodes_by_name
from ..ops import NormFamily, OpKind
from .measure import NodeStats, pair_stats

__all__ = ["local_chain", "measure_local"]

_CHAIN_KINDS = {OpKind.ACTIVATION, OpKind.NORM, OpKind.AFFINE, OpKind.IDENTITY}
_MAX_CHAIN = 6  # nodes between L and P
PATCH = 32  # spatial size of the sampled Gaussian field per axis


def local_chain(topo: Topology, name: str) -> list[fx.Node] | None:
    """``[L, n1, ..., P]`` when P's signal comes from L through single-input elementwise or
    per-channel nodes (``L`` a linear/conv node or a tensor input); else None."""
    g = topo.graph
    by_name = nodes_by_name(topo.gm)
    chain = [by_name[name]]
    while len(chain) <= _MAX_CHAIN + 1:
        d = g.nodes[chain[-1].name]
        operands = d["signal_operands"]
        if len(operands) != 1:
            return None
        src = by_name[operands[0]]
        kind = g.nodes[src.name]["kind"]
        if kind.traits.weighted or kind is OpKind.INPUT:
            if kind is not OpKind.INPUT and src.op != "call_module":
                return None
            chain.append(src)
            return chain[::-1] if all(_single_signal(n, g) for n in chain[:-1]) else None
        info = g.nodes[src.name]["info"]
        if kind not in _CHAIN_KINDS or (kind is OpKind.NORM and (info.norm is None or info.norm.family is not NormFamily.BATCH)):
            return None  # per-example norms mix locations' channels: not per-channel
        chain.append(src)
    return None


def _single_signal(node: fx.Node, g: Any) -> bool:
    """The node's only tensor-node argument is its signal operand (so it can be re-run on a new input)."""
    return len(node.all_input_nodes) == len(g.nodes[node.name]["signal_operands"]) == 1


def _field_shape(gm: fx.GraphModule, topo: Topology, src: fx.Node, example: torch.Tensor | None
                 ) -> tuple[int, ...] | None:
    """Per-example shape of L's output, spatial axes capped at :data:`PATCH`."""
    known = topo.graph.nodes[src.name].get("shape")
    if known is not None:
        return (known[1], *(min(s, PATCH) for s in known[2:]))
    if src.op == "placeholder":
        return None if example is None else (example.shape[1], *(min(s, PATCH) for s in example.shape[2:]))
    m = gm.get_submodule(src.target)
    if isinstance(m, nn.Linear):
        return (m.out_features,)
    if isinstance(m, nn.modules.conv._ConvNd):
        return (m.out_channels, *([PATCH] * len(m.kernel_size)))
    return None


def _run_chain(gm: fx.GraphModule, chain: list[fx.Node], x: torch.Tensor) -> torch.Tensor:
    """Apply the nodes after L to ``x`` (each has one tensor argument, its signal)."""
    for node in chain[1:]:
        args = tuple(x if isinstance(a, fx.Node) else a for a in node.args)
        kwargs = {k: (x if isinstance(v, fx.Node) else v) for k, v in node.kwargs.items()}
        if node.op == "call_module":
            x = gm.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_function":
            x = node.target(*args, **kwargs)
        else:
            x = getattr(args[0], node.target)(*args[1:], **kwargs)
    return x


def measure_local(gm: fx.GraphModule, topo: Topology, chain: list[fx.Node], q1: float, q2: float,
                  k: np.ndarray, example: torch.Tensor | None, batch: int, seed: int) -> list[NodeStats] | None:
    """P's statistics at each entry of ``k`` (L's kernel at the measured cosines), or None when
    L's output shape is unknown.

    The fields come in ``batch`` independent stars ``[u, -u, v_1, ..., v_m]``: ``u`` with mean
    square ``q1``, and one ``v_j = sqrt(q2) (r_j z + sqrt(1 - r_j²) z_j)`` (``u = sqrt(q1) z``) per
    magnitude ``r_j`` of the correlations ``k / sqrt(q1 q2)``; the pair at correlation ``r`` is
    ``(u, v_|r|)``, or ``(-u, v_|r|)`` when ``r < 0``. Each pair has the distribution of an
    independent pair, and about half as many fields are drawn and run."""
    shape = _field_shape(gm, topo, chain[0], example)
    if shape is None or not q1 > 0 or not q2 > 0:
        return None
    dtype = next((p.dtype for p in gm.parameters()), torch.float32)
    work = torch.float64  # not the float32 stream that initialized weights after torch.manual_seed(0)
    rho = np.clip(np.asarray(k, dtype=float) / np.sqrt(q1 * q2), -1.0, 1.0)
    mags = sorted({round(abs(float(r)), 12) for r in rho})
    negative = bool((rho < 0).any())
    per = 1 + negative + len(mags)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, 1 + len(mags), *shape), generator=g, dtype=work)
    u = z[:, :1]
    m = torch.as_tensor(mags, dtype=work).reshape((1, -1) + (1,) * len(shape))
    v = (m * u + (1 - m * m).clamp_min(0).sqrt() * z[:, 1:]) * q2 ** 0.5
    u = u * q1 ** 0.5
    fields = torch.cat([u, -u, v] if negative else [u, v], dim=1).reshape((batch * per, *shape))
    base = torch.arange(batch) * per
    slot = {r: 1 + negative + i for i, r in enumerate(mags)}
    pairs = [(base + (1 if r < 0 else 0), base + slot[round(abs(float(r)), 12)]) for r in rho]
    with torch.no_grad():
        out = _run_chain(gm, chain, fields.to(dtype))
    return pair_stats(out, pairs)
