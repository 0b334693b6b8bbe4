"""Op-kind rules for torch's linear, convolution and normalization layers."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import keys
from ..kinds import NormFamily, NormSpec, OpInfo, OpKind
from ..registry import ClassifyContext, arg, register_function, register_module

__all__ = ["conv_attrs"]


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


@register_module(nn.RNN, nn.LSTM, nn.GRU)
def _recurrent(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    # returns (output, h) or, for an LSTM, (output, (h, c)): the elements taken from it are measured
    return OpInfo(OpKind.OTHER, type(m).__name__.lower(), attrs={
        "reason": "recurrent module: no kernel map", "op_key": keys.TUPLE_OUTPUT, "tuple_output": True,
        "nested": (1,) if isinstance(m, nn.LSTM) else ()})


@register_module(nn.Bilinear)
def _bilinear(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.MULTIPLY, "bilinear")


# ---------------------------------------------------------------- normalization
def _norm_rule(family: str) -> Callable[..., OpInfo]:
    def rule(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        if family in (NormFamily.BATCH, NormFamily.INSTANCE):
            # Batch statistics in train mode; InstanceNorm by default never tracks.
            train_dep = bool(getattr(m, "track_running_stats", False)) if family is NormFamily.BATCH else False
            if family is NormFamily.BATCH and not getattr(m, "track_running_stats", True):
                train_dep = False  # always batch statistics: not a mode switch, but no eval affine
            channels = getattr(m, "num_features", None)
        elif family is NormFamily.GROUP:
            train_dep, channels = False, getattr(m, "num_channels", None)
        else:
            shape = getattr(m, "normalized_shape", None)
            train_dep, channels = False, (int(shape[-1]) if shape else None)
        attrs: dict[str, Any] = {"module": type(m).__name__}
        if family is NormFamily.INSTANCE:
            attrs["op_key"] = keys.INSTANCE_NORM
        if family is NormFamily.BATCH:
            attrs["track_running_stats"] = bool(getattr(m, "track_running_stats", True))
            attrs["affine"] = bool(getattr(m, "affine", True))
        return OpInfo(OpKind.NORM, f"{family}_norm", norm=NormSpec(family, train_dep, channels), attrs=attrs)

    return rule


register_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)(_norm_rule(NormFamily.BATCH))
register_module(nn.LayerNorm)(_norm_rule(NormFamily.LAYER))
register_module(nn.GroupNorm)(_norm_rule(NormFamily.GROUP))
register_module(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)(_norm_rule(NormFamily.INSTANCE))
register_module(nn.RMSNorm)(_norm_rule(NormFamily.RMS))


@register_module(nn.LocalResponseNorm)
def _lrn(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.NORM, "local_response_norm", norm=NormSpec(NormFamily.OTHER, False))


@register_function(F.layer_norm, F.group_norm, F.rms_norm)
def _norm_fn(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    family = {"layer_norm": NormFamily.LAYER, "group_norm": NormFamily.GROUP, "rms_norm": NormFamily.RMS}[node.target.__name__]
    return OpInfo(OpKind.NORM, node.target.__name__, norm=NormSpec(family, False))


@register_function(F.batch_norm)
def _batch_norm_fn(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    training = arg(node, 5, "training", False)
    return OpInfo(OpKind.NORM, "batch_norm", norm=NormSpec(NormFamily.BATCH, bool(training)),
                  attrs={"functional": True, "training_flag": training})
