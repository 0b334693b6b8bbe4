"""``farkas``: append a computed Farkas unit to every eligible layer (docs/theory.md §6).

An eligible layer is a Linear/Conv module (groups 1, called once) whose output goes,
alone, into a one-sided activation (ReLU family, ELU, GELU, SiLU, ...), possibly through
a batch norm (which gains a channel: "FarkasNet with BN"). The activation's output must
reach only Linear/Conv consumers, possibly through dropout, channel-wise pooling and a
flatten; each consumer gains the input column(s) of the new channel (a flatten before a
Linear makes that one column per location). The layer becomes a
:class:`~netsurgeon.layers.FarkasLayer`; ``consumer_init="zero"`` makes the insertion
exactly function-preserving.

Every other Linear/Conv is reported as skipped, with the reason (e.g. its output feeds a
residual sum; ``mode="block"``, the authors' residual construction, covers those sums).
Without a batch norm in between, at every location of every example at least one of the
layer's ``m + 1`` post-activation units is positive (above the cutoff); with one, the
batch norm's per-channel affine sits between the units and the activation and that
guarantee does not hold (the BN variant is for speed, as in the paper).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn

from .._validate import short_list
from ..errors import UnsupportedNodeError
from ..graph import BlockKind, Topology
from ..graph.state import default_inputs, nodes_by_name
from ..graph.running import eval_mode
from ..layers import FarkasLayer, FarkasSum
from ..kernels import activation_entry
from ..ops import PLAIN_LAYER_TYPES, OpInfo, OpKind, plain_layer, pool_type
from ..report import PassRecord, Preservation
from ._edit import call_sites, set_submodule
from .base import Pass, register_pass

__all__ = ["Farkas"]

_TRANSPARENT = {OpKind.IDENTITY, OpKind.POOL}  # dropout, channel-wise pooling


@dataclasses.dataclass
class _Plan:
    layer: fx.Node
    norm: fx.Node | None
    act: fx.Node
    consumers: list[tuple[fx.Node, int]]  # (consumer node, input columns the new channel adds)


def _plain_layer(m: nn.Module) -> bool:
    return plain_layer(m) and getattr(m, "groups", 1) == 1 and not getattr(m, "transposed", False)


def _one_sided(name: str) -> bool:
    """One-sided by the activation registry (ReLU family, ELU, GELU, SiLU, ...)."""
    entry = activation_entry(name)
    return entry is not None and entry.one_sided


class _Planner:
    """Finds the eligible layers, or the reason a layer is not eligible."""

    def __init__(self, gm: fx.GraphModule, topo: Topology) -> None:
        self.gm, self.topo, self.g = gm, topo, topo.graph
        self.sites = call_sites(gm)

    def kind(self, node: fx.Node) -> OpKind:
        return self.g.nodes[node.name]["kind"]

    def plan(self, node: fx.Node) -> _Plan | str:
        m = self.gm.get_submodule(node.target)
        if not _plain_layer(m):
            return f"{type(m).__name__} (groups {getattr(m, 'groups', 1)}) is not a plain Linear/Conv with groups 1"
        if self.sites[node.target] != 1:
            return f"module {node.target} is called {self.sites[node.target]} times"
        nxt = self._next(node)
        if isinstance(nxt, str):
            return nxt
        norm = None
        info = self.g.nodes[nxt.name]["info"]
        if self.kind(nxt) is OpKind.NORM and info.norm is not None and info.norm.family == "batch" \
                and nxt.op == "call_module" and self.sites[nxt.target] == 1:
            norm = nxt
            if info.norm.activation is None:
                nxt = self._next(norm)
                if isinstance(nxt, str):
                    return nxt
                info = self.g.nodes[nxt.name]["info"]
            else:  # norm+act composite: the activation is inside the norm module
                return self._after_activation(node, norm, nxt, info.norm.activation.name)
        if self.kind(nxt) is not OpKind.ACTIVATION or info.activation is None:
            return f"its output goes into {nxt.name} ({info.describe()}), not a one-sided activation"
        return self._after_activation(node, norm, nxt, info.activation.name)

    def _next(self, node: fx.Node) -> fx.Node | str:
        """The single user of ``node``, past ``nn.Identity`` modules (timm's disabled drop-block, ...)."""
        while True:
            users = list(node.users)
            if len(users) != 1:
                return f"{node.name}'s output has {len(users)} users"
            node = users[0]
            if not (node.op == "call_module" and type(self.gm.get_submodule(node.target)) is nn.Identity):
                return node

    def _after_activation(self, node: fx.Node, norm: fx.Node | None, act: fx.Node, act_name: str) -> _Plan | str:
        if not _one_sided(act_name):
            return f"activation {act.name} ({act_name}) is not one-sided"
        consumers: list[tuple[fx.Node, int]] = []
        reason = self._consumers(act, 1, consumers, self.kind(node) is OpKind.LINEAR)
        return reason if reason is not None else _Plan(node, norm, act, consumers)

    def _consumers(self, node: fx.Node, columns: int, out: list[tuple[fx.Node, int]],
                   features_last: bool = False) -> str | None:
        """Walk from ``node`` to the layers that read it; None when all are widenable.
        ``features_last``: the extra unit is the last dimension (a Linear's output)."""
        if not node.users:
            return f"{node.name} has no consumer"
        for user in node.users:
            kind = self.kind(user)
            if kind is OpKind.META:  # reads the shape (x.shape[-2] in timm's VGG head); checked by the run below
                continue
            if kind.traits.weighted:
                if user.op != "call_module" or not _plain_layer(self.gm.get_submodule(user.target)) \
                        or self.sites[user.target] != 1:
                    return f"consumer {user.name} is not a plain Linear/Conv module called once"
                out.append((user, columns))
            elif kind in _TRANSPARENT and len(user.all_input_nodes) == 1:
                if kind is OpKind.POOL and not _per_channel(self.g.nodes[user.name]["info"]):
                    return f"consumer {user.name} is a pooling that mixes channels"
                reason = self._consumers(user, columns, out, features_last)
                if reason:
                    return reason
            elif _is_flatten(self.g.nodes[user.name]["info"]):
                shape = self.g.nodes[node.name].get("shape")
                if shape is None:
                    return f"{user.name} flattens; the spatial size needs example_inputs"
                if features_last and len(shape) > 2:  # the extra features would be interleaved, not appended
                    return f"{user.name} flattens a {len(shape)}-d Linear output whose features are last"
                reason = self._consumers(user, columns * math.prod(shape[2:]), out)
                if reason:
                    return reason
            else:
                what = "a residual sum (mode='block' covers block sums)" if kind is OpKind.ADD else \
                    f"{self.g.nodes[user.name]['info'].describe()}"
                return f"the activation's output reaches {user.name}: {what}"
        return None


def _is_flatten(info: OpInfo) -> bool:
    """``nn.Flatten``, ``torch.flatten`` or ``Tensor.flatten``."""
    return info.kind is OpKind.RESHAPE and info.name == "flatten"


def _per_channel(info: OpInfo) -> bool:
    kind = pool_type(info)
    return kind is not None and kind.per_channel


def _widen_input(m: nn.Module, columns: int, zero: bool) -> nn.Module:
    """A copy of ``m`` with ``columns`` more input columns (appended), zero or default-initialized."""
    m = m.layer if isinstance(m, FarkasLayer) else m
    w = m.weight.detach()
    extra_shape = (w.shape[0], columns) + tuple(w.shape[2:])
    fan_in = (w.shape[1] + columns) * math.prod(w.shape[2:])
    bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default (kaiming_uniform with a = sqrt(5))
    extra = torch.zeros(extra_shape, dtype=w.dtype, device=w.device) if zero else \
        torch.empty(extra_shape, dtype=w.dtype, device=w.device).uniform_(-bound, bound)
    m.weight = nn.Parameter(torch.cat([w, extra], dim=1))
    if isinstance(m, nn.Linear):
        m.in_features += columns
    else:
        m.in_channels += columns
    return m


def _widen_norm(m: nn.Module) -> None:
    """One more channel in a batch norm (identity statistics and affine)."""
    def grow(t: torch.Tensor | None, value: float) -> torch.Tensor | None:
        return None if t is None else torch.cat([t.detach(), torch.full((1,), value, dtype=t.dtype, device=t.device)])

    if m.weight is not None:
        m.weight = nn.Parameter(grow(m.weight, 1.0))
        m.bias = nn.Parameter(grow(m.bias, 0.0))
    if m.running_mean is not None:
        m.running_mean = grow(m.running_mean, 0.0)
        m.running_var = grow(m.running_var, 1.0)
    m.num_features += 1


@register_pass
@dataclasses.dataclass
class Farkas(Pass):
    """Farkas rows: a computed unit ``z_F = -agg(z) + b_F`` per eligible layer (docs/theory.md §6.1).

    Options:
        agg: ``"mean"`` (default) or ``"sum"`` over the layer's channels.
        bias: ``"learned"`` (default; clamped from below) or ``"fixed"``.
        value: the fixed ``b_F`` (must exceed twice the cutoff), or the learned one's start. Default: 0.
        consumer_init: ``"default"`` (PyTorch's init for the new columns) or ``"zero"``
            (exactly function-preserving at insertion).
        cutoff: for one-sided activations other than ReLU: guarantee some unit above it. Default: 0.
        mode: ``"layer"`` (default) or ``"block"``: also the authors' FarkasNet construction for
            residual networks (a unit computed from every block's sum; width +1 per block,
            carried by identity shortcuts, reset by projection shortcuts), then layer mode.
    """

    name = "farkas"
    summary = "Farkas rows: one computed unit per ReLU-type layer so no layer is ever entirely dead"

    agg: Literal["mean", "sum"] = "mean"
    bias: Literal["learned", "fixed"] = "learned"
    value: float = 0.0
    consumer_init: Literal["default", "zero"] = "default"
    cutoff: float = 0.0
    mode: Literal["layer", "block"] = "layer"

    def preservation(self) -> Preservation:
        return Preservation.EXACT_EVAL if self.consumer_init == "zero" else Preservation.NONE

    def validate(self) -> None:
        super().validate()
        self._require("cutoff", 0.0 <= self.cutoff < math.inf, "be >= 0 and finite")
        self._require("value", math.isfinite(self.value), "be finite")
        self._require("value", self.bias == "learned" or self.value > 2 * self.cutoff,
                      f"exceed 2 * cutoff = {2 * self.cutoff:g} for a fixed bias (bias='fixed')")

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        inputs = example_inputs if example_inputs is not None else default_inputs(gm)
        topo = Topology(gm, inputs)
        if self.mode == "block":
            _BlockMode(gm, topo, self, record).apply()
            gm.recompile()
            topo = Topology(gm, inputs)
        planner = _Planner(gm, topo)
        plans = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), PLAIN_LAYER_TYPES):
                plan = planner.plan(node)
                if isinstance(plan, str):
                    record.skip(node.name, plan)
                else:
                    plans.append(plan)
        zero = self.consumer_init == "zero"
        for plan in plans:
            for consumer, columns in plan.consumers:
                set_submodule(gm, consumer.target, _wrap_like(gm.get_submodule(consumer.target),
                                                              _widen_input(copy.deepcopy(gm.get_submodule(
                                                                  consumer.target)), columns, zero)))
        for plan in plans:
            layer = gm.get_submodule(plan.layer.target)
            set_submodule(gm, plan.layer.target, FarkasLayer(layer, self.agg, self.bias, self.value, self.cutoff))
            if plan.norm is not None:
                _widen_norm(gm.get_submodule(plan.norm.target))
            widened = ", ".join(f"{c.name} (+{n})" for c, n in plan.consumers)
            record.change(plan.layer.name, f"Farkas unit ({self.agg}, {self.bias} bias)"
                          + (f"; batch norm {plan.norm.name} +1 channel" if plan.norm is not None else ""),
                          f"activation {plan.act.name}; consumers widened: {widened}")
        if not plans:
            record.note("no eligible layer (see the skipped list for the reasons)")
        _check_runs(gm, inputs,
                    [p.layer.name for p in plans])
        return gm


def _widen_output(m: nn.Module, rows: int, zero: bool) -> None:
    """``rows`` more output channels on a plain Linear/Conv, in place (zero or default init)."""
    w = m.weight.detach()
    fan_in = math.prod(w.shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    shape = (rows,) + tuple(w.shape[1:])
    extra = torch.zeros(shape, dtype=w.dtype, device=w.device) if zero else \
        torch.empty(shape, dtype=w.dtype, device=w.device).uniform_(-bound, bound)
    m.weight = nn.Parameter(torch.cat([w, extra], dim=0))
    if m.bias is not None:
        m.bias = nn.Parameter(torch.cat([m.bias.detach(), torch.zeros(rows, dtype=w.dtype, device=w.device)]))
    if isinstance(m, nn.Linear):
        m.out_features += rows
    else:
        m.out_channels += rows


class _BlockMode:
    """FarkasNet's residual construction on the blocks of ``topo`` (all or none: a block it
    cannot handle raises, naming it, before anything is changed)."""

    def __init__(self, gm: fx.GraphModule, topo: Topology, opts: "Farkas", record: PassRecord) -> None:
        self.gm, self.topo, self.opts, self.record = gm, topo, opts, record
        self.nodes = nodes_by_name(gm)
        self.planner = _Planner(gm, topo)
        self.zero = opts.consumer_init == "zero"

    def _plan(self) -> list[tuple[Any, fx.Node, fx.Node, list[fx.Node]]]:
        blocks = sorted((b for b in self.topo.blocks if b.kind is BlockKind.RESIDUAL),
                        key=lambda b: self.topo.graph.nodes[b.merge]["index"])
        if not blocks:
            raise UnsupportedNodeError("farkas mode='block': the model has no residual block")
        plans = []
        for b in blocks:
            add = self.nodes[b.merge]
            act = self.planner._next(add)
            info = self.topo.graph.nodes[act.name]["info"] if not isinstance(act, str) else None
            if info is None or info.activation is None or not _one_sided(info.activation.name):
                raise UnsupportedNodeError(f"farkas mode='block': block {b.merge}'s sum is not followed by a one-sided "
                                           f"activation; use mode='layer'", nodes=[b.merge])
            if len(b.operands) != 2:
                raise UnsupportedNodeError(f"farkas mode='block': block {b.merge} sums {len(b.operands)} terms",
                                           nodes=[b.merge])
            plans.append((b, add, act, self._branch_chain(b)))
        return plans

    def _branch_chain(self, b: Any) -> list[fx.Node]:
        """The branch's last layer and the batch norm / identities after it, in order."""
        node, chain = self.nodes[b.operands[1]], []
        while True:
            chain.append(node)
            kind = self.topo.graph.nodes[node.name]["kind"]
            if kind.traits.weighted and node.op == "call_module" \
                    and _plain_layer(self.gm.get_submodule(node.target)):
                return chain[::-1]
            norm = self.topo.graph.nodes[node.name]["info"].norm
            ok = (kind is OpKind.NORM and norm is not None and norm.family == "batch" and norm.activation is None) \
                or (node.op == "call_module" and type(self.gm.get_submodule(node.target)) is nn.Identity)
            if not ok or len(node.all_input_nodes) != 1:
                raise UnsupportedNodeError(f"farkas mode='block': block {b.merge}'s branch does not end in a "
                                           f"Linear/Conv (+ batch norm); found {node.name}", nodes=[b.merge, node.name])
            node = node.all_input_nodes[0]

    def apply(self) -> None:
        plans = self._plan()
        extra: dict[str, int] = {}  # activation node -> channels appended to its output
        for b, add, act, chain in plans:
            k_in = extra.get(b.entry, 0) if b.shortcut_kind == "identity" else 0
            layer = self.gm.get_submodule(chain[0].target)
            if k_in:  # the identity shortcut carries k_in Farkas channels: the branch must produce them too
                _widen_output(layer, k_in, True)
                for n in chain[1:]:
                    for _ in range(k_in):
                        if n.op == "call_module" and hasattr(self.gm.get_submodule(n.target), "num_features"):
                            _widen_norm(self.gm.get_submodule(n.target))
            channels = layer.weight.shape[0]
            path = f"{add.name}_farkas"
            self.gm.add_module(path, FarkasSum(channels, self.opts.agg, self.opts.bias, self.opts.value,
                                               self.opts.cutoff, dim=-1 if isinstance(layer, nn.Linear) else 1))
            with self.gm.graph.inserting_after(add):
                unit = self.gm.graph.call_module(path, (add,))
            add.replace_all_uses_with(unit, delete_user_cb=lambda u: u is not unit)
            extra[act.name] = k_in + 1
            widened = self._widen_consumers(act, k_in + 1)
            self.record.change(add.name, f"block Farkas unit on the sum ({channels} channels -> {channels + 1})",
                               f"branch {chain[0].name} +{k_in} output channels; consumers widened: "
                               + (", ".join(widened) or "none"))

    def _widen_consumers(self, act: fx.Node, k: int) -> list[str]:
        out: list[tuple[fx.Node, int]] = []
        stack = [(act, k)]
        done = []
        while stack:
            node, cols = stack.pop()
            for user in node.users:
                kind = self.topo.graph.nodes[user.name]["kind"] if user.name in self.topo.graph else None
                if kind is not None and kind.traits.weighted:
                    out.append((user, cols))
                elif kind is OpKind.ADD or kind is OpKind.META or (user.op == "call_module" and isinstance(
                        self.gm.get_submodule(user.target), FarkasSum)):
                    continue  # the next block's identity shortcut: handled with that block
                elif kind in _TRANSPARENT and len(user.all_input_nodes) == 1:
                    stack.append((user, cols))
                elif kind is OpKind.RESHAPE and _is_flatten(self.topo.graph.nodes[user.name]["info"]):
                    shape = self.topo.graph.nodes[node.name].get("shape")
                    if shape is None:
                        raise UnsupportedNodeError(f"farkas: {user.name} flattens; pass example_inputs",
                                                   nodes=[user.name])
                    stack.append((user, cols * math.prod(shape[2:])))
                else:
                    raise UnsupportedNodeError(f"farkas mode='block': {act.name}'s output reaches {user.name}, "
                                               f"which cannot take the extra channels", nodes=[user.name])
        for user, cols in out:
            m = self.gm.get_submodule(user.target)
            set_submodule(self.gm, user.target, _wrap_like(m, _widen_input(copy.deepcopy(m), cols, self.zero)))
            done.append(f"{user.name} (+{cols})")
        return done


def _wrap_like(old: nn.Module, widened: nn.Module) -> nn.Module:
    """Put a widened inner layer back into its FarkasLayer wrapper when the consumer already has one."""
    if isinstance(old, FarkasLayer):
        new = copy.deepcopy(old)
        new.layer = widened
        return new
    return widened


def _check_runs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...] | None, layers: list[str]) -> None:
    """Run the widened model once (eval mode) when inputs are known; a failure names the layers."""
    if inputs is None or not layers:
        return
    gm.recompile()
    try:
        with eval_mode(gm), torch.no_grad():
            gm(*inputs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UnsupportedNodeError(f"farkas: the model no longer runs after widening {len(layers)} layer(s) "
                                   f"({short_list(layers)}): {type(exc).__name__}: {first}", nodes=layers) from exc

