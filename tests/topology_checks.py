"""Compare ``netsurgeon.trace`` / ``netsurgeon.topology`` with a :class:`topology_specs.ModelSpec`.

1. :func:`check_equivalence`: the traced GraphModule reproduces the eager model in eval mode
   and in train mode (batch statistics and running-stat updates included);
2. :func:`check_counts`: ``kind_counts()`` equals the generated counts;
3. :func:`check_blocks`: ``blocks`` / ``residual_blocks()`` report exactly the generated merges:
   kind, entry, shortcut kind, shortcut nodes and branch weight layers (node names, in order);
4. :func:`check_exports`: the DOT and GraphML exports hold every node and edge.

Residual versus other merges is decided by path weight (``netsurgeon/graph/blocks.py``):
a sum is residual when its lightest operand path has no activation and at most one
weight layer. So the generator builds projection-residual branches that are strictly
heavier than a conv(+BN) shortcut, and non-residual two-branch adds whose branches
both hold an activation or two weight layers: the expected answer is never a tie.

Example:
    >>> import netsurgeon
    >>> from topology_models import build
    >>> from topology_specs import Layer, ModelSpec, Residual
    >>> spec = ModelSpec(4, (Residual((Layer("conv3", 4, 4, True, "relu"), Layer("conv3", 4, 4)),),))
    >>> check_blocks(spec, netsurgeon.topology(build(spec, 0)[0]))
"""
from __future__ import annotations

import copy
from pathlib import Path

import networkx as nx
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.ops import OpKind

from topology_specs import BranchAdd, ModelSpec, Residual, expected_counts, merges_of, weights_of

__all__ = ["WEIGHT_KINDS", "module_nodes", "weight_nodes", "check_equivalence", "check_counts", "check_blocks",
           "check_exports"]

WEIGHT_KINDS = (OpKind.CONV, OpKind.LINEAR)


def module_nodes(gm) -> dict[str, str]:
    """Qualified module path -> fx node name, for call_module nodes."""
    return {n.target: n.name for n in gm.graph.nodes if n.op == "call_module"}


def weight_nodes(topo, path: list[str]) -> list[str]:
    return [x for x in path if topo.graph.nodes[x]["kind"] in WEIGHT_KINDS]


def check_equivalence(model: nn.Module, x: torch.Tensor) -> None:
    eager = copy.deepcopy(model)
    gm = netsurgeon.trace(model, x)  # trace also checks itself against eager, eval mode
    assert gm.training and eager.training
    eager.eval(), gm.eval()
    with torch.no_grad():
        ref, out = eager(x), gm(x)
    assert ref.shape == out.shape
    assert torch.equal(ref, out)
    # train mode: batch statistics, and the same running-stat updates, step after step
    eager.train(), gm.train()
    for _ in range(2):
        ref, out = eager(x), gm(x)
        assert torch.equal(ref, out)
    sd_ref, sd_out = eager.state_dict(), gm.state_dict()
    assert set(sd_ref) == set(sd_out)
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_out[k]), k
    # and back to eval with the updated statistics
    eager.eval(), gm.eval()
    with torch.no_grad():
        assert torch.equal(eager(x), gm(x))
    # a model traced in eval mode gives an eval-mode GraphModule that still trains like the model
    frozen = copy.deepcopy(eager).eval()
    gm2 = netsurgeon.trace(frozen)
    assert not gm2.training and not frozen.training
    frozen.train(), gm2.train()
    assert torch.equal(frozen(x), gm2(x))


def check_counts(spec: ModelSpec, topo) -> None:
    counts = topo.kind_counts()
    want = expected_counts(spec)
    assert {k: counts[k] for k in want} == want
    assert counts["other"] == 0 and counts["multiply"] == 0 and not topo.unknown, topo.unknown


def check_blocks(spec: ModelSpec, topo) -> None:
    """The merge blocks found are the generated ones, in graph order."""
    names = module_nodes(topo.gm)
    order = {n: d["index"] for n, d in topo.graph.nodes(data=True)}
    merges = sorted(topo.blocks, key=lambda b: order[b.merge])
    assert sorted(b.merge for b in merges) == sorted(topo.nodes_of("add") + topo.nodes_of("concat")), \
        "every add/concat node is one merge block"
    gen = merges_of(spec.body, "body")
    assert [type(b).__name__ for _, b in gen] == [
        {"residual": "Residual", "branch_merge": "BranchAdd", "concat": "Concat"}[mb.kind] for mb in merges], \
        f"generated {[p for p, _ in gen]}, found {[(mb.merge, mb.kind) for mb in merges]}"
    for (p, b), mb in zip(gen, merges):
        where = f"{p} ({type(b).__name__}) reported as {mb}"
        if b.marker:
            assert mb.entry == names[f"{p}.inp"], where
        if isinstance(b, Residual):
            assert topo.graph.nodes[mb.merge]["kind"] is OpKind.ADD, where
            assert mb.shortcut_kind == ("projection" if b.projection else "identity"), where
            assert mb.shortcut == ([names[f"{p}.proj"]] + ([names[f"{p}.proj_bn"]] if b.proj_bn else [])
                                   if b.projection else []), where
            assert mb.branch_layers == [[names[w] for w in weights_of(b.branch, f"{p}.branch")]], where
            assert len(mb.operands) == 2 and mb.weights == [1.0, 1.0], where
        elif isinstance(b, BranchAdd):
            assert topo.graph.nodes[mb.merge]["kind"] is OpKind.ADD, where
            got = sorted([weight_nodes(topo, mb.shortcut)] + mb.branch_layers)
            want = sorted([names[w] for w in weights_of(ls, f"{p}.{side}")]
                          for side, ls in (("left", b.left), ("right", b.right)))
            assert got == want, where
        else:
            assert topo.graph.nodes[mb.merge]["kind"] is OpKind.CONCAT, where
            assert len(mb.operands) == len(b.branches), where
            got = sorted([weight_nodes(topo, mb.shortcut)] + mb.branch_layers)
            want = sorted([names[w] for w in weights_of(ls, f"{p}.branches.{j}")]
                          for j, (_, ls) in enumerate(b.branches))
            assert got == want, where
    assert len(topo.residual_blocks()) == sum(isinstance(b, Residual) for _, b in gen)
    assert all(b.kind == "residual" for b in topo.residual_blocks())


def check_exports(topo, directory: Path) -> None:
    dot = topo.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    for n in topo.graph.nodes:
        assert f'"{n}"' in dot, n
    for a, b in topo.graph.edges:
        assert f'"{a}" -> "{b}";' in dot, (a, b)
    path = topo.to_graphml(directory / "g.graphml")
    back = nx.read_graphml(path)
    assert back.number_of_nodes() == topo.graph.number_of_nodes()
    assert set(back.nodes) == set(topo.graph.nodes)
    assert set(back.edges) == set(topo.graph.edges)
    for n, d in topo.graph.nodes(data=True):
        assert back.nodes[n]["kind"] == str(d["kind"])
        if "shape" in d:
            assert back.nodes[n]["shape"] == "x".join(map(str, d["shape"]))
