"""``farkas`` in ``mode="block"``: FarkasNet's residual construction (docs/theory.md §6.6)."""
from __future__ import annotations

import copy
import math
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..errors import UnsupportedNodeError
from ..graph import BlockKind, Topology
from ..graph.state import nodes_by_name
from ..layers import FarkasSum
from ..ops import NormFamily, OpKind
from ..report import PassRecord
from ._edit import set_submodule
from ._farkas_units import (TRANSPARENT, Planner, farkas_layer_ok, is_flatten, one_sided, widen_input, widen_norm,
                            widen_output, width_read, wrap_like)

__all__ = ["BlockMode"]


class BlockMode:
    """FarkasNet's residual construction on the blocks of ``topo`` (all or none: a block it
    cannot handle raises, naming it, before anything is changed)."""

    def __init__(self, gm: fx.GraphModule, topo: Topology, opts: Any, record: PassRecord) -> None:
        self.gm, self.topo, self.opts, self.record = gm, topo, opts, record
        self.nodes = nodes_by_name(gm)
        self.planner = Planner(gm, topo)
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
            if info is None or info.activation is None or not one_sided(info.activation.name):
                raise UnsupportedNodeError(f"farkas mode='block': block {b.merge}'s sum is not followed by a one-sided "
                                           f"activation; use mode='layer'", nodes=[b.merge])
            if len(b.operands) != 2:
                raise UnsupportedNodeError(f"farkas mode='block': block {b.merge} sums {len(b.operands)} terms",
                                           nodes=[b.merge])
            plans.append((b, add, act, self._branch_chain(b)))
        for _, _, act, _ in plans:
            self._consumers(act, 1)  # where the extra channels go: checked before anything changes
        return plans

    def _branch_chain(self, b: Any) -> list[fx.Node]:
        """The branch's last layer and the batch norm / identities after it, in order."""
        node, chain = self.nodes[b.operands[1]], []
        while True:
            chain.append(node)
            kind = self.topo.graph.nodes[node.name]["kind"]
            if kind.traits.weighted and node.op == "call_module" \
                    and farkas_layer_ok(self.gm.get_submodule(node.target)):
                return chain[::-1]
            norm = self.topo.graph.nodes[node.name]["info"].norm
            ok = (kind is OpKind.NORM and norm is not None and norm.family is NormFamily.BATCH and norm.activation is None) \
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
                widen_output(layer, k_in, True)
                for n in chain[1:]:
                    for _ in range(k_in):
                        if n.op == "call_module" and hasattr(self.gm.get_submodule(n.target), "num_features"):
                            widen_norm(self.gm.get_submodule(n.target))
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
        done = []
        for user, cols in self._consumers(act, k):
            m = self.gm.get_submodule(user.target)
            set_submodule(self.gm, user.target, wrap_like(m, widen_input(copy.deepcopy(m), cols, self.zero)))
            done.append(f"{user.name} (+{cols})")
        return done

    def _consumers(self, act: fx.Node, k: int) -> list[tuple[fx.Node, int]]:
        """The layers that read ``act``'s output and the input columns each gains; raises (naming the
        node) where the extra channels cannot go, a shape query whose channel count is used included.
        ``_plan`` calls it before anything is changed."""
        out: list[tuple[fx.Node, int]] = []
        stack = [(act, k)]
        while stack:
            node, cols = stack.pop()
            for user in node.users:
                kind = self.topo.graph.nodes[user.name]["kind"] if user.name in self.topo.graph else None
                if kind is not None and kind.traits.weighted:
                    out.append((user, cols))
                elif kind is OpKind.META:
                    why = width_read(self.topo.graph, node, user, False)
                    if why:
                        raise UnsupportedNodeError(f"farkas mode='block': {why}", nodes=[user.name])
                elif kind is OpKind.ADD or (user.op == "call_module" and isinstance(
                        self.gm.get_submodule(user.target), FarkasSum)):
                    continue  # the next block's identity shortcut: handled with that block
                elif kind in TRANSPARENT and len(user.all_input_nodes) == 1:
                    stack.append((user, cols))
                elif kind is OpKind.RESHAPE and is_flatten(self.topo.graph.nodes[user.name]["info"]):
                    shape = self.topo.graph.nodes[node.name].get("shape")
                    if shape is None:
                        raise UnsupportedNodeError(f"farkas: {user.name} flattens; pass example_inputs",
                                                   nodes=[user.name])
                    stack.append((user, cols * math.prod(shape[2:])))
                else:
                    raise UnsupportedNodeError(f"farkas mode='block': {act.name}'s output reaches {user.name}, "
                                               f"which cannot take the extra channels", nodes=[user.name])
        return out
