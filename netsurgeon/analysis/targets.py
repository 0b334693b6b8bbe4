"""Architecture-dependent DKS/TAT targets, derived from the traced graph (docs/theory.md §4.4–§4.5, §5).

DKS assumes unit q at every activation input, C-preserving linear layers (scaled
orthogonal weights, zero biases) and normalized sums. Under those assumptions a
scalar per node describes a subnetwork's kernel: its cumulative ``C'(1)``, its
cumulative ``C''(1)`` (when every local ``C'(1)`` is 1), or its C value for one
input cosine. :class:`IdealGraph` propagates such a scalar through the graph:

* activation: the caller's local rule (``ξ·v``, ``v + κ``, ``C(v)``);
* linear/conv, average pooling, reshapes: unchanged;
* per-example norms (layer/RMS/group, ``LocationNorm``): q becomes 1, value unchanged;
* constant scaling ``f·h``: q times f²;
* sums ``Σ w_i h_i``: ``q = Σ w_i² q_i``, value ``Σ w_i² q_i v_i / q``;
* concatenations: the same with the feature counts as weights;
* a module registered with ``netsurgeon.register_module_op``: the q of its kernel rule
  (which must keep c), value unchanged.

Each kind's rule (and the check that names a node the assumptions do not cover) is
registered with ``@ideal_rule`` (:mod:`.ideal_rules`); a kind without one is reported as a problem.

The subnetworks are the whole network (every output) and every lone residual branch
(from the block's entry to the branch's term in the sum). The maximal slope function
of DKS is then ``max over subnetworks`` of the propagated ``C'(1)``; no user writes it.

Example:
    >>> import torch.nn as nn, netsurgeon
    >>> g = IdealGraph(netsurgeon.topology(nn.Sequential(*[nn.Tanh() for _ in range(50)])))
    >>> round(g.solve_slope(1.5), 10)
    1.0081422716
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch.fx as fx

from .._validate import problem_list
from ..errors import UnsupportedNodeError
from ..graph import BlockKind, Topology
from ..kernels.bisection import bisect
from ..ops import OpKind
from .ideal_rules import NO_RULE, ActRule, IdealRule, below_factors, from_kernel_rule, ideal_rule
from .op_rules import composite_activation
from .propagate import affine_moments
from .rules import IDEAL_RULES, KERNEL_RULES
from .sums import correlated_sums

__all__ = ["ActRule", "IdealGraph", "IdealRule", "PRODUCT_MODES", "ProductMap", "Subnetwork", "gate_nodes", "glu_gates",
           "mapped_merges", "ideal_rule", "main_operand", "q_reference"]

# how dks/tat treat products of signals: maps from the analysis' rule (measured where the rule does not
# apply), measured maps, pass-throughs, or a refusal
PRODUCT_MODES = ("rule", "empirical", "neutral", "refuse")
PRODUCT_RESCALE_PREFIX = "ns_product_rescale"  # the buffers of the rescale dks/tat put after a product


@dataclass(frozen=True)
class ProductMap:
    """A product of signals' measured local map, relative to its main operand (:func:`main_operand`):
    ``q_ratio = q(product) / q(reference)`` (:func:`q_reference`: the main operand; for a sum of
    correlated terms the q its terms would give uncorrelated, ``Σ w_i² q(h_i)``, so a normalized sum
    nested in another keeps its share), ``slope`` its local ``C'(1)`` (a secant over the
    last measured cosine interval), and the C map as the pairs ``(c_in, c_out)``. The pass
    that uses it rescales the product by ``1 / sqrt(q_ratio)``, so q passes through."""

    q_ratio: float
    slope: float
    c_in: tuple[float, ...]
    c_out: tuple[float, ...]
    curvature: float = 0.0  # local C''(1), from a quadratic fit of the map near c = 1

    def c_map(self, c: float) -> float:
        """The product's cosine at main-operand cosine ``c``; a measured table can stray past ±1 by
        noise (nextvit: 1.0076), which no cosine can: clipped."""
        return float(np.clip(np.interp(c, self.c_in, self.c_out), -1.0, 1.0))

    def _asdict(self) -> dict:
        """Plain values (kept in the pass derivation); ``ProductMap(**d)`` rebuilds it."""
        return {"q_ratio": self.q_ratio, "slope": self.slope, "c_in": list(self.c_in), "c_out": list(self.c_out),
                "curvature": self.curvature}


def main_operand(topo: Topology, product: str) -> str:
    """The operand of a product that carries the signal: the one the other operands are computed
    from (``h`` in ``h * gate(h)`` or ``gate(h) * h``), the linear operand of a gated linear unit
    (``W₂x`` in ``φ(W₁x) * W₂x`` and ``W₂x * φ(W₁x)``: :func:`glu_gates`), else the first signal operand."""
    g = topo.graph
    ops = list(dict.fromkeys(g.nodes[product]["signal_operands"]))
    for a in ops:
        if all(b == a or a in nx.ancestors(g, b) for b in ops):
            return a
    glu = glu_gates(topo).get(product)
    if glu is not None:
        return glu[0]
    weights = [a for a in ops if _attention_weights(g, a)]
    if len(weights) == 1 and len(ops) == 2:  # ``softmax(q kᵀ) @ v`` not shaped (cross-attention): v carries it
        return next(a for a in ops if a != weights[0])
    return ops[0]


def _attention_weights(g: nx.DiGraph, name: str, depth: int = 4) -> bool:
    """Whether ``name`` is a softmax's output, through dropout, casts and reshapes."""
    for _ in range(depth):
        d = g.nodes[name]
        if d["info"].name == "softmax":
            return True
        if not d["kind"].traits.unchanged or len(d["signal_operands"]) != 1:
            return False
        name = d["signal_operands"][0]
    return False


# what may lie between a gated linear unit's shared input and its operands besides the one activation
_GLU_CHAIN = (OpKind.LINEAR, OpKind.CONV, OpKind.RESHAPE, OpKind.IDENTITY, OpKind.AFFINE)


def glu_gates(topo: Topology) -> dict[str, tuple[str, str]]:
    """``{product: (linear operand, gate activation)}`` for every gated linear unit ``φ(W₁x) ⊙ W₂x``
    (GLU, SwiGLU, GeGLU; ``x1 * φ(x2)`` after one projection split in two): an elementwise product of
    two signals that an independent weight separates (:func:`.sums.dependent_products` does not
    list it), each operand reached from their shared input by one chain of linear maps, reshapes and
    constant affines, and exactly one activation on one chain, none on the other. dks and tat reshape
    that activation as a gate (``transforms.solve_gate``); the linear operand carries the signal.
    Computed once per topology."""
    cache = topo.__dict__.setdefault("_netsurgeon_cache", {})
    if "glu_gates" not in cache:
        cache["glu_gates"] = _glu_gates(topo)
    return cache["glu_gates"]


def _glu_gates(topo: Topology) -> dict[str, tuple[str, str]]:
    from .products import ELEMENTWISE_PRODUCTS
    from .sums import dependent_products

    g = topo.graph
    dependent = dependent_products(topo)
    out: dict[str, tuple[str, str]] = {}
    for name, d in g.nodes(data=True):
        if d["kind"] is not OpKind.MULTIPLY or not d["signal"] or d["info"].name not in ELEMENTWISE_PRODUCTS \
                or name in dependent:
            continue
        ops = list(dict.fromkeys(d["signal_operands"]))
        if len(ops) != 2:
            continue
        chains = [_chain_to(g, ops[0], nx.ancestors(g, ops[1]) | {ops[1]}),
                  _chain_to(g, ops[1], nx.ancestors(g, ops[0]) | {ops[0]})]
        if any(c is None for c in chains):
            continue
        acts = [[n for n in c if g.nodes[n]["kind"] is OpKind.ACTIVATION] for c in chains]
        counts = sorted(len(a) for a in acts)
        if counts != [0, 1]:
            continue
        gate = 0 if acts[0] else 1
        out[name] = (ops[1 - gate], acts[gate][0])
    return out


def _chain_to(g: nx.DiGraph, start: str, stop: set[str]) -> list[str] | None:
    """The nodes from ``start`` up its single signal operands until one in ``stop`` (excluded); None
    when the chain branches, ends elsewhere, or passes a node that is neither an activation nor in
    ``_GLU_CHAIN``."""
    chain, name = [], start
    while name not in stop:
        d = g.nodes[name]
        ins = list(dict.fromkeys(d["signal_operands"]))
        if len(ins) != 1 or not (d["kind"] is OpKind.ACTIVATION or d["kind"] in _GLU_CHAIN):
            return None
        chain.append(name)
        name = ins[0]
    return chain


def q_reference(topo: Topology, merge: str) -> str:
    """The node whose q a mapped merge's rescale restores: its :func:`main_operand`, looked through
    constant factors for a sum (in ``w₁·a + w₂·pool(a)`` it is ``a``, at q = 1, not ``w₁·a``, at w₁²)."""
    name = main_operand(topo, merge)
    return below_factors(topo.graph, name) if topo.graph.nodes[merge]["kind"] is OpKind.ADD else name


def mapped_merges(topo: Topology) -> list[str]:
    """The nodes dks/tat follow by a map (:class:`ProductMap`) instead of a rule: products of
    signals, and sums of correlated terms (``pool(x) - x``, :mod:`.sums`), in graph order."""
    correlated = correlated_sums(topo)
    return [n for n, d in topo.graph.nodes(data=True) if d["signal"] and d["signal_operands"]
            and (d["kind"] is OpKind.MULTIPLY or n in correlated)]


def attention_values(topo: Topology) -> dict[str, str]:
    """``{attention node: its value operand}`` for the modules ``attention_shaping`` inserts: at
    initialization their output depends on the value only (the query-key logits are zero, or
    ``β = 0``), so the query and key paths are left out of the shaping like gate paths."""
    out = {}
    for node in topo.gm.graph.nodes:
        d = topo.graph.nodes.get(node.name)
        if d is not None and d["info"].attrs.get("attention") and len(node.args) > 2 \
                and isinstance(node.args[2], fx.Node):
            out[node.name] = node.args[2].name
    return out


def gate_nodes(topo: Topology) -> set[str]:
    """Signal nodes that reach an output only through a mapped merge's gate operands (every
    operand but :func:`main_operand`) or an inserted attention's query and key: the gate paths of
    squeeze-excite and similar blocks, and the logits' paths of shaped attention."""
    g = topo.graph
    cut = nx.DiGraph()
    cut.add_nodes_from(g.nodes)
    mains = {n: main_operand(topo, n) for n in mapped_merges(topo)}
    mains.update(attention_values(topo))
    for u, v in g.edges:
        if v in mains and u in g.nodes[v]["signal_operands"] and u != mains[v]:
            continue
        if not g.nodes[v]["signal"] and g.nodes[v]["kind"] is not OpKind.OUTPUT:
            continue  # a shape or dtype read: no values flow on
        cut.add_edge(u, v)
    alive: set[str] = set()
    for o in (n for n, d in g.nodes(data=True) if d["kind"] is OpKind.OUTPUT):
        alive |= nx.ancestors(cut, o) | {o}
    return {n for n, d in g.nodes(data=True) if d["signal"] and n not in alive}


@dataclass(frozen=True)
class Subnetwork:
    """Where a subnetwork starts (``sources``, at q = 1) and the nodes it is read at."""

    name: str
    sources: tuple[str, ...]
    sinks: tuple[str, ...]


class IdealGraph:
    """The graph under the DKS assumptions, ready to propagate per-node scalars.

    Args:
        topo: the topology view (with shapes when the graph concatenates).
        products: one of :data:`PRODUCT_MODES`: ``"refuse"`` (products of signals are an error),
            ``"neutral"`` (a product passes its main operand through; approximate), or ``"rule"`` /
            ``"empirical"`` (a product follows its :class:`ProductMap`, from the analysis or measured,
            a pass-through until one is given; the nodes on its gate paths are left out of the shaping).
        product_maps: ``{product node: ProductMap}`` for ``"rule"`` and ``"empirical"``.

    Attributes:
        problems: ``(node, reason)`` for every node the assumptions cannot cover.
        activations: the activation nodes, in graph order (norm+activation composites included).
    """

    def __init__(self, topo: Topology, products: str = "refuse",
                 product_maps: dict[str, ProductMap] | None = None) -> None:
        self.topo = topo
        self.products = products
        self.product_maps = dict(product_maps or {})
        self.gates = gate_nodes(topo) if products in ("rule", "empirical") or attention_values(topo) else set()
        # gated linear units whose gate dks/tat reshape: the unit counts as one activation (C'(1) = ξ, C''(1) = κ)
        self.glu = {p: v for p, v in glu_gates(topo).items() if p not in self.gates} \
            if products in ("rule", "empirical") else {}
        self.order = [n for n in topo.gm.graph.nodes if (topo.graph.nodes[n.name]["signal"]
                      or topo.graph.nodes[n.name]["kind"] is OpKind.OUTPUT) and n.name not in self.gates]
        self.problems: list[tuple[str, str]] = []
        self.correlated = correlated_sums(topo)
        self.activations = [n.name for n in self.order if topo.graph.nodes[n.name]["kind"] is OpKind.ACTIVATION
                            or composite_activation(topo.graph.nodes[n.name]["info"]) is not None]
        self.rules = {n.name: self._rule_for(n) for n in self.order}
        self._check()

    # ------------------------------------------------------------------ structure
    def _rule_for(self, node: fx.Node) -> "IdealRule":
        """The node's rule: its module type's (an ideal rule, or one derived from its kernel
        rule), else its kind's."""
        module = self.topo.gm.get_submodule(node.target) if node.op == "call_module" else None
        info = self.topo.graph.nodes[node.name]["info"]
        rule = IDEAL_RULES.for_op(info, module)
        if rule is None and KERNEL_RULES.for_op(info, module) is not None:
            rule = from_kernel_rule(KERNEL_RULES.for_op(info, module))
        if rule is None:
            rule = IDEAL_RULES.for_kind(self.topo.graph.nodes[node.name]["kind"])
        return rule if rule is not None else NO_RULE

    def _check(self) -> None:
        """Collect the nodes that break the assumptions (with the remedy in the reason)."""
        for node in self.order:
            rule = self.rules[node.name]
            reason = None if rule.check is None else rule.check(self, node, self.topo.graph.nodes[node.name])
            if reason is not None:
                self.problems.append((node.name, reason))

    def raise_problems(self, what: str) -> None:
        """Raise :class:`UnsupportedNodeError` if there are problem nodes: one line naming the first
        few by reason, every node in ``nodes`` and one ``"node: reason"`` line each in ``details``."""
        if self.problems:
            raise UnsupportedNodeError(f"{what} cannot handle {len(self.problems)} node(s): "
                                       f"{problem_list(self.problems)}",
                                       nodes=[n for n, _ in self.problems],
                                       details=[f"{n}: {r}" for n, r in self.problems])

    def subnetworks(self) -> list[Subnetwork]:
        """The whole network (every output) and every lone residual branch."""
        g = self.topo.graph
        inputs = tuple(n for n, d in g.nodes(data=True) if d["kind"] is OpKind.INPUT and d["signal"])
        outputs = tuple(a for n, d in g.nodes(data=True) if d["kind"] is OpKind.OUTPUT for a in d["signal_operands"])
        subs = [Subnetwork("network", inputs, outputs)]
        for b in self.topo.blocks:
            if b.kind is BlockKind.RESIDUAL and b.entry is not None:
                subs.append(Subnetwork(f"residual branch of {b.merge}", (b.entry,), tuple(b.operands[1:])))
        return subs

    # ------------------------------------------------------------------ propagation
    def propagate(self, sub: Subnetwork, act: ActRule, source_value: float,
                  product: ActRule | None = None) -> dict[str, float]:
        """The value at each sink of ``sub``; sources start at q = 1 and ``source_value``.
        ``product(node, value)`` maps the value through a product that has a measured map
        (default: unchanged).

        Raises:
            UnsupportedNodeError: an activation whose input q is not 1 (an un-normalized sum).
        """
        q: dict[str, float] = {s: 1.0 for s in sub.sources}
        v: dict[str, float] = {s: source_value for s in sub.sources}
        g = self.topo.graph
        for node in self.order:
            name = node.name
            if name in q:
                continue
            d = g.nodes[name]
            ins = [a for a in d["signal_operands"] if a in q]
            if not ins:
                continue
            if name in self.product_maps or name in self.glu:
                first, ref = main_operand(self.topo, name), q_reference(self.topo, name)
                if first not in q or ref not in q:
                    continue
                # the pass rescales the merge by 1 / sqrt(q_ratio): q returns to its reference's once the
                # rescale follows it (after the pass) or will follow it (while the pass derives its targets);
                # a correlated sum's reference is the q its terms would give uncorrelated (sum_terms)
                target = q[ref]
                if d["kind"] is OpKind.ADD:  # the sum rule (uncorrelated terms; a lone branch's missing ones taken alike)
                    target = self.rules[name].apply(self, node, d, ins, q, v, act)[0]
                rescaled = name in self.product_maps and self._rescaled(name)
                q[name] = target * (self.product_maps[name].q_ratio if rescaled else 1.0)
                v[name] = product(name, v[first]) if product is not None else v[first]
                continue
            q[name], v[name] = self.rules[name].apply(self, node, d, ins, q, v, act)
        return {s: v[s] for s in sub.sinks if s in v}

    def _rescaled(self, product: str) -> bool:
        """Whether a dks/tat product rescale (a constant ``ns_product_rescale_*`` factor) follows ``product``."""
        for user in self.topo.graph.successors(product):
            for p in self.topo.graph.predecessors(user):
                if str(self.topo.graph.nodes[p].get("target", "")).startswith(PRODUCT_RESCALE_PREFIX):
                    return True
        return False

    def affine_moments(self, node: fx.Node) -> tuple[float, float] | None:
        """``(E s², E t²)`` of a per-channel constant scale and shift (see ``propagate.affine_moments``),
        read once per node (the targets' bisection asks many times)."""
        cache = self.__dict__.setdefault("_affine_moments", {})
        if node.name not in cache:
            cache[node.name] = affine_moments(self.topo.gm, node, lambda a: self.topo.graph.nodes[a.name]["signal"])
        return cache[node.name]

    # ------------------------------------------------------------------ DKS/TAT targets
    def max_over_subnetworks(self, act: ActRule, source_value: float,
                             product: ActRule | None = None) -> tuple[float, str]:
        """The largest sink value over all subnetworks, and the subnetwork's name."""
        best, where = -float("inf"), ""
        for sub in self.subnetworks():
            for sink, value in self.propagate(sub, act, source_value, product).items():
                if value > best:
                    best, where = value, f"{sub.name} (at {sink})"
        return best, where

    def product_slope(self, name: str, xi: float) -> float:
        """A product's local ``C'(1)``: ``ξ`` for a gated linear unit (its gate is solved for it), else
        its map's (1 until it has one)."""
        if name in self.glu:
            return xi
        return self.product_maps[name].slope if name in self.product_maps else 1.0

    def product_c_map(self, name: str, c: float) -> float:
        """A product's cosine at its main operand's cosine ``c``: its map's, or ``c`` until it has one."""
        return self.product_maps[name].c_map(c) if name in self.product_maps else c

    def max_slope(self, xi: float) -> float:
        """The maximal slope function: ``max_f C'_f(1)`` when every activation (and gated unit) has ``C'(1) = ξ``."""
        return self.max_over_subnetworks(lambda _n, v: xi * v, 1.0,
                                         lambda n, v: self.product_slope(n, xi) * v)[0]

    def solve_slope(self, zeta: float) -> float:
        """The local ``ξ`` with ``max_f C'_f(1) = ζ``, by bisection (the function increases with ξ).

        Raises:
            UnsupportedNodeError: no activation on any path (nothing to shape), or ``ζ <= 1``.
        """
        if not zeta > 1.0:
            raise UnsupportedNodeError(f"zeta must exceed 1, got {zeta!r}")
        if not (self.activations or self.glu) or self.max_slope(zeta / min(1.0, self._min_product_slope())) < zeta:
            # without products, slope ξ^k with k >= 1 reaches ζ by ξ = ζ; measured products scale it
            raise UnsupportedNodeError("no activation lies on a path from an input to an output: nothing to shape")
        if self.max_slope(1.0) > zeta:
            floor, where = self.max_over_subnetworks(lambda _n, v: v, 1.0,
                                                     lambda n, v: self.product_slope(n, 1.0) * v)
            steep = sorted((n for n, pm in self.product_maps.items() if pm.slope > 1.0),
                           key=lambda n: -self.product_maps[n].slope)
            names = ", ".join(f"{n} ({self.product_maps[n].slope:.4g})" for n in steep[:5]) + \
                (f" and {len(steep) - 5} more" if len(steep) > 5 else "")
            raise UnsupportedNodeError(f"zeta = {zeta} is unreachable: the measured products alone give "
                                       f"max C'_f(1) = {floor:.6g} with linear activations (ξ = 1), in the "
                                       f"{where}; products with a local C'(1) above 1: {names or 'none'}; use "
                                       f"zeta > {math.ceil(floor * 1e4) / 1e4:g}", nodes=steep)
        return bisect(lambda xi: self.max_slope(xi) < zeta, 1.0, zeta / min(1.0, self._min_product_slope()),
                      tol=1e-15)

    def _min_product_slope(self) -> float:
        slopes = [pm.slope for n, pm in self.product_maps.items() if pm.slope > 0 and n not in self.glu]
        return min(slopes) ** max(1, len(slopes)) if slopes else 1.0

    def max_curvature_count(self) -> tuple[float, str]:
        """``max_f C''_f(1)`` when every activation (and gated unit) has ``C'(1) = 1`` and ``C''(1) = 1``
        (TAT's κ = τ / this); other products add their map's curvature."""
        def product(n: str, v: float) -> float:
            if n in self.glu:
                return v + 1.0
            pm = self.product_maps.get(n)
            return v if pm is None else pm.slope * v + pm.curvature
        return self.max_over_subnetworks(lambda _n, v: v + 1.0, 0.0, product)

    def network_c0(self, c_map: ActRule) -> float:
        """The whole network's ``C_f(0)`` (largest over its outputs) with each activation's C map."""
        values = self.propagate(self.subnetworks()[0], c_map, 0.0, self.product_c_map)
        return max(values.values()) if values else 0.0
