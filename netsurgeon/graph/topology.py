"""The topology view: a networkx ``DiGraph`` of a traced model with an op kind per node.

Example:
    >>> import timm, netsurgeon
    >>> topo = netsurgeon.topology(timm.create_model("resnet18"))
    >>> topo.kind_counts()["conv"], len(topo.residual_blocks())
    (20, 8)
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from .._fileio import write_atomic
from ..errors import MissingAnalysisError, UnknownNodeError
from ..ops import OpInfo, OpKind, classify, unknown_hint
from .blocks import BlockKind, MergeBlock, find_merge_blocks
from .running import propagate_shapes
from .state import META_KEY
from .tracer import trace

__all__ = ["Topology", "UnknownOp", "topology", "op_info", "classify_nodes"]

_NODE_KEY = "op"


def op_info(node: fx.Node) -> OpInfo:
    """The op classification stored on ``node`` by :func:`topology`."""
    try:
        return node.meta[META_KEY][_NODE_KEY]
    except KeyError:
        raise MissingAnalysisError(f"node {node.name} has no op kind yet: run netsurgeon.topology(gm) "
                                   f"on its GraphModule first") from None


@dataclass(frozen=True)
class UnknownOp:
    """An op no rule recognised: reported by name with how to register it."""

    node: str
    text: str
    hint: str

    def __str__(self) -> str:
        return f"{self.node}: {self.text}  (hint: {self.hint})"


class _Context:
    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.signal: dict[fx.Node, bool] = {}
        self.infos: dict[fx.Node, OpInfo] = {}

    def is_signal(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and self.signal.get(arg, False)

    def info(self, node: fx.Node) -> OpInfo:
        return self.infos[node]


def classify_nodes(gm: fx.GraphModule) -> _Context:
    """Classify every node of ``gm`` (read back with :func:`op_info`) and mark which carry signal;
    what a pass runs after editing the graph, without building the networkx view."""
    ctx = _Context(gm)
    for node in gm.graph.nodes:
        info = classify(node, ctx)
        ctx.infos[node] = info
        if info.kind is OpKind.INPUT:  # optional inputs defaulting to None/flags carry no signal
            ctx.signal[node] = not node.args or isinstance(node.args[0], torch.Tensor)
        else:
            ctx.signal[node] = info.kind.traits.signal and any(
                ctx.signal.get(a, False) for a in node.all_input_nodes)
        node.meta.setdefault(META_KEY, {})[_NODE_KEY] = info
    return ctx


class Topology:
    """A networkx view of a traced ``GraphModule``.

    Attributes:
        gm: the traced module.
        graph: ``nx.DiGraph`` keyed by node name; node attributes ``kind`` (OpKind),
            ``op`` (short op name), ``info`` (OpInfo), ``signal``, ``index``, ``target``,
            ``module_type`` and ``shape`` (when example inputs were given).
        blocks: every merge of two or more signals (residual sums, concatenations).
        unknown: ops no rule recognised, by node name.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None = None) -> None:
        self.gm = gm
        if example_inputs is not None:
            _propagate_shapes(gm, example_inputs)
        ctx = classify_nodes(gm)
        g = nx.DiGraph()
        self.unknown: list[UnknownOp] = []
        for i, node in enumerate(gm.graph.nodes):
            info = ctx.infos[node]
            inputs = node.all_input_nodes
            if not info.known:
                self.unknown.append(UnknownOp(node.name, node.format_node(), unknown_hint(node)))
            attrs: dict[str, Any] = {
                "kind": info.kind, "op": info.name, "info": info, "signal": ctx.signal[node], "index": i,
                "target": node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target)),
                "node_op": node.op, "attrs": info.attrs,
                "signal_operands": [a.name for a in inputs if ctx.signal.get(a, False)],
            }
            if node.op == "call_module":
                attrs["module_type"] = type(gm.get_submodule(node.target)).__name__
            tm = node.meta.get("tensor_meta")
            if tm is not None and hasattr(tm, "shape"):
                attrs["shape"] = tuple(tm.shape)
            g.add_node(node.name, **attrs)
            for a in inputs:
                g.add_edge(a.name, node.name)
        self.graph = g
        self.blocks: list[MergeBlock] = find_merge_blocks(g)

    # ------------------------------------------------------------------ queries
    def info(self, name: str) -> OpInfo:
        """The OpInfo of node ``name``."""
        if name not in self.graph:
            raise UnknownNodeError(f"no node named {name!r} in the graph")
        return self.graph.nodes[name]["info"]

    def kind_counts(self) -> Counter:
        """Number of nodes per op kind (kinds as strings), inputs and outputs excluded."""
        return Counter(str(d["kind"]) for _, d in self.graph.nodes(data=True)
                       if d["kind"].traits.signal and d["kind"] not in (OpKind.INPUT, OpKind.OUTPUT))

    def nodes_of(self, kind: OpKind | str) -> list[str]:
        """Names of the nodes of one kind, in graph order."""
        kind = OpKind(kind)
        return [n for n, d in self.graph.nodes(data=True) if d["kind"] is kind]

    def residual_blocks(self) -> list[MergeBlock]:
        """Merges that are residual blocks (identity or projection shortcut + branch)."""
        return [b for b in self.blocks if b.kind is BlockKind.RESIDUAL]

    def activations(self) -> Counter:
        """Activation functions in use (including those inside norm+act composites)."""
        c: Counter = Counter()
        for _, d in self.graph.nodes(data=True):
            info: OpInfo = d["info"]
            if info.activation is not None:
                c[str(info.activation)] += 1
            elif info.norm is not None and info.norm.activation is not None:
                c[str(info.norm.activation)] += 1
        return c

    def norms(self) -> Counter:
        """Normalization layers by family (``batch+relu`` for composites)."""
        c: Counter = Counter()
        for _, d in self.graph.nodes(data=True):
            n = d["info"].norm
            if n is not None:
                c[str(n.family) + (f"+{n.activation}" if n.activation else "")] += 1
        return c

    def depth(self) -> int:
        """Longest input-to-output path, counted in weight layers."""
        best: dict[str, int] = {}
        for n in nx.topological_sort(self.graph):
            d = self.graph.nodes[n]
            here = 1 if d["kind"].traits.weighted else 0
            best[n] = here + max((best[p] for p in self.graph.predecessors(n)), default=0)
        return max(best.values(), default=0)

    def summary(self) -> str:
        """A readable multi-line summary: counts per kind, blocks, norms, activations, unknown ops."""
        counts = self.kind_counts()
        res = self.residual_blocks()
        lines = [f"{self.gm.__class__.__name__}: {len(self.graph)} nodes, depth {self.depth()} weight layers",
                 "op kinds: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
                 f"residual blocks: {len(res)} ({sum(b.shortcut_kind == 'projection' for b in res)} with projection "
                 f"shortcut); concatenations: {sum(b.kind == 'concat' for b in self.blocks)}; other merges: "
                 f"{sum(b.kind == 'branch_merge' for b in self.blocks)}",
                 "norm layers: " + (", ".join(f"{k}={v}" for k, v in sorted(self.norms().items())) or "none"),
                 "activations: " + (", ".join(f"{k}={v}" for k, v in sorted(self.activations().items())) or "none")]
        if self.unknown:
            lines.append(f"unrecognised ops ({len(self.unknown)}):")
            lines += [f"  {u}" for u in self.unknown]
        return "\n".join(lines)

    def format_blocks(self, max_branches: int | None = 3, max_layers: int | None = 4) -> str:
        """One line per merge: kind, merge node, entry, shortcut and the weight layers of each branch.

        Long listings are shortened so that large graphs stay readable (a DenseNet concatenation
        has one branch per earlier layer, each through every layer before it): a branch with more
        than ``max_layers`` weight layers shows its first and last layer and how many are left
        out, and a merge with more than ``max_branches`` branches shows the first and the last
        branch and how many are left out. ``None`` shows everything; the full paths are in
        :attr:`blocks`.

        Args:
            max_branches: branches listed in full per merge. Default: 3.
            max_layers: weight layers listed in full per branch. Default: 4.
        """
        def clip(items: list[str], limit: int | None, what: str) -> list[str]:
            if limit is None or len(items) <= limit:
                return items
            return [items[0], f"... {len(items) - 2} more {what} ...", items[-1]]

        lines = []
        for b in self.blocks:
            branches = [" -> ".join(clip(bl, max_layers, "layers")) or "(no weight layer)" for bl in b.branch_layers]
            listing = " | ".join(clip(branches, max_branches, "branches")) or "-"
            count = f"{len(branches)} branches, " if len(branches) > 1 else ""
            lines.append(f"  {b.kind:12s} {b.merge:28s} entry={b.entry} shortcut={b.shortcut_kind} "
                         f"{count}branch layers: {listing}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ export
    def _export_graph(self) -> nx.DiGraph:
        out = nx.DiGraph()
        for n, d in self.graph.nodes(data=True):
            info: OpInfo = d["info"]
            attrs = {"kind": str(d["kind"]), "op": d["op"], "target": str(d["target"]),
                     "description": info.describe(), "signal": bool(d["signal"]), "index": int(d["index"])}
            if "module_type" in d:
                attrs["module_type"] = d["module_type"]
            if "shape" in d:
                attrs["shape"] = "x".join(map(str, d["shape"]))
            out.add_node(n, **attrs)
        out.add_edges_from(self.graph.edges)
        return out

    def to_graphml(self, path: str | os.PathLike) -> Path:
        """Write the view as GraphML (attributes as strings/ints/bools), atomically."""
        path = Path(path)
        graph = self._export_graph()
        write_atomic(path, lambda tmp: nx.write_graphml(graph, tmp))
        return path

    def to_dot(self) -> str:
        """The view as Graphviz DOT source, nodes coloured by kind."""
        colors = {"conv": "lightblue", "linear": "lightblue", "norm": "khaki", "activation": "palegreen",
                  "add": "salmon", "concat": "salmon", "multiply": "orchid", "other": "red"}
        lines = ["digraph netsurgeon {", "  node [shape=box, style=filled, fontname=Helvetica];"]
        g = self._export_graph()
        for n, d in g.nodes(data=True):
            label = f"{n}\\n{d['description']}"
            lines.append(f'  "{n}" [label="{label}", fillcolor="{colors.get(d["kind"], "white")}"];')
        lines += [f'  "{a}" -> "{b}";' for a, b in g.edges]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def write_dot(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dot` to ``path`` atomically (the file appears whole or not at all)."""
        path = Path(path)
        text = self.to_dot()
        write_atomic(path, lambda tmp: tmp.write_text(text))
        return path

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": len(self.graph), "kinds": dict(self.kind_counts()),
                "blocks": [b.to_dict() for b in self.blocks],
                "unknown": [u.__dict__ for u in self.unknown]}


def _propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor) -> None:
    propagate_shapes(gm, (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs))


def topology(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None) -> Topology:
    """Build the topology view of ``model`` (traced first when it is not a GraphModule).

    Args:
        model: an ``nn.Module`` or a GraphModule from :func:`netsurgeon.trace`.
        example_inputs: optional inputs; when given, every node gets its ``shape``.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    return Topology(gm, example_inputs)
