"""The layer-mode machinery of the ``farkas`` pass: which layers are eligible (:class:`Planner`),
how layers, batch norms and consumers are widened for the Farkas unit, and the final run check
(docs/theory.md §6)."""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.fx as fx
import torch.nn as nn

from .._validate import short_list
from ..errors import UnsupportedNodeError
from ..graph import Topology
from ..graph.running import eval_mode
from ..kernels import activation_entry
from ..layers import FarkasLayer
from ..ops import NormFamily, OpInfo, OpKind, plain_layer, pool_type
from ._edit import call_sites

__all__ = ["Plan", "Planner", "TRANSPARENT", "farkas_layer_ok", "one_sided", "is_flatten", "per_channel",
           "widen_input", "widen_norm", "widen_output", "width_read", "wrap_like", "check_runs"]

TRANSPARENT = {OpKind.IDENTITY, OpKind.POOL}  # dropout, channel-wise pooling


@dataclasses.dataclass
class Plan:
    layer: fx.Node
    norm: fx.Node | None
    act: fx.Node
    consumers: list[tuple[fx.Node, int]]  # (consumer node, input columns the new channel adds)


def farkas_layer_ok(m: nn.Module) -> bool:
    return plain_layer(m) and getattr(m, "groups", 1) == 1 and not getattr(m, "transposed", False)


def one_sided(name: str) -> bool:
    """One-sided by the activation registry (ReLU family, ELU, GELU, SiLU, ...)."""
    entry = activation_entry(name)
    return entry is not None and entry.one_sided


class Planner:
    """Finds the eligible layers, or the reason a layer is not eligible."""

    def __init__(self, gm: fx.GraphModule, topo: Topology) -> None:
        self.gm, self.topo, self.g = gm, topo, topo.graph
        self.sites = call_sites(gm)

    def kind(self, node: fx.Node) -> OpKind:
        return self.g.nodes[node.name]["kind"]

    def plan(self, node: fx.Node) -> Plan | str:
        m = self.gm.get_submodule(node.target)
        if not farkas_layer_ok(m):
            return f"{type(m).__name__} (groups {getattr(m, 'groups', 1)}) is not a plain Linear/Conv with groups 1"
        if self.sites[node.target] != 1:
            return f"module {node.target} is called {self.sites[node.target]} times"
        nxt = self._next(node)
        if isinstance(nxt, str):
            return nxt
        norm = None
        info = self.g.nodes[nxt.name]["info"]
        if self.kind(nxt) is OpKind.NORM and info.norm is not None and info.norm.family is NormFamily.BATCH \
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

    def _after_activation(self, node: fx.Node, norm: fx.Node | None, act: fx.Node, act_name: str) -> Plan | str:
        if not one_sided(act_name):
            return f"activation {act.name} ({act_name}) is not one-sided"
        consumers: list[tuple[fx.Node, int]] = []
        reason = self._consumers(act, 1, consumers, self.kind(node) is OpKind.LINEAR)
        return reason if reason is not None else Plan(node, norm, act, consumers)

    def _consumers(self, node: fx.Node, columns: int, out: list[tuple[fx.Node, int]],
                   features_last: bool = False) -> str | None:
        """Walk from ``node`` to the layers that read it; None when all are widenable.
        ``features_last``: the extra unit is the last dimension (a Linear's output)."""
        if not node.users:
            return f"{node.name} has no consumer"
        for user in node.users:
            kind = self.kind(user)
            if kind is OpKind.META:  # reads the shape: harmless unless the widened size is used (x.shape[-2] is)
                reason = width_read(self.g, node, user, features_last)
                if reason:
                    return reason
                continue
            if kind.traits.weighted:
                if user.op != "call_module" or not farkas_layer_ok(self.gm.get_submodule(user.target)) \
                        or self.sites[user.target] != 1:
                    return f"consumer {user.name} is not a plain Linear/Conv module called once"
                out.append((user, columns))
            elif kind in TRANSPARENT and len(user.all_input_nodes) == 1:
                if kind is OpKind.POOL and not per_channel(self.g.nodes[user.name]["info"]):
                    return f"consumer {user.name} is a pooling that mixes channels"
                reason = self._consumers(user, columns, out, features_last)
                if reason:
                    return reason
            elif is_flatten(self.g.nodes[user.name]["info"]):
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


_HARMLESS_META = {"dim", "ndim", "ndimension", "dtype", "device", "is_cuda", "is_contiguous", "requires_grad",
                  "layout"}


def _width_dims(shape: tuple[int, ...] | None, features_last: bool) -> tuple[set[int], int | None]:
    """The indices (both signs when the rank is known) of the dimension a Farkas unit widens."""
    rank = len(shape) if shape is not None else None
    if rank is None:
        return ({-1} if features_last else {1}), None
    at = rank - 1 if features_last else 1
    return {at, at - rank}, rank


def _covers(idx: object, dims: set[int], rank: int | None) -> bool:
    """Whether a shape index (an int or a slice) reaches a widened dimension."""
    if isinstance(idx, bool):
        return False
    if isinstance(idx, int):
        return idx in dims or (rank is None and idx < -2)
    if isinstance(idx, slice):
        if rank is None:
            return True
        return any(i in dims for i in range(rank)[idx])
    return True


def _used(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users), None)


def width_read(g: object, node: fx.Node, meta: fx.Node, features_last: bool) -> str | None:
    """Why widening ``node``'s features (channels, or the last dim of a Linear's output) would break
    ``meta``, a shape query of ``node`` whose value is used, or None. A query of another dimension
    (timm's VGG head reads ``x.shape[-2]``) is harmless; a channel count that reaches a reshape
    (lambda layers: ``B, C, H, W = x.shape`` ... ``out.reshape(B, C, H, W)``) is not."""
    dims, rank = _width_dims(g.nodes[node.name].get("shape"), features_last)

    def reason(reader: fx.Node, user: fx.Node) -> str:
        return (f"{user.name} uses the channel count of {node.name}, read at {reader.name} (a shape query): a "
                f"Farkas unit would widen it by one (a reshape back to the input's shape fails)")

    name = meta.target if isinstance(meta.target, str) else getattr(meta.target, "__name__", "")
    attr = meta.args[1] if name == "getattr" and len(meta.args) > 1 else None
    if attr in _HARMLESS_META or name in _HARMLESS_META or not meta.users:
        return None
    if name == "size" and (len(meta.args) > 1 or "dim" in meta.kwargs):
        dim = meta.args[1] if len(meta.args) > 1 else meta.kwargs["dim"]
        return reason(meta, _used(meta)) if _covers(dim, dims, rank) else None
    if name == "numel":
        return reason(meta, _used(meta))
    if attr == "shape" or name == "size":  # the whole shape: which entries are used?
        for user in meta.users:
            target = getattr(user.target, "__name__", user.target)
            if target == "len":
                continue
            if target == "getitem" and len(user.args) > 1:
                if _covers(user.args[1], dims, rank) and user.users:
                    return reason(meta, _used(user))
                continue
            return reason(meta, user)
        return None
    return reason(meta, _used(meta))


def is_flatten(info: OpInfo) -> bool:
    """``nn.Flatten``, ``torch.flatten`` or ``Tensor.flatten``."""
    return info.kind is OpKind.RESHAPE and info.name == "flatten"


def per_channel(info: OpInfo) -> bool:
    kind = pool_type(info)
    return kind is not None and kind.per_channel


def widen_input(m: nn.Module, columns: int, zero: bool) -> nn.Module:
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


def widen_norm(m: nn.Module) -> None:
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


def widen_output(m: nn.Module, rows: int, zero: bool) -> None:
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


def wrap_like(old: nn.Module, widened: nn.Module) -> nn.Module:
    """Put a widened inner layer back into its FarkasLayer wrapper when the consumer already has one."""
    if isinstance(old, FarkasLayer):
        new = copy.deepcopy(old)
        new.layer = widened
        return new
    return widened


def check_runs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...] | None, layers: list[str]) -> None:
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
