"""Op-kind rules for ops that pass a signal on unchanged, reshape it, query its shape or concatenate."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..kinds import OpInfo, OpKind
from ..registry import ClassifyContext, arg, register_function, register_method, register_module

__all__: list[str] = []


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
