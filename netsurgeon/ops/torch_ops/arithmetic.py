"""Op-kind rules for sums, products and matrix products of signals."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..kinds import OpInfo, OpKind, PoolType
from ..registry import ClassifyContext, arg, register_function, register_method, register_module

__all__: list[str] = []


# ---------------------------------------------------------------- sums and products
def _number(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def _term_weight(term: fx.Node, ctx: ClassifyContext) -> float | None:
    """The constant factor of a sum's term when it is ``c * h`` with a Python number c."""
    info = ctx.info(term)
    if info.kind is OpKind.AFFINE and "factor" in info.attrs:
        return info.attrs["factor"]
    return 1.0


@register_function(operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, torch.subtract)
@register_method("add", "add_", "sub", "sub_", "__add__", "__radd__", "__iadd__", "__sub__")
def _add(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    name = getattr(node.target, "__name__", str(node.target)).strip("_")
    a, b = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("other"))
    sa, sb = ctx.is_signal(a), ctx.is_signal(b)
    sign = -1.0 if "sub" in name else 1.0
    alpha = _number(node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1.0)) or 1.0
    if sa and sb:
        weights = [_term_weight(a, ctx), _term_weight(b, ctx) * sign * alpha]
        inplace = name in ("iadd", "add_", "isub", "sub_")
        return OpInfo(OpKind.ADD, "add" if sign > 0 else "sub", attrs={"weights": weights, "inplace": inplace})
    if sa or sb:
        return OpInfo(OpKind.AFFINE, "shift", attrs={"op": name})
    return OpInfo(OpKind.META, name)


@register_function(operator.mul, operator.imul, torch.mul, torch.multiply, operator.truediv, operator.itruediv,
                   torch.div, torch.true_divide, operator.neg, torch.neg)
@register_method("mul", "mul_", "div", "div_", "neg", "__mul__", "__rmul__", "__truediv__")
def _mul(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    name = getattr(node.target, "__name__", str(node.target)).strip("_")
    if name == "neg":
        return OpInfo(OpKind.AFFINE, "scale", attrs={"op": "neg", "factor": -1.0})
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    sa, sb = ctx.is_signal(a), ctx.is_signal(b)
    if sa and sb:
        return OpInfo(OpKind.MULTIPLY, "div" if "div" in name else "mul")
    if not (sa or sb):
        return OpInfo(OpKind.META, name)
    other = b if sa else a
    attrs: dict[str, Any] = {"op": name}
    num = _number(other)
    if num is not None:
        if "div" in name and sa:
            attrs["factor"] = 1.0 / num if num != 0 else float("inf")
        elif "div" not in name:
            attrs["factor"] = num
    return OpInfo(OpKind.AFFINE, "scale", attrs=attrs)


@register_function(operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.einsum,
                   F.scaled_dot_product_attention, torch.baddbmm, torch.addmm)
@register_method("matmul", "bmm", "mm", "__matmul__")
def _matmul(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    name = getattr(node.target, "__name__", str(node.target))
    signals = [a for a in node.all_input_nodes if ctx.is_signal(a)]
    if len(signals) >= 2:
        return OpInfo(OpKind.MULTIPLY, name)
    return OpInfo(OpKind.LINEAR, name, attrs={"functional": True})


@register_module(nn.MultiheadAttention)
def _mha(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.MULTIPLY, "multihead_attention")


@register_function(F.softmax, torch.softmax, F.log_softmax, torch.log_softmax)
@register_method("softmax", "log_softmax")
def _softmax(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.OTHER, "softmax", attrs={"reason": "softmax mixes features; no kernel map"})


register_module(nn.Softmax, nn.LogSoftmax, nn.Softmax2d)(
    lambda m, node, ctx: OpInfo(OpKind.OTHER, "softmax", attrs={"reason": "softmax mixes features; no kernel map"}))


@register_function(F.pad)
def _pad(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.OTHER, "pad", attrs={"reason": "padding adds constant locations"})


@register_function(F.interpolate, F.upsample)
def _interp(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.OTHER, "interpolate", attrs={"reason": "spatial resampling"})


register_module(nn.Upsample)(lambda m, node, ctx: OpInfo(OpKind.OTHER, "upsample",
                                                          attrs={"reason": "spatial resampling"}))


@register_method("sum")
@register_function(torch.sum)
def _sum(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.POOL, "sum", attrs={"pool_type": PoolType.SUM, "dim": arg(node, 1, "dim")})


@register_function(torch.addcmul)
def _addcmul(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    factors = [a for a in node.args[1:3] if ctx.is_signal(a)]
    if len(factors) >= 2:
        return OpInfo(OpKind.MULTIPLY, "addcmul")
    return OpInfo(OpKind.AFFINE, "addcmul", attrs={"op": "addcmul"})


@register_method("norm")
@register_function(torch.norm, torch.linalg.vector_norm, torch.linalg.norm)
def _vector_norm(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.OTHER, "vector_norm", attrs={"reason": "norm reduction; no kernel map"})


register_module(nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                nn.ReplicationPad2d, nn.ReplicationPad3d)(
    lambda m, node, ctx: OpInfo(OpKind.OTHER, "pad", attrs={"reason": "padding adds constant locations"}))
