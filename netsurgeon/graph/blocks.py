"""Merge-block detection: residual sums and concatenations in a traced graph.

For every node that merges two or more signals (an ``ADD`` or a ``CONCAT``), the
block's *entry* is the merge node's immediate dominator among signal nodes (the
last node every input-to-merge path passes through). Each operand's *path* is the set
of nodes between the entry and the operand. The operand whose path holds the fewest
weight layers and activations is the *shortcut*; the others are *branches*. A block
is *residual* when its shortcut has no activation and at most one weight layer (an
identity or projection shortcut) and some branch has a weight layer.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx

from ..ops import OpKind

__all__ = ["BlockKind", "MergeBlock", "find_merge_blocks", "is_residual", "path_cost"]


class BlockKind(str, enum.Enum):
    """What a merge is (compares equal to its string value: ``BlockKind.RESIDUAL == "residual"``)."""

    RESIDUAL = "residual"  # identity or projection shortcut plus a branch with a weight layer
    CONCAT = "concat"
    BRANCH_MERGE = "branch_merge"  # a sum of non-trivial paths

    def __str__(self) -> str:
        return self.value


def path_cost(kinds: Iterable[OpKind]) -> tuple[int, int, int]:
    """``(substantial ops, weight layers, activations)`` on a path (see ``OpKind.traits``);
    a merge's shortcut is its operand with the smallest cost."""
    kinds = list(kinds)
    return (sum(k.traits.substantial for k in kinds), sum(k.traits.weighted for k in kinds),
            sum(k is OpKind.ACTIVATION for k in kinds))


def is_residual(shortcut: tuple[int, int, int], branches: Iterable[tuple[int, int, int]]) -> bool:
    """A sum is a residual block when its shortcut (by :func:`path_cost`) has no activation and
    at most one weight layer (an identity or projection shortcut) and some branch has a weight layer."""
    return shortcut[2] == 0 and shortcut[1] <= 1 and any(b[1] for b in branches)


@dataclass
class MergeBlock:
    """One merge of signals, with its shortcut and branches.

    Attributes:
        merge: name of the ADD/CONCAT node.
        kind: a :class:`BlockKind` (equal to ``"residual"``, ``"concat"`` or ``"branch_merge"``).
        entry: the node where the paths fork.
        shortcut: nodes of the shortcut path in order (empty: the entry itself).
        shortcut_kind: ``"identity"`` or ``"projection"`` (a weight layer on the shortcut).
        branches: nodes of each branch path in order.
        branch_layers: the LINEAR/CONV nodes of each branch in order.
        operands: the merge node's signal operands, shortcut first.
        weights: the sum's weight per operand (shortcut first) when constant.
    """

    merge: str
    kind: str
    entry: str | None
    shortcut: list[str]
    shortcut_kind: str
    branches: list[list[str]]
    branch_layers: list[list[str]]
    operands: list[str] = field(default_factory=list)
    weights: list[float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _path_between(g: nx.DiGraph, entry: str | None, operand: str, order: dict[str, int]) -> list[str]:
    """Nodes on paths from ``entry`` (excluded) to ``operand`` (included), in order.

    Walks back from the operand over signal nodes no earlier than the entry, then keeps
    the nodes the entry reaches; cost is the size of the block, not of the graph.
    """
    lo = order[entry] if entry is not None else -1
    back = {operand}
    stack = [operand]
    while stack:
        n = stack.pop()
        for p in g.predecessors(n):
            if p not in back and p != entry and order[p] > lo and g.nodes[p]["signal"]:
                back.add(p)
                stack.append(p)
    if entry is None:
        return sorted(back, key=order.__getitem__)
    fwd: set[str] = set()
    stack = [s for s in g.successors(entry) if s in back]
    fwd.update(stack)
    while stack:
        n = stack.pop()
        for s in g.successors(n):
            if s in back and s not in fwd:
                fwd.add(s)
                stack.append(s)
    return sorted(fwd, key=order.__getitem__)


def _weight(g: nx.DiGraph, path: list[str]) -> tuple[int, int, int]:
    return path_cost(g.nodes[n]["kind"] for n in path)


def find_merge_blocks(g: nx.DiGraph) -> list[MergeBlock]:
    """Find every ADD/CONCAT node that merges two or more signals, with its paths.

    Args:
        g: a topology DiGraph whose nodes carry ``kind``, ``signal``, ``index`` and
            ``signal_operands`` attributes (see :class:`netsurgeon.graph.Topology`).
    """
    order = {n: d["index"] for n, d in g.nodes(data=True)}
    signal_nodes = [n for n, d in g.nodes(data=True) if d["signal"]]
    sg = g.subgraph(signal_nodes).copy()
    source = "__netsurgeon_source__"
    sg.add_node(source)
    for n, d in g.nodes(data=True):
        if d["kind"] is OpKind.INPUT and d["signal"]:
            sg.add_edge(source, n)
    idom = nx.immediate_dominators(sg, source)
    blocks: list[MergeBlock] = []
    for n in sorted(signal_nodes, key=order.__getitem__):
        d = g.nodes[n]
        if not d["kind"].traits.merge:
            continue
        operands = list(dict.fromkeys(d.get("signal_operands", [])))
        if len(operands) < 2:
            continue
        entry = idom.get(n)
        entry = None if entry in (source, None) else entry
        paths = {o: ([] if o == entry else _path_between(g, entry, o, order)) for o in operands}
        costs = {o: _weight(g, paths[o]) for o in operands}
        ranked = sorted(operands, key=lambda o: (costs[o], operands.index(o)))
        sc = ranked[0]
        weights = costs[sc][1]
        branches = [paths[o] for o in ranked[1:]]
        branch_layers = [[x for x in p if g.nodes[x]["kind"].traits.weighted] for p in branches]
        if d["kind"] is OpKind.CONCAT:
            kind = BlockKind.CONCAT
        elif is_residual(costs[sc], (costs[o] for o in ranked[1:])):
            kind = BlockKind.RESIDUAL
        else:
            kind = BlockKind.BRANCH_MERGE
        w = d.get("attrs", {}).get("weights")
        sum_weights = None
        if w is not None and len(w) == len(d.get("signal_operands", [])):
            by_operand = dict(zip(d["signal_operands"], w))
            sum_weights = [by_operand[o] for o in ranked]
        blocks.append(MergeBlock(merge=n, kind=kind, entry=entry, shortcut=paths[sc],
                                 shortcut_kind="projection" if weights else "identity",
                                 branches=branches, branch_layers=branch_layers,
                                 operands=ranked, weights=sum_weights))
    return blocks
