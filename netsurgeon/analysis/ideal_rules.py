"""The rules of :class:`~netsurgeon.analysis.targets.IdealGraph`, one per op kind: what a node
does to ``(q, value)`` under the DKS assumptions (docs/theory.md §4.4–§4.5), and the check
that names a node the assumptions do not cover, with the remedy.

A module op registered with ``netsurgeon.register_module_op`` and a kernel rule gets its ideal
rule from that kernel rule (:func:`from_kernel_rule`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import torch.fx as fx

from ..errors import UnsupportedNodeError
from ..ops import NormFamily, OpKind, pool_type
from .activation_maps import maps_for
from .rules import IDEAL_RULES, KernelContext, KernelRule, NodeKernel

__all__ = ["ActRule", "IdealRule", "NO_RULE", "from_kernel_rule", "ideal_rule"]

_Q_TOL = 1e-3  # an activation input's idealized q must be 1 within this (norm eps moves it ~1e-5)
_C_GRID = np.linspace(-1.0, 1.0, 21)  # where a module op's kernel rule must keep c (see from_kernel_rule)

ActRule = Callable[[str, float], float]  # (activation node, value in) -> value out
IdealGraph = Any  # netsurgeon.analysis.targets.IdealGraph (imports this module; named here for the signatures)


def _weighted(terms: list[tuple[float, str]], q: dict[str, float], v: dict[str, float]) -> tuple[float, float]:
    q_out = sum(w * q[a] for w, a in terms)
    if q_out <= 0:
        return 0.0, 0.0
    return q_out, sum(w * q[a] * v[a] for w, a in terms) / q_out


def _features(shape: tuple[int, ...] | None) -> int:
    """Channels of a ``[B, C, ...]`` shape (a concatenation's weight per location)."""
    return int(shape[1]) if shape is not None and len(shape) > 1 else 1


class IdealRule(NamedTuple):
    """What a kind (or a module type) does under the DKS assumptions.

    Attributes:
        apply: ``apply(graph, node, data, ins, q, v, act) -> (q, value)`` at the node, from its
            operands ``ins`` already reached (``q``/``v``: per node; ``act``: the activation rule).
        check: ``check(graph, node, data) -> reason`` when the node breaks the assumptions, else None.
    """

    apply: Callable[..., tuple[float, float]]
    check: Callable[..., str | None] | None = None


def ideal_rule(*kinds: OpKind, check: Callable[..., str | None] | None = None
               ) -> Callable[[Callable[..., tuple[float, float]]], Callable[..., tuple[float, float]]]:
    """Decorator: register ``apply`` (with ``check``) as the ideal rule of ``kinds``."""
    def deco(apply: Callable[..., tuple[float, float]]) -> Callable[..., tuple[float, float]]:
        for kind in kinds:
            IDEAL_RULES.add(kind, IdealRule(apply, check))
        return apply
    return deco


def _pass_through(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
                  v: dict[str, float], act: ActRule) -> tuple[float, float]:
    """Layers with ideal weights, pools, neutral products: q and the value pass through."""
    return q[ins[0]], v[ins[0]]


def _pool_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    kind = pool_type(d["info"])
    if kind is None or not kind.averages:
        return (f"{d['info'].attrs.get('pool_type', 'unknown')} pooling has no exact kernel map: run "
                "maxpool_to_avgpool first")
    return None


def _product_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    if graph.products == "refuse":
        return ("product of signals (attention, squeeze-excite): no kernel map; pass products='empirical' "
                "(measured maps) or 'neutral' (a pass-through)")
    return None


def _no_rule_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    return f"{d['info'].describe()}: no kernel rule"


def _unknown_kind_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    return f"{d['info'].describe()}: no DKS target rule for op kind {d['kind']} (register one with @ideal_rule)"


NO_RULE = IdealRule(_pass_through, _unknown_kind_check)  # a kind nobody wrote a rule for is named, not guessed
ideal_rule(OpKind.INPUT, OpKind.LINEAR, OpKind.CONV, *(k for k in OpKind if k.traits.unchanged))(_pass_through)
ideal_rule(OpKind.POOL, check=_pool_check)(_pass_through)
ideal_rule(OpKind.MULTIPLY, check=_product_check)(_pass_through)
ideal_rule(OpKind.OTHER, check=_no_rule_check)(_pass_through)


def _activation_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    return f"activation {d['info'].name} not identified" if d["info"].activation is None else None


@ideal_rule(OpKind.ACTIVATION, check=_activation_check)
def _activation(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
                v: dict[str, float], act: ActRule) -> tuple[float, float]:
    """The caller's local rule, at q = 1 (the identity passes through)."""
    spec, first = d["info"].activation, ins[0]
    if spec is not None and spec.name == "identity":
        return q[first], v[first]
    if abs(q[first] - 1.0) > _Q_TOL:
        raise UnsupportedNodeError(
            f"activation {node.name} receives q = {q[first]:.6g} under the DKS assumptions, not 1: a sum "
            f"upstream is not normalized (run normalize_sums) or a scaling changes q (a layer scale, a "
            f"norm whose eps dominates)", nodes=[node.name])
    return 1.0, act(node.name, v[first])


def _norm_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    spec = d["info"].norm
    if spec is None:
        return f"{d['info'].describe()}: no kernel rule"
    if spec.family is NormFamily.BATCH:
        return "batch norm: run strip_bn first (fold or remove)"
    if spec.activation is not None:
        return "norm+activation composite: its activation cannot be reshaped"
    return None


@ideal_rule(OpKind.NORM, check=_norm_check)
def _norm(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
          v: dict[str, float], act: ActRule) -> tuple[float, float]:
    """Per-example norms rescale to q = 1, unless q is far below their eps."""
    first = ins[0]
    gm = graph.topo.gm
    eps = float(getattr(gm.get_submodule(node.target), "eps", 0.0)) if node.op == "call_module" else 0.0
    return q[first] / (q[first] + eps), v[first]


def _affine_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    if d["info"].constant_factor is None and graph.affine_moments(node) is None:
        return "affine op with no constant scale netsurgeon can read"
    return None


@ideal_rule(OpKind.AFFINE, check=_affine_check)
def _affine(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
            v: dict[str, float], act: ActRule) -> tuple[float, float]:
    """``f·h``: q times f²; a per-channel scale (layer scale, ChannelAffine): channels assumed alike."""
    first, factor = ins[0], d["info"].constant_factor
    if factor is not None:
        return factor ** 2 * q[first], v[first]
    s2, t2 = graph.affine_moments(node)
    q_out = s2 * q[first] + t2
    return q_out, (s2 * q[first] * v[first] + t2) / q_out if q_out > 0 else 0.0


def _sum_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    weights = d["info"].attrs.get("weights")
    if weights is None or any(w is None for w in weights):
        return "sum with non-constant weights"
    return graph.correlated.get(node.name)


@ideal_rule(OpKind.ADD, check=_sum_check)
def _sum(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
         v: dict[str, float], act: ActRule) -> tuple[float, float]:
    """``Σ w_i h_i`` where a term written ``c·h`` carries c in its own q already."""
    g = graph.topo.graph
    terms = []
    for w, a in zip(d["info"].attrs["weights"], d["signal_operands"]):
        if a not in q:
            continue
        factor = g.nodes[a]["info"].constant_factor
        terms.append(((float(w) / (1.0 if factor is None else factor)) ** 2, a))
    return _weighted(terms, q, v)


def _concat_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    if any("shape" not in graph.topo.graph.nodes[a] for a in d["signal_operands"]):
        return "concatenation without shapes: pass example_inputs"
    return None


@ideal_rule(OpKind.CONCAT, check=_concat_check)
def _concat(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
            v: dict[str, float], act: ActRule) -> tuple[float, float]:
    """The parts weighted by their feature counts."""
    dims = [_features(graph.topo.graph.nodes[a].get("shape")) for a in d["signal_operands"]]
    total = sum(dims)
    return _weighted([(n / total, a) for n, a in zip(dims, d["signal_operands"]) if a in q], q, v)


def from_kernel_rule(rule: KernelRule) -> IdealRule:
    """The ideal rule of a module op registered with a kernel rule (``netsurgeon.register_module_op``):
    its q from the rule, the value passed on from the first operand. The rule must keep c (checked
    on a grid at q = 1): the DKS targets assume only activations change the C map."""
    def evaluate(graph: IdealGraph, node: fx.Node, d: dict, qs: list[float]) -> NodeKernel | None:
        ctx = KernelContext(node, d["info"], graph.topo.gm, None, maps_for)
        return rule(ctx, [NodeKernel(x, x, x * _C_GRID, 1.0) for x in qs])

    def check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
        out = evaluate(graph, node, d, [1.0] * max(1, len(d["signal_operands"])))
        if out is None:
            return f"{d['info'].describe()}: its kernel rule gives no map"
        if not np.allclose(out.c, _C_GRID, rtol=0.0, atol=1e-9):
            return (f"{d['info'].describe()}: its kernel rule changes the C map, and the DKS targets assume only "
                    f"activations do (register an elementwise activation with netsurgeon.register_activation)")
        return None

    def apply(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
              v: dict[str, float], act: ActRule) -> tuple[float, float]:
        out = evaluate(graph, node, d, [q[a] for a in ins])
        return (out.q if out is not None else q[ins[0]]), v[ins[0]]

    return IdealRule(apply, check)
