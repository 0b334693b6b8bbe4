"""``dks`` and ``tat``: activation transforms with targets derived from the graph.

Every activation node becomes a :class:`~netsurgeon.layers.ShapedActivation`
``γ (φ(α x + β) + δ)`` (docs/theory.md §4–§5). The architecture enters only through
:class:`~netsurgeon.analysis.targets.IdealGraph`:

* ``dks``: the local ``C'(1)`` target ``ξ`` solves ``max over subnetworks C'_f(1) = ζ``;
  each activation type then gets ``(α, β, γ, δ)`` with ``Q(1) = 1``, ``Q'(1) = 1``,
  ``C(0) = 0``, ``C'(1) = ξ``.
* ``tat``: the leaky-ReLU family (ReLU, leaky ReLU, PReLU: the activation registry's
  ``leaky_slope`` trait) become ``sqrt(2/(1+a²)) · leaky_relu(x, a)`` with ``a`` chosen so
  the network's ``C_f(0) = η``; other activations get ``Q(1) = Q'(1) = C'(1) = 1`` and
  ``C''(1) = κ`` with ``κ = τ / max over subnetworks of the activation count``
  (curvature adds along chains, sums weight it by ``w_i²``).

Products of signals (squeeze-excite and other gates) follow their maps: by default
(``products="rule"``) from the independence rule of docs/theory.md §3.8, see
:mod:`._empirical`; the activations on a gate path keep their form, except the gate of a
gated linear unit ``ψ(W₁x) ⊙ W₂x`` (SwiGLU, GeGLU: ``targets.glu_gates``), solved as a gate
(``transforms.solve_gate``: ``Q'(1) = 0``, and the unit's ``C'(1) = ξ`` or ``C''(1) = κ``; the
unit counts as one activation in the targets, docs/theory.md §4.9). Both refuse, naming the
nodes: batch norm (run ``strip_bn``), max pooling (run ``maxpool_to_avgpool``),
un-normalized sums (run ``normalize_sums``). The transforms assume the other DKS
conditions too (``input_norm``, ``orthogonal_init``); ``netsurgeon.analyze`` checks
them on the result.

A functional call site (``F.gelu(x)``, ``torch.abs(x)``) is rebuilt as the module the
activation registry names (``netsurgeon.ops.activation_module``).

The derivation (ζ, ξ, the maximizing subnetwork, the constants) is kept on the module
(read it with ``netsurgeon.derivation(gm, "dks")``) and written to the report.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, Callable, Literal

import torch
import torch.fx as fx
import torch.nn as nn

from ..analysis.op_rules import composite_activation
from ..analysis.targets import IdealGraph, ProductMap, gate_nodes, mapped_merges
from ..analysis.token_kernels import describe_fit, fit_shaped_attention
from .._validate import short_list
from ..errors import InvalidArgumentError, NetsurgeonError, UnsupportedNodeError
from ..graph import Topology
from ..graph.state import default_inputs, derivation, nodes_by_name, set_derivation
from ..kernels import LocalMaps, activation_entry, get_activation
from ..kernels.bisection import bisect
from ..kernels.transforms import (Transform, TransformError, solve_dks, solve_dks_leaky, solve_gate, solve_tat,
                                  transformed, trelu_c_map, trelu_gain)
from ..layers import ShapedActivation, ShapedAttention
from ..ops import ActivationSpec, OpKind, PoolType, activation_module, pool_type
from ..report import PassRecord, Preservation
from ._edit import set_submodule
from ._empirical import ITERATIONS, insert_rescales, iterate_product_maps
from .base import Pass, register_pass

__all__ = ["DKS", "TAT"]

@dataclasses.dataclass
class _Site:
    """One activation node and the spec of its φ."""

    node: fx.Node
    spec: ActivationSpec
    rebuild: bool = False  # build φ from ``spec`` instead of reusing the node's module (ReLU -> TReLU)
    composite: bool = False  # a norm+activation composite: φ is its module's ``.act``
    gate: bool = False  # the gate of a gated linear unit (``targets.glu_gates``): solved by ``solve_gate``


def _topology(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...] | None) -> Topology:
    """The view, with shapes when the graph concatenates (they weight the sums) or shifts by
    constants that may be computed from shapes (``wpe(arange(x.shape[1]))``)."""
    topo = Topology(gm)
    counts = topo.kind_counts()
    if counts.get("concat") or counts.get("affine"):
        example_inputs = example_inputs if example_inputs is not None else default_inputs(gm)
        if example_inputs is not None:
            topo = Topology(gm, example_inputs)
    return topo


def _sites(gm: fx.GraphModule, topo: Topology, ideal: IdealGraph) -> list[_Site]:
    """The activation nodes to reshape (identity activations are left alone), gated units' gates last."""
    out = []
    gates = {act for _, act in ideal.glu.values()}
    for name in [*ideal.activations, *sorted(gates)]:
        info = topo.info(name)
        composite = composite_activation(info)
        spec = info.activation if composite is None else composite
        if spec is None or spec.name == "identity" or (name in gates and composite is not None):
            continue
        if spec.transform is not None:
            raise UnsupportedNodeError(f"activation {name} is already reshaped ({spec}); apply dks/tat once, to the "
                                       f"original model", nodes=[name])
        if any(isinstance(v, tuple) for _, v in spec.params):
            raise UnsupportedNodeError(f"activation {name} ({spec.name}) has per-channel parameters; no single "
                                       f"kernel map exists", nodes=[name])
        out.append(_Site(_node(gm, name), spec, composite=composite is not None, gate=name in gates))
    return out


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _base_module(gm: fx.GraphModule, site: _Site) -> nn.Module:
    """φ as a module: the node's own module (copied), or one built from the spec."""
    node = site.node
    if node.op == "call_module" and not site.rebuild:
        module = gm.get_submodule(node.target)
        return copy.deepcopy(module.act if site.composite else module)
    try:
        return activation_module(site.spec)
    except InvalidArgumentError as exc:
        raise UnsupportedNodeError(f"activation {node.name} ({site.spec}): netsurgeon has no module for "
                                   f"{site.spec.name} to reshape it ({exc})", nodes=[node.name]) from None


def _install(gm: fx.GraphModule, sites: list[_Site], constants: dict[ActivationSpec, Transform],
             record: PassRecord, gate_constants: dict[ActivationSpec, Transform] | None = None) -> None:
    """Replace every site by a ShapedActivation; module call sites keep their path (a module called
    both as a gate and elsewhere gets a new module at its gate calls)."""
    done: dict[str, ShapedActivation] = {}
    roles = {}
    for site in sites:
        if site.node.op == "call_module" and not site.composite:
            roles.setdefault(site.node.target, set()).add(site.gate)
    for i, site in enumerate(sites):
        node, t = site.node, (gate_constants if site.gate else constants)[site.spec]
        shared = node.op == "call_module" and len(roles.get(node.target, ())) > 1 and site.gate
        if site.composite or (node.op == "call_module" and not site.rebuild and not shared):
            path = f"{node.target}.act" if site.composite else node.target  # a composite keeps its call, new .act
            if path not in done:
                done[path] = ShapedActivation(_base_module(gm, site), *t)
                set_submodule(gm, path, done[path])
        else:
            path = f"ns_shaped_act_{i}"
            while hasattr(gm, path):
                path += "_"
            gm.add_module(path, ShapedActivation(_base_module(gm, site), *t))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(path, (node.args[0],))
            new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        record.change(node.name, f"{site.spec} -> {t.gamma:.6g}*(φ({t.alpha:.6g}*x{t.beta:+.6g}){t.delta:+.6g})"
                      + (" (gate of a gated linear unit: Q'(1) = 0)" if site.gate else ""), f"module {path}")


def _prepare(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...] | None, products: str,
             what: str, maps: dict[str, ProductMap] | None = None) -> tuple[IdealGraph, list[_Site]]:
    topo = _topology(gm, example_inputs)
    ideal = IdealGraph(topo, products, maps)
    ideal.raise_problems(what)
    sites = _sites(gm, topo, ideal)
    if not sites:
        gated = [n for n in topo.nodes_of(OpKind.ACTIVATION) if n in ideal.gates]
        if gated:  # gmixer's GluMlp: x1 * act(x2) is its only nonlinearity
            raise UnsupportedNodeError(
                f"{what}: the model's only activations ({short_list(gated)}) are on the gate paths of products, "
                f"which keep their form (docs/theory.md §3.8): nothing to reshape; its C map is set by the gates "
                f"alone (leave {what} out, or add an activation outside the gates)", nodes=gated)
        raise UnsupportedNodeError(f"{what}: the model has no activation to reshape")
    if products == "neutral":
        neutral = [n for n in topo.graph if topo.graph.nodes[n]["kind"] is OpKind.MULTIPLY
                   and topo.graph.nodes[n]["signal"]]
        if neutral:
            warnings.warn(f"{what}: {len(neutral)} product(s) of signals treated as pass-throughs "
                          f"(approximate targets; gates such as squeeze-excite can shrink q far below 1, "
                          f"check with netsurgeon.analyze): {', '.join(neutral[:5])}", stacklevel=3)
    return ideal, sites


def _fit_attention(gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None) -> None:
    """Shaped attention rows refitted to the token kernels the reshaped MLPs now give them."""
    if not any(isinstance(m, ShapedAttention) for m in gm.modules()):
        return
    inputs = example_inputs if example_inputs is not None else default_inputs(gm)
    if inputs is None:
        record.note("shaped attention rows not refitted to the reshaped MLPs: no example inputs")
        return
    gm.recompile()
    try:
        record.note(describe_fit(fit_shaped_attention(gm, inputs)))
    except NetsurgeonError as e:  # tokens folded into the batch (NoTokenAxisError) and the like
        record.note(f"shaped attention rows not refitted (the patterns stay as built): {str(e).splitlines()[0]}")


class _Shaping(Pass):
    """What dks and tat share: ``products="rule"`` (default) or ``"empirical"`` iterates product maps."""

    products: str

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        _neutralize_factors(gm, record)
        products = mapped_merges(Topology(gm))
        if self.products not in ("rule", "empirical") or not products:
            self._shape(gm, record, example_inputs, None)
            _fit_attention(gm, record, example_inputs)
            return gm
        maps = iterate_product_maps(gm, example_inputs, lambda g, r, m: self._shape(g, r, example_inputs, m),
                                    self.products)
        self._shape(gm, record, example_inputs, maps)
        gates = sorted(gate_nodes(Topology(gm)) & set(nodes_by_name(gm)))
        how = ("from the independence rule (docs/theory.md §3.8; measured where it does not apply)"
               if self.products == "rule" else "measured")
        record.note(f"products={self.products!r}: {len(maps)} product map(s) {how} on the shaped network "
                    f"({ITERATIONS} rounds); activations on gate paths left as they are (a gate keeps its "
                    f"own activation, whose mean carries the signal through the product): "
                    f"{', '.join(gates[:8]) or 'none'}{' ...' if len(gates) > 8 else ''}")
        derivation(gm, self.name)["product_maps"] = {k: v._asdict() for k, v in maps.items()}
        _fit_attention(gm, record, example_inputs)
        return gm

    def _finish(self, gm: fx.GraphModule, record: PassRecord, maps: dict[str, ProductMap] | None) -> None:
        if maps:
            insert_rescales(gm, maps, record)


@register_pass
@dataclasses.dataclass
class DKS(_Shaping):
    """Deep Kernel Shaping (docs/theory.md §4) with the maximal slope function derived from the graph.

    Options:
        zeta: the global target ``max over subnetworks C'_f(1)``. Default: 1.5.
        products: how products of signals (squeeze-excite, gated units) are handled: ``"rule"``
            (default: their maps from the independence rule of docs/theory.md §3.8, measured where
            it does not apply), ``"empirical"`` (all measured; needs example inputs or a timm
            model), ``"neutral"`` (pass-throughs) or ``"refuse"``; see
            :mod:`netsurgeon.passes._empirical`.
    """

    name = "dks"
    summary = "Deep Kernel Shaping: γ(φ(αx+β)+δ) at every activation, ξ derived from the graph (zeta=1.5)"
    preserves = Preservation.NONE

    zeta: float = 1.5
    products: Literal["rule", "empirical", "neutral", "refuse"] = "rule"

    def validate(self) -> None:
        super().validate()
        self._require("zeta", 1.0 < self.zeta < math.inf, "exceed 1 and be finite")

    def _shape(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None,
               maps: dict[str, ProductMap] | None) -> None:
        ideal, sites = _prepare(gm, example_inputs, self.products, "dks", maps)
        xi = ideal.solve_slope(float(self.zeta))
        _, where = ideal.max_over_subnetworks(lambda _n, v: xi * v, 1.0, lambda n, v: ideal.product_slope(n, xi) * v)
        constants: dict[ActivationSpec, Transform] = {}
        sites, gate_constants = _solve_gates(sites, lambda act: solve_gate(act, c_slope=xi - 1.0), "dks", record)
        for site in sites:
            if not site.gate:
                _solve_dks_site(site, xi, constants)
        q_slopes = {str(s): LocalMaps(transformed(_activation(s), *constants[s])).q_slope_1() for s in constants}
        # ReLU (no slope to solve) and other positively homogeneous activations (StarReLU) cannot reach it
        missed = {k: v for k, v in q_slopes.items() if abs(v - 1.0) > 1e-6}
        if missed:
            msg = (f"dks on {', '.join(sorted(missed))}: a positively homogeneous activation (the ReLU family with "
                   f"its negative slope fixed, StarReLU) cannot reach Q'(1) = 1 (achieved "
                   + ", ".join(f"{k}: {v:.4f}" for k, v in missed.items())
                   + "); prefer the tat pass (TReLU), a leaky ReLU (dks solves its negative slope) or a smooth "
                     "activation")
            warnings.warn(msg, stacklevel=2)
            record.note(msg)
        _install(gm, sites, constants, record, gate_constants)
        record.note(f"zeta = {self.zeta}: local C'(1) target xi = {xi:.10f}, reached by {where}; "
                    f"{len(ideal.subnetworks())} subnetworks considered")
        set_derivation(gm, "dks", {"zeta": float(self.zeta), "xi": xi, "argmax": where,
                           "constants": {str(k): v._asdict() for k, v in constants.items()},
                           "gate_constants": {str(k): v._asdict() for k, v in gate_constants.items()}})
        self._finish(gm, record, maps)


@register_pass
@dataclasses.dataclass
class TAT(_Shaping):
    """Tailored Activation Transformation (docs/theory.md §5).

    Options:
        eta: target network ``C_f(0)`` for the leaky-ReLU family (TReLU). Default: 0.9.
        tau: target maximal ``C''_f(1)`` over subnetworks for smooth activations. Default: 0.3.
        products: ``"rule"`` (default), ``"empirical"``, ``"neutral"`` or ``"refuse"`` (as for ``dks``).
        unreachable: what to do when even ``a = 0`` (the most nonlinear TReLU, plain ReLU up to
            its gain) gives a network ``C_f(0)`` below ``eta`` (a shallow network, or many
            shortcuts): ``"closest"`` uses ``a = 0``, the closest reachable value, with a warning
            and a report note giving it; ``"refuse"`` refuses. Default: ``"closest"``.
    """

    name = "tat"
    summary = "TAT: TReLU with network C(0)=eta (0.9), smooth activations with max C''(1)=tau (0.3)"
    preserves = Preservation.NONE

    eta: float = 0.9
    tau: float = 0.3
    products: Literal["rule", "empirical", "neutral", "refuse"] = "rule"
    unreachable: Literal["closest", "refuse"] = "closest"

    def validate(self) -> None:
        super().validate()
        self._require("eta", 0.0 < self.eta < 1.0, "lie in (0, 1)")
        self._require("tau", 0.0 < self.tau < math.inf, "be positive and finite")

    def _shape(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None,
               maps: dict[str, ProductMap] | None) -> None:
        ideal, sites = _prepare(gm, example_inputs, self.products, "tat", maps)
        constants: dict[ActivationSpec, Transform] = {}
        derivation: dict[str, Any] = {"eta": float(self.eta), "tau": float(self.tau)}
        gate_constants: dict[ActivationSpec, Transform] = {}
        smooth = [s for s in sites if not _leaky(s.spec) and not s.gate]
        leaky = [s for s in sites if _leaky(s.spec) and not s.gate]
        if not smooth:
            record.note(f"tau = {self.tau} unused: no smooth activation to shape (the leaky-ReLU family uses eta)")
        if not leaky:
            record.note(f"eta = {self.eta} unused: no activation of the leaky-ReLU family (smooth ones use tau)")
        if smooth or any(s.gate for s in sites):
            count, where = ideal.max_curvature_count()
            if not count > _MIN_CURVATURE_COUNT:  # the activations' curvature does not reach an output
                names = short_list([s.node.name for s in sites if s in smooth or s.gate])
                raise UnsupportedNodeError(
                    f"tat: the activations {names} carry almost no curvature to any output (max C''_f(1) = "
                    f"{count:.3g} with C''(1) = 1 at each): their signal is scaled away or bypassed on the way "
                    f"(a near-zero scale, a product that passes only its other operand); set such scales to 1, or "
                    f"leave tat out", nodes=[s.node.name for s in sites if s in smooth or s.gate])
            kappa = float(self.tau) / count
            sites, gate_constants = _solve_gates(sites, lambda act: solve_gate(act, unit_curvature=kappa), "tat",
                                                 record)
            for site in smooth:
                if site.spec not in constants:
                    constants[site.spec] = _solve(site, lambda act: solve_tat(act, kappa), "tat")
            derivation.update(kappa=kappa, curvature_argmax=where)
            record.note(f"tau = {self.tau}: local C''(1) target kappa = {kappa:.10g} (tau / {count:g}, reached by "
                        f"{where})")
        if leaky:
            c_maps = {s.node.name: LocalMaps(transformed(_activation(s.spec), *constants[s.spec])).c_map
                      for s in smooth}
            leaky_names = {s.node.name for s in leaky}
            a, reached = _solve_trelu(ideal, leaky_names, c_maps, float(self.eta), self.unreachable == "refuse")
            if reached is not None:
                why = ("a = 0 (ReLU) gives", "too shallow or too many shortcuts") if a == 0.0 else \
                    ("a = 1 (linear) gives", "pooling or gates alone correlate the outputs")
                msg = (f"tat: eta = {self.eta} is unreachable: even {why[0]} the network C_f(0) = "
                       f"{reached:.6f} ({why[1]}); a = {a:g}, the closest, is used "
                       f"(unreachable='refuse' refuses instead)")
                warnings.warn(msg, stacklevel=2)
                record.note(msg)
                derivation.update(eta_reached=reached)
            for site in leaky:  # TReLU = sqrt(2/(1+a²)) · leaky_relu(x, a): the base becomes LeakyReLU(a)
                site.spec = ActivationSpec("leaky_relu", (("negative_slope", a),))
                site.rebuild = True
                constants[site.spec] = Transform(1.0, 0.0, trelu_gain(a), 0.0)
            derivation.update(negative_slope=a)
            if reached is None:
                record.note(f"eta = {self.eta}: TReLU negative slope a = {a:.10f} gives the network C_f(0) = "
                            f"{self.eta}")
        _install(gm, sites, constants, record, gate_constants)
        derivation["constants"] = {str(k): v._asdict() for k, v in constants.items()}
        derivation["gate_constants"] = {str(k): v._asdict() for k, v in gate_constants.items()}
        set_derivation(gm, "tat", derivation)
        self._finish(gm, record, maps)


def _solve_gates(sites: list[_Site], solver: Callable[[Any], Transform], what: str, record: PassRecord
                 ) -> tuple[list[_Site], dict[ActivationSpec, Transform]]:
    """Gate constants (``transforms.solve_gate``) per gate activation type; a gate that cannot take
    them (tat's curvature condition on a ReLU gate, whose C''(1) is infinite) keeps its form, named
    in a warning and the report. Returns the sites still to install and the constants."""
    constants: dict[ActivationSpec, Transform] = {}
    kept: list[str] = []
    reasons: dict[str, str] = {}
    out = []
    for site in sites:
        if site.gate and site.spec not in constants:
            try:
                constants[site.spec] = solver(_activation(site.spec))
            except (TransformError, ValueError) as exc:
                reasons[str(site.spec)] = str(exc).splitlines()[0]
        if site.gate and site.spec not in constants:
            kept.append(site.node.name)
            continue
        out.append(site)
    if kept:
        msg = (f"{what}: {len(kept)} gate(s) of gated linear units keep their form ({short_list(kept)}): "
               + "; ".join(f"{k}: {v}" for k, v in reasons.items())
               + " (their products follow measured maps; a smooth gate such as silu or gelu can be shaped)")
        warnings.warn(msg, stacklevel=3)
        record.note(msg)
    return out, constants


def _neutralize_factors(gm: fx.GraphModule, record: PassRecord) -> None:
    """Set every bare constant factor on the signal path (``h * 0.2``, ``2.0 * h``, ``h / 1.7``:
    NF-Net's alpha, beta and gains) to its sign. Such a factor only rescales q, and the shaping
    sets q = 1 at every activation itself (docs/theory.md §4.7). Left alone: a sum's term weights
    (``normalize_sums`` sets those), factors on gate paths (part of the gate), and factors that
    feed a product of signals (attention's ``1/sqrt(d)``, written-out activations)."""
    topo = Topology(gm)
    g = topo.graph
    gates = gate_nodes(topo)

    def feeds(name: str, kinds: tuple[OpKind, ...]) -> bool:  # through pass-throughs
        for user in g.successors(name):
            kind = g.nodes[user]["kind"]
            if kind in kinds or (kind.traits.unchanged and kind is not OpKind.OUTPUT and feeds(user, kinds)):
                return True
        return False

    changed = False
    for node in list(gm.graph.nodes):
        d = g.nodes.get(node.name)
        if d is None or d["kind"] is not OpKind.AFFINE or not d["signal"] or node.name in gates:
            continue
        factor = d["info"].constant_factor
        if factor is None or not math.isfinite(factor) or abs(factor) in (0.0, 1.0) \
                or feeds(node.name, (OpKind.ADD, OpKind.MULTIPLY)) or any(_weights_a_sum(g, a)
                                                                        for a in d["signal_operands"]):
            continue
        node.args = tuple(math.copysign(1.0, a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a
                          for a in node.args)
        record.change(node.name, f"constant factor {factor:.6g} set to {math.copysign(1.0, factor):g}",
                      "it only rescales q, which the shaping sets to 1 at every activation")
        changed = True
    if changed:
        gm.recompile()


def _weights_a_sum(g: Any, name: str) -> bool:
    """A factor applied to a sum (``normalize_sums``' ``1/sqrt(n)`` after a sum over stacked paths)
    is that sum's weight."""
    d = g.nodes[name]
    return d["kind"] is OpKind.ADD or (d["kind"] is OpKind.POOL and pool_type(d["info"]) is PoolType.SUM)


def _activation(spec: ActivationSpec) -> Any:
    return get_activation(spec.name, **dict(spec.params))  # an alias (prelu) builds its target


def _leaky(spec: ActivationSpec) -> bool:
    """Of the leaky-ReLU family (its registry entry has a ``leaky_slope``): TAT makes it a TReLU."""
    entry = activation_entry(spec.name)
    return entry is not None and entry.leaky_slope is not None


def _solve(site: _Site, solver: Callable[[Any], Any], what: str) -> Any:
    try:
        return solver(_activation(site.spec))
    except (TransformError, ValueError) as exc:
        raise UnsupportedNodeError(f"{what}: activation {site.node.name} ({site.spec}): {exc}",
                                   nodes=[site.node.name]) from None


def _solve_dks_site(site: _Site, xi: float, constants: dict[ActivationSpec, Transform]) -> None:
    """DKS constants for one site into ``constants``. A leaky ReLU whose slope is a parameter
    (leaky_relu, prelu, RReLU's mean) gets its negative slope solved with them, as in DeepMind dks
    (``solve_dks_leaky``: every condition met, docs/theory.md §4.2), and is rebuilt with it; ReLU
    keeps its slope 0 and misses Q'(1) = 1 (the pass warns)."""
    entry = activation_entry(site.spec.name)
    slope = entry.leaky_slope if entry is not None else None
    if isinstance(slope, str):
        a, t = _solve(site, lambda _act: solve_dks_leaky(xi), "dks")
        site.spec = ActivationSpec(site.spec.name, tuple({**dict(site.spec.params), slope: a}.items()))
        site.rebuild = True
        constants[site.spec] = t
    elif site.spec not in constants:
        constants[site.spec] = _solve(site, lambda act: solve_dks(act, xi), "dks")


_MIN_CURVATURE_COUNT = 1e-6  # below it, κ = τ / count asks an activation for a curvature no transform gives


def _solve_trelu(ideal: IdealGraph, leaky: set[str], c_maps: dict[str, Callable[[float], float]],
                 eta: float, refuse: bool = True) -> tuple[float, float | None]:
    """The negative slope ``a`` with network ``C_f(0) = η``, by bisection (C_f(0) falls as a grows),
    and None; or, when η is above what ``a = 0`` reaches (below what ``a = 1`` reaches) and ``refuse``
    is False, ``(0, that value)`` (``(1, that value)``).

    Raises:
        UnsupportedNodeError: η is out of reach of a in [0, 1] and ``refuse``; names the closest value.
    """
    def c0(a: float) -> float:
        def rule(node: str, c: float) -> float:
            if node in leaky:
                return float(trelu_c_map(a, c))
            return float(c_maps[node](c))
        return ideal.network_c0(rule)

    best = c0(0.0)
    if best < eta and not refuse:
        return 0.0, best
    if best < eta:
        raise UnsupportedNodeError(
            f"tat: eta = {eta} is unreachable: even a = 0 (ReLU) gives the network C_f(0) = {best:.6f} (too shallow or "
            f"too many shortcuts); use eta <= {math.floor(best * 1e6) / 1e6}, or unreachable='closest'")
    floor = c0(1.0)  # a = 1: linear activations; what the rest of the network (pools, gates) gives alone
    if floor > eta and not refuse:
        return 1.0, floor
    if floor > eta:
        raise UnsupportedNodeError(
            f"tat: eta = {eta} is unreachable: even a = 1 (linear activations) gives the network C_f(0) = "
            f"{floor:.6f} (pooling or gates alone correlate the outputs); use eta >= {math.ceil(floor * 1e6) / 1e6}, "
            f"or unreachable='closest'")
    return bisect(lambda a: c0(a) > eta, 0.0, 1.0, tol=1e-14), None
