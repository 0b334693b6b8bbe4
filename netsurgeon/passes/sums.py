"""``normalize_sums`` and ``remove_skips``: the sum structure that Deep Kernel Shaping needs
(Martens et al., 2021, arXiv:2110.01765; docs/theory.md §4.7).

* ``normalize_sums``: every sum ``Σ w_i h_i`` gets ``Σ w_i² = 1``; residual sums give the
  shortcut ``w_s² = shortcut_weight2`` (0.8, the DKS paper's choice) and share the rest.
* ``remove_skips``: residual blocks become plain chains (the branch alone).

A sum written as a chain of binary adds (``a + b + c``) is one sum when every inner
add feeds only the next one. Each sum is rewritten as ``operator.mul(h_i, w_i)`` nodes
added up, so the topology view reports the new weights in the add's ``weights``.

Example:
    >>> import timm, netsurgeon
    >>> gm = netsurgeon.transform(timm.create_model("resnet18"), ["normalize_sums"])
    >>> [round(w, 4) for w in netsurgeon.topology(gm).residual_blocks()[0].weights]
    [0.8944, 0.4472]
"""
from __future__ import annotations

import dataclasses
import math
import operator

import networkx as nx
import torch
import torch.fx as fx

from ..analysis.ideal_rules import dim_sum_terms
from ..graph import BlockKind, MergeBlock, Topology, op_info
from ..graph.blocks import is_residual, path_cost
from ..graph.state import nodes_by_name
from ..ops import OpKind, PoolType, pool_type
from ..ops import arg, is_inplace
from ..report import PassRecord, Preservation
from .base import Pass, register_pass

__all__ = ["NormalizeSums", "RemoveSkips"]



@dataclasses.dataclass
class _Term:
    """One term ``coef · base`` of a sum: ``operand`` is the add's own argument and
    ``base`` the signal below its constant factors (``c * h``, ``h / c``, ``-h``)."""

    operand: fx.Node
    base: fx.Node
    coef: float


@dataclasses.dataclass
class _Sum:
    """A sum of two or more terms made of one or more binary adds (``root`` last)."""

    root: fx.Node
    adds: list[fx.Node]
    terms: list[_Term]  # shortcut first when kind == "residual"
    kind: BlockKind = BlockKind.BRANCH_MERGE
    shortcut_kind: str = ""


def _is_add(node: object) -> bool:
    return isinstance(node, fx.Node) and op_info(node).kind is OpKind.ADD


def _operands(node: fx.Node) -> tuple[fx.Node, fx.Node, float]:
    """``(a, b, s)`` for ``a + s·b``; ``s`` carries subtraction and ``torch.add``'s alpha."""
    name = node.target if isinstance(node.target, str) else node.target.__name__
    other = node.args[1] if len(node.args) > 1 else node.kwargs["other"]
    alpha = arg(node, 2, "alpha", 1)
    if isinstance(alpha, fx.Node):
        raise ValueError(f"{node.name}: alpha is computed at run time")
    return node.args[0], other, (-1.0 if "sub" in name else 1.0) * float(alpha)


def _strip(operand: fx.Node, coef: float, topo: Topology) -> _Term:
    """Look through out-of-place constant factors down to the unscaled signal.

    The factor nodes stay in the graph; those left without users are dead code.
    """
    base = operand
    while True:
        info = op_info(base)
        signals = [a for a in base.all_input_nodes if topo.graph.nodes[a.name]["signal"]]
        if info.constant_factor is None or is_inplace(base) or len(signals) != 1:
            return _Term(operand, base, coef)
        coef *= info.constant_factor
        base = signals[0]


def _collect(node: fx.Node, coef: float, found: _Sum, topo: Topology) -> None:
    found.adds.append(node)
    a, b, s = _operands(node)
    for operand, c in ((a, coef), (b, coef * s)):
        if _is_add(operand) and len(operand.users) == 1:
            _collect(operand, c, found, topo)
        else:
            found.terms.append(_strip(operand, c, topo))


def _cost(g: nx.DiGraph, entry: str | None, operand: str) -> tuple[int, int, int]:
    """(counted ops, weight layers, activations) between the fork and one term, as in find_merge_blocks."""
    if operand == entry:
        return 0, 0, 0
    path = nx.ancestors(g, operand) | {operand}
    if entry is not None:
        path &= nx.descendants(g, entry)
    return path_cost(g.nodes[n]["kind"] for n in path if g.nodes[n]["signal"])


def _classify(found: _Sum, block: MergeBlock, topo: Topology) -> None:
    """Order the terms shortcut first and set the sum's kind (the root's block for two terms)."""
    if len(found.terms) == 2:
        found.terms.sort(key=lambda t: block.operands.index(t.operand.name))
        found.kind, found.shortcut_kind = block.kind, block.shortcut_kind
        return
    costs = [_cost(topo.graph, block.entry, t.operand.name) for t in found.terms]
    ranked = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    found.terms = [found.terms[i] for i in ranked]
    if is_residual(costs[ranked[0]], (costs[i] for i in ranked[1:])):
        found.kind, found.shortcut_kind = BlockKind.RESIDUAL, ("projection" if costs[ranked[0]][1] else "identity")


def _obstacle(found: _Sum, order: dict[fx.Node, int]) -> str | None:
    """Why the sum cannot be rewritten, or None."""
    bases = [t.base.name for t in found.terms]
    twice = sorted({b for b in bases if bases.count(b) > 1})
    if twice:
        return f"{', '.join(twice)} enter(s) the sum more than once: correlated terms, not a merge of signals"
    for node in found.adds:
        if is_inplace(node):
            later = [u.name for u in node.args[0].users if u is not node and order.get(u, math.inf) > order[node]]
            if later:
                return (f"{node.name} works in place and {', '.join(later)} read its operand "
                        f"{node.args[0].name} afterwards")
    return None


def _find_sums(topo: Topology) -> tuple[list[_Sum], list[tuple[str, str]]]:
    """Every maximal sum of the graph, latest root first, and the sums that cannot be rewritten."""
    gm, blocks = topo.gm, {b.merge: b for b in topo.blocks}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sums, refused = [], []
    for node in reversed(gm.graph.nodes):
        if not _is_add(node) or (len(node.users) == 1 and _is_add(next(iter(node.users)))):
            continue
        found = _Sum(node, [], [])
        try:
            _collect(node, 1.0, found, topo)
        except ValueError as exc:
            refused.append((node.name, str(exc)))
            continue
        why = _obstacle(found, order)
        if why is None and node.name not in blocks:
            why = "not a merge of two distinct signals"
        if why is not None:
            refused.append((node.name, why))
            continue
        _classify(found, blocks[node.name], topo)
        sums.append(found)
    return sums, refused


def _rewrite(gm: fx.GraphModule, found: _Sum, terms: list[tuple[fx.Node, float]]) -> None:
    """Replace the sum by ``Σ w_i · base_i`` (a factor of 1 emits no multiplication).

    The adds are erased here (DCE keeps in-place ones), each after its user (``adds`` lists
    parents first); factor nodes left unused die in cleanup.
    """
    g, root = gm.graph, found.root
    meta = {k: v for k, v in root.meta.items() if k in ("nn_module_stack", "stack_trace")}

    def call(fn: object, args: tuple) -> fx.Node:
        n = g.call_function(fn, args)
        n.meta = dict(meta)
        return n

    with g.inserting_before(root):
        parts = [base if w == 1.0 else call(operator.mul, (base, w)) for base, w in terms]
        acc = parts[0]
        for p in parts[1:]:
            acc = call(operator.add, (acc, p))
    root.replace_all_uses_with(acc)
    for n in found.adds:
        g.erase_node(n)


@register_pass
@dataclasses.dataclass
class NormalizeSums(Pass):
    """Give every sum weights with ``Σ w_i² = 1`` (DKS, docs/theory.md §4.7).

    Residual sums: the shortcut gets ``w_s = sqrt(shortcut_weight2)``, the ``n`` branches
    ``sqrt((1 - shortcut_weight2) / n)`` each; sums without a shortcut ("branch_merge"):
    ``1/sqrt(n)`` each. Constant factors already on a term (``a + 0.5 * b``, ``a - b``)
    are *replaced*, not multiplied: the new sum reads the signal below them and keeps
    only their sign (a factor node with other users stays for them). Scales that are
    not constants (timm's LayerScale, learned gains) or act in place stay and are
    multiplied by the new weight; the report names such terms.

    A sum over one tensor dimension that holds separate signals (``torch.stack(paths).sum(1)``,
    split attention's sum over its radix groups: ``netsurgeon.analysis.ideal_rules.dim_sum_terms``)
    adds ``n`` uncorrelated terms; it is followed by a factor ``1/sqrt(n)``, as a sum of ``n``
    terms without a shortcut (once: a sum already followed by that factor is left).

    Args:
        shortcut_weight2: ``w_s²`` of residual shortcuts, in (0, 1). The DKS paper
            (arXiv:2110.01765, §"normalized sums") uses 0.8. Default: 0.8.
        reset_layer_scale: set the per-channel scale parameters that end a residual branch (layer
            scale, ConvNeXt's ``gamma``, initialized near 0), or an operand of a concatenation
            (RDNet's dense blocks), to 1, reported per node, so that the new
            weights are the effective ones (a 1e-6 scale would keep the branch out of q, and the
            activation after the sum would see q = w_s² instead of 1). So is, anywhere on the
            signal path, a per-channel scale parameter whose entries are all one value ``c``
            with ``0 < |c| <= 0.1``: a layer scale that ends no residual branch (MobileNetV5's
            blocks without a shortcut), which a removed norm after it used to undo. Default:
            True, as for ``remove_skips`` (False keeps them; they then multiply the new weight).
    """

    name = "normalize_sums"
    summary = "weight every sum so that the squared weights add up to 1 (shortcut weight² 0.8)"
    preserves = Preservation.NONE
    shortcut_weight2: float = 0.8
    reset_layer_scale: bool = True

    def validate(self) -> None:
        super().validate()
        self._require("shortcut_weight2", 0.0 < self.shortcut_weight2 < 1.0, "lie in (0, 1)")

    def _weights(self, found: _Sum) -> list[float]:
        n = len(found.terms)
        if found.kind is BlockKind.RESIDUAL:
            return [math.sqrt(self.shortcut_weight2)] + [math.sqrt((1 - self.shortcut_weight2) / (n - 1))] * (n - 1)
        return [1 / math.sqrt(n)] * n

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        topo = Topology(gm)
        sums, refused = _find_sums(topo)
        dim_sums = _dim_sums(gm)
        for name, why in refused:
            record.skip(name, why)
        stray = _stray_layer_scales(gm, topo) if self.reset_layer_scale else []
        if self.reset_layer_scale:  # on the graph the topology describes: before the sums are rewritten
            _reset_concat_scales(gm, topo, record)
        for node, n in dim_sums:
            _normalize_dim_sum(gm, node, n, record)
        for found in sums:
            if self.reset_layer_scale and found.kind is BlockKind.RESIDUAL:
                for t in found.terms[1:]:
                    _reset_layer_scale(gm, topo, t.base, record)
            weights = [math.copysign(w, t.coef) for w, t in zip(self._weights(found), found.terms)]
            _rewrite(gm, found, [(t.base, w) for t, w in zip(found.terms, weights)])
            record.change(found.root.name, f"{found.kind} sum of {len(found.terms)} terms: " + ", ".join(
                f"{t.base.name} × {w:.4g}" for t, w in zip(found.terms, weights)), self._why(found))
        _reset_stray_layer_scales(stray, record)
        if not sums and not refused and not dim_sums:
            record.note("no sum of signals in the model")
        return gm

    def _why(self, found: _Sum) -> str:
        parts = [f"{found.shortcut_kind} shortcut {found.terms[0].base.name}: w_s² = {self.shortcut_weight2:g}"
                 if found.kind is BlockKind.RESIDUAL else "no shortcut: equal weights"]
        replaced = [f"{t.base.name} (was {t.coef:g})" for t in found.terms if t.coef != 1.0]
        if replaced:
            parts.append("replaced constant coefficients of " + ", ".join(replaced) + "; signs kept")
        kept = [f"{t.base.name} ({op_info(t.base).name})" for t in found.terms
                if op_info(t.base).kind is OpKind.AFFINE]
        if kept:
            parts.append(f"kept the non-constant or in-place scaling of {', '.join(kept)} (e.g. LayerScale): "
                         f"effective weight is the new weight times it")
        return "; ".join(parts)


def _dim_sums(gm: fx.GraphModule) -> list[tuple[fx.Node, int]]:
    """The sums over a dimension of separate signals (``x.sum(dim)``) and their term counts."""
    out = []
    for node in gm.graph.nodes:
        info = op_info(node)
        if info.kind is OpKind.POOL and pool_type(info) is PoolType.SUM:
            n = dim_sum_terms(node)
            if n is not None:
                out.append((node, n))
    return out


def _normalize_dim_sum(gm: fx.GraphModule, node: fx.Node, n: int, record: PassRecord) -> None:
    """Follow the sum of ``n`` uncorrelated terms by ``1/sqrt(n)`` (unless that factor is already there)."""
    w = 1.0 / math.sqrt(n)
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target is operator.mul \
            and users[0].args[0] is node and isinstance(users[0].args[1], float) and abs(users[0].args[1] - w) < 1e-12:
        record.note(f"{node.name}: the sum of {n} terms is already weighted by 1/sqrt({n})")
        return
    with gm.graph.inserting_after(node):
        scaled = gm.graph.call_function(operator.mul, (node, w))
    scaled.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    record.change(node.name, f"sum over dim {arg(node, 1, 'dim')} of {n} terms: × {w:.4g}",
                  "its terms are separate signals (stacked paths, channel groups), uncorrelated: the sum multiplies "
                  f"q by {n}; weight 1/sqrt({n}) per term, as a sum without shortcut")


def _reset_concat_scales(gm: fx.GraphModule, topo: Topology, record: PassRecord) -> None:
    """Reset the layer scales that end the operands of a concatenation (RDNet's dense blocks end in
    ``h * gamma``, gamma = 1e-6): at 1e-6 the new features would be left out of every later q and
    C map, as a residual branch's would be out of the sum."""
    nodes = nodes_by_name(gm)
    for block in topo.blocks:
        if block.kind is BlockKind.CONCAT:
            for operand in dict.fromkeys(block.operands):
                if operand in nodes:
                    _reset_layer_scale(gm, topo, nodes[operand], record,
                                       why="a near-zero scale would leave these features out of the "
                                           "concatenation's q and C map")


LAYER_SCALE_MAX = 0.1
"""A per-channel scale parameter whose entries all hold one value of magnitude at most this is a
layer scale (timm inits 1e-6 to 1e-1), wherever it sits."""


def _broadcast_terms(topo: Topology, found: _Sum, terms: list[_Term]) -> str:
    """The terms of ``found`` whose shape is not the sum's (a broadcasting add, such as SAM's
    ``rel_h[..., None] + rel_w[..., None, :]``), described; "" when all match or shapes are unknown."""
    out = topo.graph.nodes[found.root.name].get("shape")
    if out is None:
        return ""
    bad = [(t.operand.name, topo.graph.nodes[t.operand.name].get("shape")) for t in terms]
    return ", ".join(f"{name} {tuple(shape)} to {tuple(out)}" for name, shape in bad
                     if shape is not None and tuple(shape) != tuple(out))


def _stray_layer_scales(gm: fx.GraphModule, topo: Topology) -> list[tuple[str, str, torch.nn.Parameter]]:
    """The layer scales anywhere on the signal path, as ``(node, parameter name, parameter)``: per-channel
    scale parameters (``h * gamma``) whose entries are all one value ``c`` with ``0 < |c| <= 0.1``.
    Collected on the graph the topology describes, before any rewrite; :func:`_reset_stray_layer_scales`
    resets those not already reset as the end of a residual branch."""
    return [(node.name, target, param) for node in gm.graph.nodes
            if op_info(node).kind is OpKind.AFFINE and _scales(node) and topo.graph.nodes[node.name]["signal"]
            for target, param in _scale_parameters(gm, topo, node) if param.dim() >= 1 and param.numel() >= 2]


def _scale_parameters(gm: fx.GraphModule, topo: Topology, node: fx.Node) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the learned parameters a scaling node's constant operand is computed
    from (buffers are fixed scales, not learned layer scales)."""
    out = []
    for const in (a for a in node.all_input_nodes if not topo.graph.nodes[a.name]["signal"]):
        for attr in _get_attrs(const):
            try:
                out.append((attr.target, gm.get_parameter(attr.target)))
            except AttributeError:
                continue
    return out


def _reset_stray_layer_scales(found: list[tuple[str, str, torch.nn.Parameter]], record: PassRecord) -> None:
    """Reset the layer scales that end no residual branch (MobileNetV5's blocks without a shortcut keep
    theirs: ``x = layer_scale(x)`` before ``if self.has_skip``). With a norm after them they did nothing;
    with the norms removed a 1e-5 scale multiplies q by 1e-10."""
    for node, target, param in found:
        first = param.detach().reshape(-1)[0]
        if not (0 < abs(float(first)) <= LAYER_SCALE_MAX) or not bool((param == first).all()):
            continue  # not one small value (or already reset as the end of a residual branch)
        with torch.no_grad():
            param.fill_(1.0)
        record.change(node, f"layer scale {target} set to 1 (every entry was {float(first):.3g}; it ends no "
                            f"residual branch)", "with the norm after it removed, it would multiply q by its square")


def _reset_layer_scale(gm: fx.GraphModule, topo: Topology, node: fx.Node, record: PassRecord,
                       constants: bool = False,
                       why: str = "without the shortcut a near-zero scale would pass nothing on") -> None:
    """Walk up from a branch's output through scalings and pass-throughs; set every per-channel
    scale parameter found on the way (``h * gamma``, ``h.mul(gamma.reshape(...))``) to 1, and with
    ``constants`` every constant factor (NF-Net's ``h * alpha``, ``2.0 * h``) to its sign."""
    def signal(n: fx.Node) -> bool:
        return topo.graph.nodes[n.name]["signal"]

    while True:
        kind = op_info(node).kind
        if not (kind is OpKind.AFFINE or kind.traits.unchanged):
            return
        factor = op_info(node).constant_factor if kind is OpKind.AFFINE else None
        if constants and factor is not None and abs(factor) not in (0.0, 1.0) and math.isfinite(factor):
            node.args = tuple(math.copysign(1.0, a) if isinstance(a, (int, float)) and not isinstance(a, bool)
                              else a for a in node.args)
            record.change(node.name, f"constant factor {factor:.4g} ending a residual branch set to "
                                     f"{math.copysign(1.0, factor):g}", "without the shortcut it only rescales q, "
                                                                        "which the shaping passes set themselves")
        if kind is OpKind.AFFINE and _scales(node):  # a learned shift (``h + b``, hgnetv2) is not a layer scale
            for target, param in _scale_parameters(gm, topo, node):
                if param.dim() >= 1 and not bool((param == 1.0).all()):
                    before = float(param.detach().abs().mean())
                    with torch.no_grad():
                        param.fill_(1.0)
                    record.change(node.name, f"layer scale {target} set to 1 (mean |value| was {before:.3g})", why)
        signals = [a for a in node.all_input_nodes if signal(a)]
        if len(signals) != 1:
            return
        node = signals[0]


_SCALING_FUNCTIONS = (operator.mul, operator.truediv, torch.mul, torch.div)
_SCALING_METHODS = ("mul", "mul_", "div", "div_")


def _scales(node: fx.Node) -> bool:
    """Whether an affine node multiplies (or divides) its signal by its constant operand, rather
    than shifting it (``h + b``, ``h - b``)."""
    if node.op == "call_function":
        return node.target in _SCALING_FUNCTIONS
    return node.op == "call_method" and node.target in _SCALING_METHODS


def _get_attrs(node: fx.Node) -> list[fx.Node]:
    """The get_attr nodes that a constant (non-signal) node is computed from."""
    out, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            out.append(n)
        stack.extend(n.all_input_nodes)
    return out


@register_pass
@dataclasses.dataclass
class RemoveSkips(Pass):
    """Turn residual blocks into plain chains: each residual sum becomes its branch alone.

    Identity and projection shortcuts are dropped (a projection's layers become dead and
    are removed with their modules). Concatenations and sums without a shortcut are left
    and reported as skipped.

    Options:
        reset_layer_scale: a branch that ends in a per-channel scale by a parameter (layer
            scale, ConvNeXt's ``gamma``, initialized near 0 so the block starts as its
            shortcut) gets that parameter set to 1, reported per node: without the shortcut a
            1e-6 scale would pass nothing on. So does a scale ending an operand of a concatenation
            (RDNet's dense blocks), which the concatenation would otherwise leave out, and any
            per-channel scale parameter whose entries are all one value ``c`` with
            ``0 < |c| <= 0.1`` (a layer scale ending no residual branch, as in MobileNetV5's
            blocks without a shortcut). Constant factors ending the branch (NF-Net's ``alpha``
            and gains) become their sign, since they only rescale q. Default: True.
    """

    name = "remove_skips"
    summary = "replace every residual sum by its branch (identity and projection shortcuts removed)"
    preserves = Preservation.NONE

    reset_layer_scale: bool = True

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        topo = Topology(gm)
        sums, refused = _find_sums(topo)
        for name, why in refused:
            record.skip(name, why)
        for block in topo.blocks:
            if block.kind is BlockKind.CONCAT:
                record.skip(block.merge, "concatenation: its inputs all reach the consumers' channels; "
                                         "not a skip connection that can be dropped")
        stray = _stray_layer_scales(gm, topo) if self.reset_layer_scale else []
        if self.reset_layer_scale:
            _reset_concat_scales(gm, topo, record)
        for found in sums:
            if found.kind is not BlockKind.RESIDUAL:
                record.skip(found.root.name, f"sum of {len(found.terms)} non-trivial paths with no identity or "
                                             f"projection shortcut: left as is")
                continue
            shortcut, branches = found.terms[0], found.terms[1:]
            broadcast = _broadcast_terms(topo, found, branches)
            if broadcast:
                record.skip(found.root.name, f"the sum broadcasts {broadcast}: dropping {shortcut.operand.name} "
                                             f"would change the output's shape, so it is not a skip connection "
                                             f"(left as is)")
                continue
            coefs = [t.coef for t in branches]
            if self.reset_layer_scale:
                for t in branches:
                    _reset_layer_scale(gm, topo, t.base, record, constants=True)
                if len(branches) == 1 and abs(coefs[0]) not in (0.0, 1.0):  # NF-Net's alpha: a lone branch's scale
                    record.change(found.root.name, f"branch factor {coefs[0]:.4g} set to {math.copysign(1.0, coefs[0]):g}",
                                  "without the shortcut it only rescales q, which the shaping passes set themselves")
                    coefs = [math.copysign(1.0, coefs[0])]
            _rewrite(gm, found, [(t.base, c) for t, c in zip(branches, coefs)])
            record.change(found.root.name, f"removed {found.shortcut_kind} shortcut {shortcut.operand.name}; "
                                           f"kept {', '.join(t.base.name for t in branches)}")
        _reset_stray_layer_scales(stray, record)
        if not record.changes and not record.skipped:
            record.note("no residual block in the model")
        return gm
