"""Op-kind rules for sums, products and matrix products of signals."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import keys
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
    # returns (output, attention weights or None): its elements are measured where they are taken
    return OpInfo(OpKind.MULTIPLY, "multihead_attention", attrs={"op_key": keys.TUPLE_OUTPUT, "tuple_output": True})


@register_function(F.softmax, torch.softmax, F.log_softmax, torch.log_softmax)
@register_method("softmax", "log_softmax")
def _softmax(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.OTHER, "softmax", attrs={"reason": "softmax mixes features; no kernel map"})


register_module(nn.Softmax, nn.LogSoftmax, nn.Softmax2d)(
    lambda m, node, ctx: OpInfo(OpKind.OTHER, "softmax", attrs={"reason": "softmax mixes features; no kernel map"}))


@register_function(F.pad)
def _pad(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    mode = arg(node, 2, "mode", "constant")
    value = arg(node, 3, "value", None)
    return _pad_info(mode, 0.0 if value is None else value, arg(node, 1, "pad"))


def _pad_info(mode: Any, value: Any, pad: Any) -> OpInfo:
    return OpInfo(OpKind.OTHER, "pad", attrs={"reason": "padding adds constant locations", "op_key": keys.PAD,
                                              "mode": mode, "value": value, "pad": pad})


_PAD_MODES = {"Constant": "constant", "Zero": "constant", "Reflection": "reflect", "Replication": "replicate",
              "Circular": "circular"}


def _pad_module(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    mode = next(v for k, v in _PAD_MODES.items() if type(m).__name__.startswith(k))
    return _pad_info(mode, float(getattr(m, "value", 0.0)), tuple(m.padding))


_INTERP_DEFAULTS = {F.upsample_nearest: "nearest", F.upsample_bilinear: "bilinear"}


@register_function(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
def _interp(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    if node.target in _INTERP_DEFAULTS:  # upsample_bilinear uses align_corners=True
        return _interp_info(_INTERP_DEFAULTS[node.target], arg(node, 1, "size"), arg(node, 2, "scale_factor"),
                            node.target is F.upsample_bilinear, False)
    return _interp_info(arg(node, 3, "mode", "nearest"), arg(node, 1, "size"), arg(node, 2, "scale_factor"),
                        arg(node, 4, "align_corners"), arg(node, 6, "antialias", False))


def _interp_info(mode: Any, size: Any, scale: Any, align_corners: Any, antialias: Any) -> OpInfo:
    return OpInfo(OpKind.OTHER, "interpolate", attrs={
        "reason": "spatial resampling", "op_key": keys.INTERPOLATE, "mode": mode, "size": size, "scale_factor": scale,
        "align_corners": align_corners, "antialias": antialias})


register_module(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)(
    lambda m, node, ctx: _interp_info(m.mode, m.size, m.scale_factor, m.align_corners, False))


@register_function(F.normalize)
def _normalize(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.OTHER, "normalize", attrs={"reason": "normalization to unit norm", "op_key": keys.NORMALIZE,
                                                    "p": arg(node, 1, "p", 2.0), "dim": arg(node, 2, "dim", 1)})


@register_function(F.unfold)
def _unfold(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return _patches(keys.UNFOLD, None, *(arg(node, i, n, d) for i, n, d in (
        (1, "kernel_size", None), (2, "dilation", 1), (3, "padding", 0), (4, "stride", 1))))


@register_function(F.fold)
def _fold(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return _patches(keys.FOLD, *(arg(node, i, n, d) for i, n, d in (
        (1, "output_size", None), (2, "kernel_size", None), (3, "dilation", 1), (4, "padding", 0), (5, "stride", 1))))


def _patches(key: str, output_size: Any, kernel_size: Any, dilation: Any, padding: Any, stride: Any) -> OpInfo:
    name = "fold" if key == keys.FOLD else "unfold"
    attrs = {"reason": f"{name}: patches of locations", "op_key": key, "kernel_size": kernel_size,
             "dilation": dilation, "padding": padding, "stride": stride}
    if key == keys.FOLD:
        attrs["output_size"] = output_size
    return OpInfo(OpKind.OTHER, name, attrs=attrs)


register_module(nn.Unfold)(lambda m, node, ctx: _patches(keys.UNFOLD, None, m.kernel_size, m.dilation, m.padding,
                                                         m.stride))
register_module(nn.Fold)(lambda m, node, ctx: _patches(keys.FOLD, m.output_size, m.kernel_size, m.dilation, m.padding,
                                                       m.stride))


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
                nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d,
                nn.CircularPad3d)(_pad_module)
