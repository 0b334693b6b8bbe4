"""Kernel and DKS-target rules of the attention modules ``attention_shaping`` inserts (docs/theory.md §9).

A pair of examples (what ``analyze`` and the ``dks``/``tat`` targets follow) sees shaped attention
as the value path: the pattern is built so that the scheduled token kernel keeps a unit
diagonal, and the value's pair kernel is taken to pass through. That is exact for
:class:`~netsurgeon.layers.ValueSkipInit` at initialization (``α = 1``, ``β = 0``: the output is the
value) and approximate for :class:`~netsurgeon.layers.ShapedAttention` (exact when the two examples'
cross token kernel is their cosine times the scheduled within-sequence kernel). The within-sequence
token kernel itself, ``Σ -> A Σ Aᵀ``, is the token analysis's (:mod:`.token_kernels`).
"""
from __future__ import annotations

import torch.fx as fx

from ..layers import ShapedAttention, ValueSkipInit
from .ideal_rules import IdealRule
from .rules import APPROX, EXACT, IDEAL_RULES, KERNEL_RULES, KernelContext, NodeKernel, reasons, worse

__all__: list[str] = []

SHAPED_REASON = ("shaped attention taken as passing the value's pair kernel (its pattern keeps the scheduled "
                 "token kernel's unit diagonal)")


def _value_input(node: fx.Node) -> fx.Node:
    return node.args[2] if len(node.args) > 2 else node.kwargs["v"]


def _value_index(node: fx.Node) -> int:
    return node.all_input_nodes.index(_value_input(node))


def _shaped_rule(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    i = _value_index(ctx.node)
    if i >= len(inputs):
        return None
    v = inputs[i]
    return NodeKernel(v.q, v.q2, v.k.copy(), v.dk, worse(v.status, APPROX), reasons(v.reason, SHAPED_REASON), v.dims)


def _skipinit_rule(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    m = ctx.module
    i = _value_index(ctx.node)
    if i >= len(inputs) or m is None or bool((m.beta != 0).any()) or not bool((m.alpha == m.alpha.flatten()[0]).all()):
        return None  # trained: measured
    a2 = float(m.alpha.flatten()[0]) ** 2
    v = inputs[i]
    return NodeKernel(a2 * v.q, a2 * v.q2, a2 * v.k, a2 * v.dk, worse(v.status, EXACT), v.reason, v.dims)


def _ideal_value(graph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float], v: dict[str, float], act
                 ) -> tuple[float, float]:
    name = _value_input(node).name
    return q[name], v[name]


KERNEL_RULES.add(ShapedAttention, _shaped_rule)
KERNEL_RULES.add(ValueSkipInit, _skipinit_rule)
IDEAL_RULES.add(ShapedAttention, IdealRule(_ideal_value))
IDEAL_RULES.add(ValueSkipInit, IdealRule(_ideal_value))
