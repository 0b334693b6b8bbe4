"""Op-kind rules for PyTorch's own modules, functions and tensor methods (activations: :mod:`.activations`)."""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .kinds import NormSpec, OpInfo, OpKind, PoolType
from .registry import ClassifyContext, register_function, register_method, register_module

__all__ = ["arg", "conv_attrs"]


def arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """The value of a call argument given by position ``pos`` or keyword ``name``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


# ---------------------------------------------------------------- linear and conv
def conv_attrs(m: nn.modules.conv._ConvNd) -> dict[str, Any]:
    """Geometry of a conv module."""
    return {"in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride),
            "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
            "dilation": tuple(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "transposed": m.transposed, "padding_mode": m.padding_mode}


@register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_module(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.CONV, type(m).__name__.lower(), attrs=conv_attrs(m))


@register_module(nn.Linear)
def _linear_module(m: nn.Linear, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.LINEAR, "linear", attrs={"in_features": m.in_features, "out_features": m.out_features,
                                                  "bias": m.bias is not None})


@register_function(F.linear)
def _linear_fn(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.LINEAR, "linear", attrs={"functional": True})


@register_function(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
                   F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def _conv_fn(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    weight = arg(node, 1, "weight")
    if ctx.is_signal(weight):  # dynamic weights: a product of two signals
        return OpInfo(OpKind.MULTIPLY, node.target.__name__, attrs={"dynamic_weight": True})
    return OpInfo(OpKind.CONV, node.target.__name__, attrs={"functional": True,
                                                           "groups": arg(node, 6, "groups", 1)})


@register_module(nn.Bilinear)
def _bilinear(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.MULTIPLY, "bilinear")


# ---------------------------------------------------------------- normalization
def _norm_rule(family: str) -> Callable[..., OpInfo]:
    def rule(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        if family in ("batch", "instance"):
            # Batch statistics in train mode; InstanceNorm by default never tracks.
            train_dep = bool(getattr(m, "track_running_stats", False)) if family == "batch" else False
            if family == "batch" and not getattr(m, "track_running_stats", True):
                train_dep = False  # always batch statistics: not a mode switch, but no eval affine
            channels = getattr(m, "num_features", None)
        elif family == "group":
            train_dep, channels = False, getattr(m, "num_channels", None)
        else:
            shape = getattr(m, "normalized_shape", None)
            train_dep, channels = False, (int(shape[-1]) if shape else None)
        attrs = {"module": type(m).__name__}
        if family == "batch":
            attrs["track_running_stats"] = bool(getattr(m, "track_running_stats", True))
            attrs["affine"] = bool(getattr(m, "affine", True))
        return OpInfo(OpKind.NORM, f"{family}_norm", norm=NormSpec(family, train_dep, channels), attrs=attrs)

    return rule


register_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)(_norm_rule("batch"))
register_module(nn.LayerNorm)(_norm_rule("layer"))
register_module(nn.GroupNorm)(_norm_rule("group"))
register_module(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)(_norm_rule("instance"))
register_module(nn.RMSNorm)(_norm_rule("rms"))


@register_module(nn.LocalResponseNorm)
def _lrn(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.NORM, "local_response_norm", norm=NormSpec("other", False))


@register_function(F.layer_norm, F.group_norm, F.rms_norm)
def _norm_fn(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    family = {"layer_norm": "layer", "group_norm": "group", "rms_norm": "rms"}[node.target.__name__]
    return OpInfo(OpKind.NORM, node.target.__name__, norm=NormSpec(family, False))


@register_function(F.batch_norm)
def _batch_norm_fn(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    training = arg(node, 5, "training", False)
    return OpInfo(OpKind.NORM, "batch_norm", norm=NormSpec("batch", bool(training)),
                  attrs={"functional": True, "training_flag": training})


# ---------------------------------------------------------------- pooling
def _pool_module_rule(pool_type: PoolType) -> Callable[..., OpInfo]:
    def rule(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        attrs: dict[str, Any] = {"pool_type": pool_type}
        for a in ("kernel_size", "stride", "padding", "output_size"):
            if hasattr(m, a):
                attrs[a] = getattr(m, a)
        return OpInfo(OpKind.POOL, f"{pool_type}_pool", attrs=attrs)

    return rule


register_module(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)(_pool_module_rule(PoolType.AVG))
register_module(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)(_pool_module_rule(PoolType.MAX))
register_module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)(
    _pool_module_rule(PoolType.ADAPTIVE_AVG))
register_module(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)(
    _pool_module_rule(PoolType.ADAPTIVE_MAX))
register_module(nn.LPPool1d, nn.LPPool2d)(_pool_module_rule(PoolType.LP))

_POOL_FNS = {F.avg_pool1d: PoolType.AVG, F.avg_pool2d: PoolType.AVG, F.avg_pool3d: PoolType.AVG,
             torch.avg_pool1d: PoolType.AVG, F.max_pool1d: PoolType.MAX, F.max_pool2d: PoolType.MAX,
             F.max_pool3d: PoolType.MAX, F.adaptive_avg_pool1d: PoolType.ADAPTIVE_AVG,
             F.adaptive_avg_pool2d: PoolType.ADAPTIVE_AVG, F.adaptive_avg_pool3d: PoolType.ADAPTIVE_AVG,
             F.adaptive_max_pool1d: PoolType.ADAPTIVE_MAX, F.adaptive_max_pool2d: PoolType.ADAPTIVE_MAX,
             F.adaptive_max_pool3d: PoolType.ADAPTIVE_MAX}


@register_function(*_POOL_FNS)
def _pool_fn(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    kind = _POOL_FNS[node.target]
    return OpInfo(OpKind.POOL, f"{kind}_pool", attrs={"pool_type": kind, "functional": True})


@register_method("mean")
@register_function(torch.mean)
def _mean(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.POOL, "mean", attrs={"pool_type": PoolType.MEAN, "dim": arg(node, 1, "dim")})


@register_method("amax", "max")
@register_function(torch.amax)
def _amax(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    if len([a for a in node.all_input_nodes if ctx.is_signal(a)]) > 1:
        return OpInfo(OpKind.OTHER, "maximum", attrs={"reason": "elementwise maximum of two signals"})
    return OpInfo(OpKind.POOL, "max", attrs={"pool_type": PoolType.MAX_REDUCE, "dim": arg(node, 1, "dim")})


# ---------------------------------------------------------------- identity-like
def _identity_module(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    attrs = {"module": type(m).__name__}
    if hasattr(m, "p"):
        attrs["dropout"] = float(m.p)
    return OpInfo(OpKind.IDENTITY, type(m).__name__.lower(), attrs=attrs)


register_module(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout, nn.FeatureAlphaDropout)(_identity_module)


@register_function(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                   torch.clone, torch.detach)
@register_method("contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as",
                 "requires_grad_")
def _identity_fn(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    name = getattr(node.target, "__name__", str(node.target))
    attrs = {}
    if name.endswith("dropout") or "dropout" in name:
        attrs = {"dropout": arg(node, 1, "p", 0.5), "training_flag": arg(node, 2, "training", True)}
    return OpInfo(OpKind.IDENTITY, name, attrs=attrs)


# ---------------------------------------------------------------- reshaping
_RESHAPE_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "unsqueeze", "squeeze", "expand",
                    "expand_as", "unbind", "chunk", "split", "narrow", "unflatten", "movedim", "repeat",
                    "view_as", "reshape_as", "t", "roll", "flip", "tensor_split", "split_with_sizes")
_RESHAPE_FNS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze,
                torch.unbind, torch.chunk, torch.split, torch.narrow, torch.movedim, torch.roll, torch.flip,
                torch.tensor_split, torch.swapaxes, torch.t)


@register_method(*_RESHAPE_METHODS)
@register_function(*_RESHAPE_FNS)
def _reshape(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    if not any(ctx.is_signal(a) for a in node.all_input_nodes):
        return OpInfo(OpKind.META, getattr(node.target, "__name__", str(node.target)))
    return OpInfo(OpKind.RESHAPE, getattr(node.target, "__name__", str(node.target)))


register_module(nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)(
    lambda m, node, ctx: OpInfo(OpKind.RESHAPE, type(m).__name__.lower()))
register_function(F.pixel_shuffle, F.pixel_unshuffle)(lambda node, ctx: OpInfo(OpKind.RESHAPE, node.target.__name__))


@register_function(operator.getitem)
def _getitem(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    src = node.args[0]
    if isinstance(src, fx.Node) and ctx.is_signal(src):
        return OpInfo(OpKind.RESHAPE, "getitem", attrs={"index": str(node.args[1])})
    return OpInfo(OpKind.META, "getitem")


@register_method("size", "dim", "numel", "ndimension", "nelement", "stride")
@register_function(getattr, len, torch._assert)
def _meta(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.META, getattr(node.target, "__name__", str(node.target)))


# ---------------------------------------------------------------- concat
@register_function(torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack)
def _cat(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.CONCAT, node.target.__name__, attrs={"dim": arg(node, 1, "dim", 0)})


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
