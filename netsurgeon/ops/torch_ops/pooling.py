"""Op-kind rules for torch's pooling modules, functions and reductions."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import keys
from ..kinds import OpInfo, OpKind, PoolType
from ..registry import ClassifyContext, arg, register_function, register_method, register_module

__all__: list[str] = []


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
@register_function(torch.amax, torch.max)
def _amax(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    if len([a for a in node.all_input_nodes if ctx.is_signal(a)]) > 1:
        return OpInfo(OpKind.OTHER, "maximum", attrs={"reason": "elementwise maximum of two signals"})
    dim = arg(node, 1, "dim")
    attrs: dict[str, Any] = {"pool_type": PoolType.MAX_REDUCE, "dim": dim}
    if node.target in ("max", torch.max) and isinstance(dim, int):  # (values, indices)
        attrs.update(op_key=keys.TUPLE_OUTPUT, tuple_output=True, index_items=(1,))
    return OpInfo(OpKind.POOL, "max", attrs=attrs)


@register_method("min", "topk", "sort", "kthvalue", "median", "mode")
@register_function(torch.min, torch.topk, torch.sort, torch.kthvalue, torch.median, torch.mode)
def _selection(node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    """Order statistics (no kernel map); with a dim (always for topk, sort, kthvalue, mode) they
    return ``(values, indices)``, whose elements are measured where they are taken."""
    name = getattr(node.target, "__name__", str(node.target))
    if len([a for a in node.all_input_nodes if ctx.is_signal(a)]) > 1:
        return OpInfo(OpKind.OTHER, f"{name}imum", attrs={"reason": f"elementwise {name}imum of two signals"})
    attrs: dict[str, Any] = {"reason": f"{name}: an order statistic, no kernel map"}
    if name in ("topk", "sort", "kthvalue", "mode") or isinstance(arg(node, 1, "dim"), int):
        attrs.update(op_key=keys.TUPLE_OUTPUT, tuple_output=True, index_items=(1,))  # (values, indices)
    return OpInfo(OpKind.OTHER, name, attrs=attrs)
