"""Op-kind rules for ops that pass a signal on unchanged, reshape it, query its shape or concatenate."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import keys
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
register_function(F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, torch.native_channel_shuffle)(
    lambda node, ctx: OpInfo(OpKind.RESHAPE, node.target.__name__))


@register_method("repeat_interleave")
@register_function(torch.repeat_interleave)
def _repeat_interleave(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    """Every element repeated the same number of times (an int count) is a rearrangement; per-element
    counts weight the elements unequally."""
    if not any(ctx.is_signal(a) for a in node.all_input_nodes):
        return OpInfo(OpKind.META, "repeat_interleave")
    repeats = arg(node, 1, "repeats")
    counted = isinstance(repeats, int) or (isinstance(repeats, fx.Node) and ctx.info(repeats).kind is OpKind.META)
    if counted and ctx.is_signal(node.args[0]):  # an int, or one computed from shapes
        return OpInfo(OpKind.RESHAPE, "repeat_interleave")
    return OpInfo(OpKind.OTHER, "repeat_interleave", attrs={"reason": "unequal repeats: no kernel map"})


@register_function(operator.getitem)
def _getitem(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    src = node.args[0]
    if isinstance(src, fx.Node) and ctx.is_signal(src):
        if ctx.info(src).attrs.get("tuple_output"):
            return _tuple_item(node, src, node.args[1], ctx)
        return OpInfo(OpKind.RESHAPE, "getitem", attrs={"index": str(node.args[1])})
    return OpInfo(OpKind.META, "getitem")


def _tuple_item(node: fx.Node, src: fx.Node, index: Any, ctx: ClassifyContext) -> OpInfo:
    """An element of a tuple-valued op (LSTM, topk, ``x.max(dim)``...): a nested tuple, a tensor the
    analysis measures, or indices (and elements nobody uses), which carry no signal."""
    src_attrs = ctx.info(src).attrs
    attrs: dict[str, Any] = {"index": str(index)}
    if index in src_attrs.get("index_items", ()) or not node.users:
        return OpInfo(OpKind.META, "getitem", attrs={**attrs, "reason": "indices or an unused element of a tuple"})
    nested = index in src_attrs.get("nested", ())
    attrs.update(op_key=keys.TUPLE_OUTPUT if nested else keys.TUPLE_ITEM, tuple_output=nested,
                 reason="element of a tuple output")
    return OpInfo(OpKind.RESHAPE, "getitem", attrs=attrs)


@register_method("size", "dim", "numel", "ndimension", "nelement", "stride")
@register_function(getattr, len, torch._assert)
def _meta(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    src = node.args[0] if node.args else None
    if node.target is getattr and isinstance(src, fx.Node) and ctx.is_signal(src) \
            and ctx.info(src).attrs.get("tuple_output") and node.args[1] in ("values", "indices"):
        return _tuple_item(node, src, 0 if node.args[1] == "values" else 1, ctx)  # torch.return_types fields
    return OpInfo(OpKind.META, getattr(node.target, "__name__", str(node.target)))


# ---------------------------------------------------------------- concat
@register_function(torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack)
def _cat(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.CONCAT, node.target.__name__, attrs={"dim": arg(node, 1, "dim", 0)})
