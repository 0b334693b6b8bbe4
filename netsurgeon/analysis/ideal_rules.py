"""The rules of :class:`~netsurgeon.analysis.targets.IdealGraph`, one per op kind: what a node
does to ``(q, value)`` under the DKS assumptions (docs/theory.md §4.4–§4.5), and the check
that names a node the assumptions do not cover, with the remedy.

A module op registered with ``netsurgeon.register_module_op`` and a kernel rule gets its ideal
rule from that kernel rule (:func:`from_kernel_rule`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.fx as fx

from ..errors import MissingAnalysisError, UnsupportedNodeError
from ..graph import op_info
from ..graph.state import get_report, has_report
from ..ops import NormFamily, OpKind, PoolType, arg, pool_type
from .activation_maps import maps_for
from .rules import IDEAL_RULES, KernelContext, KernelRule, NodeKernel

__all__ = ["ActRule", "IdealRule", "NO_RULE", "dim_sum_terms", "from_kernel_rule", "ideal_rule"]

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


_ELEMENTWISE = (OpKind.ACTIVATION, OpKind.AFFINE, OpKind.IDENTITY, OpKind.MULTIPLY)


def dim_sum_terms(node: fx.Node) -> int | None:
    """How many terms ``x.sum(dim)`` / ``torch.sum(x, dim)`` adds up when ``dim`` holds separate
    signals: a dimension made by ``torch.stack(xs, dim)`` (``len(xs)`` terms: selective-kernel
    paths), or by a reshape/view that splits the channels into ``n`` groups at ``dim = 1``
    (``[B, n, C/n, ...]`` with a literal ``n``: split attention's radix), seen through elementwise
    ops (activations, constant scales, products with a gate, dropout). Under the DKS assumptions
    such terms are uncorrelated (different channels or layers), so the sum multiplies q by ``n``
    and keeps the cosines, like a sum of ``n`` terms of weight 1. None for any other sum (over
    positions, whose terms are correlated, or over several dims)."""
    dim = arg(node, 1, "dim")
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or isinstance(dim, bool) or not node.args:
        return None
    return _terms_at(node.args[0], dim, 0)


def _terms_at(x: object, dim: int, depth: int) -> int | None:
    if not isinstance(x, fx.Node) or depth > 32:
        return None
    if x.op == "call_function" and x.target is torch.stack:
        tensors = x.args[0] if x.args else x.kwargs.get("tensors")
        ok = isinstance(tensors, (list, tuple)) and len(tensors) > 1 and arg(x, 1, "dim", 0) == dim and dim >= 0
        return len(tensors) if ok else None
    try:
        info = op_info(x)
    except MissingAnalysisError:
        return None
    if info.kind is OpKind.RESHAPE and x.target in ("reshape", "view", torch.reshape):
        rest = x.args[1:] if x.op == "call_method" else x.args[1:2]
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if len(shape) > 2 and dim in (1, 1 - len(shape)) and type(shape[1]) is int and shape[1] > 1:
            return shape[1]
        return None
    if info.kind in _ELEMENTWISE:
        for a in x.all_input_nodes:
            n = _terms_at(a, dim, depth + 1)
            if n is not None:
                return n
    return None


def _ran(graph: IdealGraph, name: str) -> Any:
    """The record of the last run of pass ``name`` on the graph's module, or None."""
    gm = graph.topo.gm
    if not has_report(gm):
        return None
    return next((r for r in reversed(get_report(gm).passes) if r.name == name), None)


def _left_by(graph: IdealGraph, name: str, node: str) -> str | None:
    """Why pass ``name`` (when it ran) skipped ``node``, or None."""
    record = _ran(graph, name)
    return None if record is None else next((s.why for s in record.skipped if s.node == node), None)


def _pool_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    kind = pool_type(d["info"])
    if kind is PoolType.SUM:
        if dim_sum_terms(node) is not None:
            return None
        return (f"sum over dim(s) {d['info'].attrs.get('dim')} (torch.sum / Tensor.sum): no kernel map (q grows with "
                f"the number of terms, and terms over positions are correlated); netsurgeon counts the terms only of "
                f"a dim made by torch.stack or by a reshape splitting channels into groups (dim 1). maxpool_to_avgpool "
                f"leaves sums alone: write it as a mean over those dims, or as a sum of separate terms")
    if kind is None or not kind.averages:
        what = f"{d['info'].attrs.get('pool_type', 'unknown')} pooling has no exact kernel map"
        if kind is None or not kind.takes_max:
            return f"{what}; maxpool_to_avgpool converts only max pooling: replace it by an average pooling"
        if _ran(graph, "maxpool_to_avgpool") is None:
            return f"{what}: run maxpool_to_avgpool first"
        why = _left_by(graph, "maxpool_to_avgpool", node.name)
        return (f"{what}; maxpool_to_avgpool ran and left it ({why or 'not a max pooling it rewrites'}): replace it "
                f"by an average pooling by hand")
    return None


@ideal_rule(OpKind.POOL, check=_pool_check)
def _pool(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
          v: dict[str, float], act: ActRule) -> tuple[float, float]:
    """Averages pass q and the value through; a sum of ``n`` uncorrelated terms (:func:`dim_sum_terms`)
    multiplies q by ``n``."""
    n = dim_sum_terms(node) if pool_type(d["info"]) is PoolType.SUM else None
    return (n or 1) * q[ins[0]], v[ins[0]]


def _product_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    if graph.products == "refuse":
        return ("product of signals (attention, squeeze-excite): refused because products='refuse'; the "
                "default products='rule' follows its map")
    return None


NO_RULE_REMEDY = "teach netsurgeon one: register_module_op or register_function_op, docs/architecture.md"


def _no_rule_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    return f"{d['info'].describe()}: no kernel rule ({NO_RULE_REMEDY})"


def _unknown_kind_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    return f"{d['info'].describe()}: no DKS target rule for op kind {d['kind']} (register one with @ideal_rule)"


NO_RULE = IdealRule(_pass_through, _unknown_kind_check)  # a kind nobody wrote a rule for is named, not guessed
ideal_rule(OpKind.INPUT, OpKind.LINEAR, OpKind.CONV, *(k for k in OpKind if k.traits.unchanged))(_pass_through)
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
        origins = _q_origins(graph, first, q)
        raise UnsupportedNodeError(
            f"activation {node.name} receives q = {q[first]:.6g} under the DKS assumptions, not 1: "
            + "; ".join(_q_change(graph, n, q) for n in origins[:3])
            + (f" (and {len(origins) - 3} more)" if len(origins) > 3 else ""), nodes=[node.name, *origins])
    return 1.0, act(node.name, v[first])


def _off(x: float) -> bool:
    return abs(x - 1.0) > _Q_TOL


def _sum_weight2(d: dict) -> float | None:
    """``Σ w_i²`` of a sum's weights (the coefficients on the signals below any constant factor)."""
    weights = d["info"].attrs.get("weights")
    if weights is None or any(w is None for w in weights):
        return None
    return float(sum(float(w) ** 2 for w in weights))


def below_factors(g: Any, name: str) -> str:
    """The signal below a chain of constant factors (a sum term written ``c·h``) in the topology
    graph ``g``."""
    while g.nodes[name]["kind"] is OpKind.AFFINE and g.nodes[name]["info"].constant_factor is not None \
            and len(g.nodes[name]["signal_operands"]) == 1:
        name = g.nodes[name]["signal_operands"][0]
    return name


def _q_origins(graph: IdealGraph, start: str, q: dict[str, float]) -> list[str]:
    """The nodes where q first leaves 1 on the way to ``start``, in graph order. A normalized sum is
    looked through (its terms' constant factors are its weights): a term whose own q is off is the cause."""
    g = graph.topo.graph
    seen: set[str] = set()
    origins: list[str] = []
    stack = [start]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        d = g.nodes[name]
        ops = [a for a in d["signal_operands"] if a in q]
        if d["kind"] is OpKind.ADD:
            w2 = _sum_weight2(d)
            if w2 is None or abs(w2 - 1.0) > _Q_TOL:
                origins.append(name)
                continue
            ups = [b for b in (below_factors(graph.topo.graph, a) for a in ops) if b in q and _off(q[b])]
        else:
            ups = [a for a in ops if _off(q[a])]
        if ups:
            stack.extend(ups)
        else:
            origins.append(name)
    return sorted(origins, key=lambda n: g.nodes[n]["index"])


def _q_change(graph: IdealGraph, name: str, q: dict[str, float]) -> str:
    """What changes q at ``name`` and the remedy, never one that already ran to no effect."""
    g = graph.topo.graph
    d = g.nodes[name]
    info, kind = d["info"], d["kind"]
    ins = [a for a in d["signal_operands"] if a in q]
    q_in = q[ins[0]] if ins else 1.0
    ratio = q[name] / q_in if q_in > 0 else float("inf")
    sums_ran = _ran(graph, "normalize_sums")
    if kind is OpKind.ADD:
        w2 = _sum_weight2(d)
        head = f"the sum {name} has squared weights adding up to {w2:.4g}, not 1" if w2 is not None else \
            f"the sum {name} has weights netsurgeon cannot read"
        if sums_ran is None:
            return f"{head} (run normalize_sums)"
        why = _left_by(graph, "normalize_sums", name)
        return f"{head}; normalize_sums ran and left it ({why})" if why else \
            f"{head}; it was added or changed after normalize_sums ran (run normalize_sums again)"
    if kind is OpKind.POOL and pool_type(info) is PoolType.SUM:
        n = dim_sum_terms(next(x for x in graph.topo.gm.graph.nodes if x.name == name))
        head = f"the sum over dim {info.attrs.get('dim')} at {name} adds {n} uncorrelated terms (q × {n})"
        return f"{head} (run normalize_sums: it weights such a sum by 1/sqrt({n}))" if sums_ran is None else \
            f"{head}; it was added after normalize_sums ran (run normalize_sums again: it weights it by 1/sqrt({n}))"
    if kind is OpKind.AFFINE and info.constant_factor is not None:
        f = info.constant_factor
        return (f"the constant factor {f:g} at {name} multiplies q by {f * f:.4g} (remove it, or fold it into the "
                f"weights of the layer before)")
    if kind is OpKind.AFFINE:
        head = f"the per-channel scale at {name} ({info.describe()}) multiplies q by {ratio:.4g}"
        resets = [r for r in (sums_ran, _ran(graph, "remove_skips"))
                  if r is not None and r.options.get("reset_layer_scale")]
        if resets:
            return (f"{head}, and {resets[0].name} (reset_layer_scale=True) did not reset it: it is not a layer "
                    f"scale (one ending a residual branch, or one small value on every channel); set it to 1 or "
                    f"fold it into the layer before")
        return (f"{head}: a layer scale initialized near 0? Set it to 1: normalize_sums with "
                f"reset_layer_scale=True does so for the scales ending residual branches (remove_skips does by "
                f"default)")
    if kind is OpKind.NORM:
        return (f"the norm {name} gives q = {q[name]:.4g}: its eps dominates the input's q = {q_in:.4g} (lower eps, "
                f"or keep q near 1 before it)")
    if kind is OpKind.MULTIPLY:
        return f"the product of signals {name} multiplies q by {ratio:.4g}"
    return f"{info.describe()} at {name} changes q from {q_in:.4g} to {q[name]:.4g}"


def norm_family_problem(info: Any) -> str | None:
    """Why a norm node (plain or a norm+activation composite) breaks the DKS assumptions by its
    family alone: no norm spec, batch statistics, or a family without a kernel map; else None."""
    spec = info.norm
    if spec is None:
        return f"{info.describe()}: no kernel rule ({NO_RULE_REMEDY})"
    if spec.family is NormFamily.BATCH:
        return "batch norm: run strip_bn first (fold or remove)"
    if spec.family is NormFamily.OTHER:  # LocalResponseNorm, EvoNorm: no kernel map
        return f"{info.describe()}: {info.attrs.get('reason', 'no kernel rule')}"
    return None


def _norm_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    problem = norm_family_problem(d["info"])
    if problem is not None:
        return problem
    if d["info"].norm.activation is not None:
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
        return ("affine op with no constant scale netsurgeon can read (its scale or shift is computed at run "
                "time, not held in a parameter or buffer; hold it in one, or teach netsurgeon the op: "
                "register_function_op, docs/architecture.md)")
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
    if graph.products in ("rule", "empirical"):
        return None  # followed by its measured map, as a product is (targets.mapped_merges)
    return graph.correlated.get(node.name)


def sum_terms(g: Any, name: str) -> list[tuple[float, str]]:
    """``[(coefficient, operand)]`` of a sum node ``Σ w_i h_i``: its q when the terms are uncorrelated is
    ``Σ coefficient · q(operand)``; a term written ``c·h`` carries c in its own q already, so its
    coefficient is ``(w / c)²``."""
    d = g.nodes[name]
    out = []
    for w, a in zip(d["info"].attrs["weights"], d["signal_operands"]):
        factor = g.nodes[a]["info"].constant_factor
        out.append(((float(w) / (1.0 if factor is None else factor)) ** 2, a))
    return out


@ideal_rule(OpKind.ADD, check=_sum_check)
def _sum(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
         v: dict[str, float], act: ActRule) -> tuple[float, float]:
    """``Σ w_i h_i`` where a term written ``c·h`` carries c in its own q already."""
    g = graph.topo.graph
    terms, present, total = [], 0.0, 0.0
    for (c, a), w in zip(sum_terms(g, node.name), d["info"].attrs["weights"]):
        share = float(w) ** 2 * _nominal_q(g, below_factors(g, a))
        total += share
        if a not in q:
            continue
        present += share
        terms.append((c, a))
    return _partial(_weighted(terms, q, v), present, total)


def _nominal_q(g: Any, name: str, depth: int = 0) -> float:
    """The q of ``name`` when everything before it is normalized: 1, or for a sum the shares of its terms
    (``normalize_sums`` writes a sum of three as ``(w·a + w·b) + w·c``: the inner sum's share is 2/3)."""
    d = g.nodes[name]
    if d["kind"] is not OpKind.ADD or depth > 8:
        return 1.0
    weights = d["info"].attrs.get("weights")
    if weights is None or any(w is None for w in weights):
        return 1.0
    return sum(float(w) ** 2 * _nominal_q(g, below_factors(g, a), depth + 1)
               for w, a in zip(weights, d["signal_operands"]))


def _partial(qv: tuple[float, float], present: float, total: float) -> tuple[float, float]:
    """A merge reached by only some of its operands: a subnetwork that starts inside the graph (a lone
    residual branch) runs on past its end into a merge with signals from outside it. Those values are
    never read, but the missing operands are taken alike to the present ones, so that q is not
    misreported downstream (``present``, ``total``: the present and all operands' nominal shares of q,
    ``w² ·`` the q each would have with everything before it normalized)."""
    if present <= 0 or present == total:
        return qv
    return qv[0] * total / present, qv[1]


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
    present = sum(n for n, a in zip(dims, d["signal_operands"]) if a in q)
    return _partial(_weighted([(n / total, a) for n, a in zip(dims, d["signal_operands"]) if a in q], q, v),
                    present / total, 1.0)


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
            return (f"{d['info'].describe()}: its kernel rule gives no map at q = 1 (it is measured, and the DKS "
                    f"targets use rules only; {NO_RULE_REMEDY})")
        if not np.allclose(out.c, _C_GRID, rtol=0.0, atol=1e-9):
            return (f"{d['info'].describe()}: its kernel rule changes the C map, and the DKS targets assume only "
                    f"activations do (register an elementwise activation with netsurgeon.register_activation)")
        return None

    def apply(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
              v: dict[str, float], act: ActRule) -> tuple[float, float]:
        out = evaluate(graph, node, d, [q[a] for a in ins])
        return (out.q if out is not None else q[ins[0]]), v[ins[0]]

    return IdealRule(apply, check)
