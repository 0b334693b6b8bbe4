"""Which sums have correlated terms (docs/theory.md §3.3, weighted sums).

``q_y = Σ w_i² q_i`` holds when the terms are uncorrelated at init, which is the case when
two terms differ by at least one independent zero-mean random layer. Two terms ``a`` and
``b`` of a sum are taken as uncorrelated when some Linear/Conv weight lies on the way to one
of them and not on the way to the other (the weights of ``ancestors(a) - ancestors(b)`` and
of ``ancestors(b) - ancestors(a)`` differ). Otherwise they are correlated, for example:

* ``x + relu(x)``, ``pool(x) - x`` (PoolFormer): no weight between the two terms;
* ``f(x) + f(relu(x))`` with one shared ``f``: the same weight on both sides.

Disjoint pieces of one weight's output along its output features (``a, b = fc(x).chunk(2, -1)``,
timm's ``GluMlp``) come from disjoint sets of independent rows, so each piece counts as a weight of
its own (``key#piece``).

The analysis measures such sums (status unsupported, with this reason) and the DKS/TAT
target computation refuses them, instead of applying the uncorrelated rule silently.

Example:
    >>> import torch, torch.nn as nn, netsurgeon
    >>> class M(nn.Module):
    ...     def forward(self, x):
    ...         return x + torch.relu(x)
    >>> sorted(correlated_sums(netsurgeon.topology(M())))
    ['add']
"""
from __future__ import annotations

import operator

import networkx as nx
import torch.fx as fx

from ..graph import Topology
from ..graph.state import nodes_by_name
from ..ops import OpKind

__all__ = ["correlated_sums", "dependent_products"]

def _weight_key(topo: Topology, name: str) -> str:
    """What identifies the weight of a Linear/Conv node: its module, else its parameter nodes."""
    d = topo.graph.nodes[name]
    if d["node_op"] == "call_module":
        return f"module:{d['target']}"
    params = sorted(p for p in topo.graph.predecessors(name) if topo.graph.nodes[p]["node_op"] == "get_attr")
    return "param:" + ",".join(topo.graph.nodes[p]["target"] for p in params) if params else f"node:{name}"


def correlated_sums(topo: Topology) -> dict[str, str]:
    """``{sum node: reason}`` for every signal sum with a pair of correlated terms."""
    g = topo.graph
    fx_nodes = nodes_by_name(topo.gm)
    out: dict[str, str] = {}
    for name, d in g.nodes(data=True):
        if d["kind"] is not OpKind.ADD or not d["signal"]:
            continue
        terms = list(dict.fromkeys(d["signal_operands"]))
        args = [a.name for a in _node_args(fx_nodes[name])]
        twice = next((a for a in terms if args.count(a) > 1), None)
        if twice is not None:
            out[name] = f"sum of correlated terms: {twice} appears more than once"
            continue
        anc = {a: nx.ancestors(g, a) | {a} for a in terms}
        for i, a in enumerate(terms):
            b = next((b for b in terms[i + 1:] if _correlated(topo, anc[a], anc[b])), None)
            if b is not None:
                only = sorted({_weight_key(topo, n) for n in anc[a] - anc[b] if g.nodes[n]["kind"].traits.weighted})
                shared = f" (the same weights on both: {', '.join(only)})" if only else ""
                out[name] = (f"sum of correlated terms {a} and {b}: no independent Linear/Conv weight separates "
                             f"them{shared}, so q is not the weighted sum of the terms' q")
                break
    return out


def dependent_products(topo: Topology) -> dict[str, str]:
    """``{product node: reason}`` for every elementwise product of two signals whose operands no
    independent Linear/Conv weight separates (``x * sigmoid(x)`` written out, ``h * h``): the
    independence rule of :mod:`.products` does not hold there, so they are measured."""
    from .products import ELEMENTWISE_PRODUCTS

    g = topo.graph
    fx_nodes = nodes_by_name(topo.gm)
    out: dict[str, str] = {}
    for name, d in g.nodes(data=True):
        if d["kind"] is not OpKind.MULTIPLY or not d["signal"] or d["info"].name not in ELEMENTWISE_PRODUCTS:
            continue
        args = [a.name for a in _node_args(fx_nodes[name]) if g.nodes[a.name]["signal"]]
        if len(args) != 2:
            continue
        a, b = args
        if a == b or _correlated(topo, nx.ancestors(g, a) | {a}, nx.ancestors(g, b) | {b}):
            out[name] = (f"product of dependent signals {a} and {b}: no independent Linear/Conv weight separates "
                         f"them, so the kernel is not the product of the operands' kernels")
    return out


def _node_args(node: fx.Node) -> list[fx.Node]:
    """The nodes among ``node``'s arguments, repeats included (``x + x`` gives ``[x, x]``)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
    return found


def _correlated(topo: Topology, anc_a: set[str], anc_b: set[str]) -> bool:
    g = topo.graph
    only_a = {_weight_key(topo, n) for n in anc_a - anc_b if g.nodes[n]["kind"].traits.weighted}
    only_b = {_weight_key(topo, n) for n in anc_b - anc_a if g.nodes[n]["kind"].traits.weighted}
    only_a |= {k for k in map(lambda n: _piece_key(topo, n), anc_a - anc_b) if k is not None}
    only_b |= {k for k in map(lambda n: _piece_key(topo, n), anc_b - anc_a) if k is not None}
    return not only_a ^ only_b


_SPLITS = ("chunk", "split", "tensor_split", "split_with_sizes")


def _piece_key(topo: Topology, name: str) -> str | None:
    """``"<weight key>#piece<i>"`` when ``name`` is piece ``i`` (``getitem``) of a split of a Linear's
    output along its last axis or a Conv's along its channels (``fc(x).chunk(2, -1)[i]``), through
    dropout and casts between the layer and the split; else None."""
    node = nodes_by_name(topo.gm).get(name)
    if node is None or node.op != "call_function" or node.target is not operator.getitem \
            or not isinstance(node.args[1], int) or not isinstance(node.args[0], fx.Node):
        return None
    split = node.args[0]
    if split.op not in ("call_method", "call_function") or getattr(split.target, "__name__", split.target) not in _SPLITS:
        return None
    dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    base = split.args[0] if split.args and isinstance(split.args[0], fx.Node) else None
    g = topo.graph
    while base is not None and base.name in g and g.nodes[base.name]["kind"] is OpKind.IDENTITY \
            and len(g.nodes[base.name]["signal_operands"]) == 1:
        base = nodes_by_name(topo.gm)[g.nodes[base.name]["signal_operands"][0]]
    if base is None or base.name not in g or not isinstance(dim, int):
        return None
    kind = g.nodes[base.name]["kind"]
    shape = g.nodes[base.name].get("shape")
    rank = len(shape) if shape is not None else None
    last = dim == -1 or (rank is not None and dim == rank - 1)
    if (kind is OpKind.LINEAR and last) or (kind is OpKind.CONV and (dim == 1 or (rank is not None and dim == 1 - rank))):
        return f"{_weight_key(topo, base.name)}#piece{node.args[1]}"
    return None
