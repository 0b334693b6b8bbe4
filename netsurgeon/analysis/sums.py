"""Which sums have correlated terms (docs/theory.md §3.3, weighted sums).

``q_y = Σ w_i² q_i`` holds when the terms are uncorrelated at init, which is the case when
two terms differ by at least one independent zero-mean random layer. Two terms ``a`` and
``b`` of a sum are taken as uncorrelated when some Linear/Conv weight lies on the way to one
of them and not on the way to the other (the weights of ``ancestors(a) - ancestors(b)`` and
of ``ancestors(b) - ancestors(a)`` differ). Otherwise they are correlated, for example:

* ``x + relu(x)``, ``pool(x) - x`` (PoolFormer): no weight between the two terms;
* ``f(x) + f(relu(x))`` with one shared ``f``: the same weight on both sides.

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
    return not only_a ^ only_b
