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
from typing import Literal

import torch
import torch.fx as fx

from ..graph import Topology
from ..graph.state import default_inputs
from ..layers import FarkasLayer
from ..ops import PLAIN_LAYER_TYPES
from ..report import PassRecord, Preservation
from ._edit import set_submodule
from ._farkas_block import BlockMode
from ._farkas_units import Planner, check_runs, widen_input, widen_norm, wrap_like
from .base import Pass, register_pass

__all__ = ["Farkas"]


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
            BlockMode(gm, topo, self, record).apply()
            gm.recompile()
            topo = Topology(gm, inputs)
        planner = Planner(gm, topo)
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
                set_submodule(gm, consumer.target, wrap_like(gm.get_submodule(consumer.target),
                                                              widen_input(copy.deepcopy(gm.get_submodule(
                                                                  consumer.target)), columns, zero)))
        for plan in plans:
            layer = gm.get_submodule(plan.layer.target)
            set_submodule(gm, plan.layer.target, FarkasLayer(layer, self.agg, self.bias, self.value, self.cutoff))
            if plan.norm is not None:
                widen_norm(gm.get_submodule(plan.norm.target))
            widened = ", ".join(f"{c.name} (+{n})" for c, n in plan.consumers)
            record.change(plan.layer.name, f"Farkas unit ({self.agg}, {self.bias} bias)"
                          + (f"; batch norm {plan.norm.name} +1 channel" if plan.norm is not None else ""),
                          f"activation {plan.act.name}; consumers widened: {widened}")
        if not plans:
            record.note("no eligible layer (see the skipped list for the reasons)")
        check_runs(gm, inputs,
                    [p.layer.name for p in plans])
        return gm
