"""``maxpool_to_avgpool``: max pooling has no kernel map (docs/theory.md §3.7), so Deep Kernel Shaping
swaps it for average pooling (modules, functions and timm's "same"-padded variant).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.pool2d_same import MaxPool2dSame

from ..graph import Topology, op_info
from ..layers import ExclusiveAvgPool2dSame
from ..ops import OpKind, pool_type
from ..ops import arg
from ..report import PassRecord, Preservation
from ._edit import report_hidden, set_submodule
from .base import Pass, register_pass

__all__ = ["MaxPoolToAvgPool"]


_MODULE_SWAP: dict[type, type] = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d,
                                  nn.MaxPool3d: nn.AvgPool3d}
_ADAPTIVE_MODULE_SWAP: dict[type, type] = {nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d,
                                           nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d,
                                           nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d}
_FN_SWAP = {F.max_pool1d: F.avg_pool1d, F.max_pool2d: F.avg_pool2d, F.max_pool3d: F.avg_pool3d}
_ADAPTIVE_FN_SWAP = {F.adaptive_max_pool1d: F.adaptive_avg_pool1d, F.adaptive_max_pool2d: F.adaptive_avg_pool2d,
                     F.adaptive_max_pool3d: F.adaptive_avg_pool3d}
_WHY_EXCLUSIVE = ("count_include_pad=False: max pooling pads with -inf, so padding never counts; the average "
                  "likewise runs over the in-bounds elements only")


def _all_one(value: object) -> bool:
    return all(v == 1 for v in value) if isinstance(value, (tuple, list)) else value == 1


def _avg_module(m: nn.Module) -> tuple[nn.Module | None, str]:
    """The average-pooling counterpart of a max-pooling module, or None and why not."""
    if getattr(m, "return_indices", False):
        return None, "it returns indices (used by an unpooling layer)"
    if isinstance(m, MaxPool2dSame):
        if not _all_one(m.dilation):
            return None, f"dilation {m.dilation}: average pooling has no dilation"
        return ExclusiveAvgPool2dSame(m.kernel_size, m.stride, m.ceil_mode), _WHY_EXCLUSIVE
    adaptive = _counterpart(m, _ADAPTIVE_MODULE_SWAP)
    if adaptive is not None:
        return adaptive(m.output_size), "adaptive average over the same output grid"
    plain = _counterpart(m, _MODULE_SWAP)
    if plain is None:
        return None, f"{type(m).__name__} is not a max-pooling type this pass knows"
    if not _all_one(m.dilation):
        return None, f"dilation {m.dilation}: average pooling has no dilation"
    return plain(m.kernel_size, m.stride, m.padding, m.ceil_mode, count_include_pad=False), _WHY_EXCLUSIVE


def _counterpart(m: nn.Module, table: dict[type, type]) -> type | None:
    """The average type for ``m``'s max type, when ``m`` runs that type's own forward."""
    return next((avg for mx, avg in table.items() if isinstance(m, mx) and type(m).forward is mx.forward), None)


def _avg_call(node: fx.Node) -> tuple[object, tuple, dict, str] | str:
    """``(target, args, kwargs, why)`` of the average pooling replacing a functional or
    method max pooling (same op type), or why there is none."""
    x = node.args[0]
    if node.target in _FN_SWAP:
        if arg(node, 6, "return_indices", False) or not _all_one(arg(node, 4, "dilation", 1)):
            return "it returns indices or is dilated"
        kwargs = {"stride": arg(node, 2, "stride"), "padding": arg(node, 3, "padding", 0),
                  "ceil_mode": arg(node, 5, "ceil_mode", False), "count_include_pad": False}
        return _FN_SWAP[node.target], (x, arg(node, 1, "kernel_size")), kwargs, _WHY_EXCLUSIVE
    if node.target in _ADAPTIVE_FN_SWAP:
        if arg(node, 2, "return_indices", False):
            return "it returns indices"
        return _ADAPTIVE_FN_SWAP[node.target], (x, arg(node, 1, "output_size")), {}, "adaptive average, same grid"
    if node.target == "max" and len(node.args) == 1 and not node.kwargs:
        return "mean", (x,), {}, "mean over all elements"
    dim = arg(node, 1, "dim")
    if node.target in ("amax", torch.amax) and dim:
        target = "mean" if node.op == "call_method" else torch.mean
        return target, (x, dim), {"keepdim": arg(node, 2, "keepdim", False)}, "mean over the same dims"
    return f"{node.format_node()} is not a max pooling this pass can rewrite (max over a dim returns indices too)"


def _call_text(target: object, args: tuple, kwargs: dict) -> str:
    """``name(arguments after the input)``, e.g. ``avg_pool2d(3, stride=2)``."""
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    parts = [repr(a) for a in args[1:]] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


@register_pass
@dataclasses.dataclass
class MaxPoolToAvgPool(Pass):
    """Replace every max pooling by the average pooling over the same windows.

    ``nn.MaxPool{1,2,3}d`` and ``F.max_pool*`` become ``AvgPool`` with the same kernel,
    stride, padding and ceil_mode and ``count_include_pad=False``: max pooling pads with
    ``-inf``, so padded positions never count, and the average should not count them
    either (counting zeros would also shrink ``q`` at the borders). timm's
    ``MaxPool2dSame`` becomes :class:`~netsurgeon.layers.ExclusiveAvgPool2dSame`;
    adaptive max pooling (timm ``SelectAdaptivePool2d`` with ``max``, ``avgmax``,
    ``catavgmax`` and the ``fast*`` variants) becomes adaptive average pooling / ``mean``.
    Dilated pools, pools returning indices and unknown max-like ops are reported by name.
    """

    name = "maxpool_to_avgpool"
    summary = "replace max pooling by average pooling over the same windows (padding not counted)"
    preserves = Preservation.NONE

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        Topology(gm)
        report_hidden(gm, record, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd), "not rewritten")
        swapped: dict[str, str] = {}
        for node in list(gm.graph.nodes):
            info = op_info(node)
            if info.kind is OpKind.POOL and pool_type(info) is not None and pool_type(info).takes_max:
                self._convert(gm, node, record, swapped)
            elif info.kind is OpKind.OTHER and "maxpool" in info.name.lower().replace("_", ""):
                record.skip(node.name, f"unrecognised max-pooling op {node.format_node()}: not rewritten")
        if not record.changes and not record.skipped:
            record.note("no max pooling in the model")
        return gm

    @staticmethod
    def _convert(gm: fx.GraphModule, node: fx.Node, record: PassRecord, swapped: dict[str, str]) -> None:
        if node.op == "call_module":
            if node.target not in swapped:
                old = gm.get_submodule(node.target)
                new, why = _avg_module(old)
                if new is None:
                    record.skip(node.name, f"{type(old).__name__} {node.target}: {why}")
                    return
                set_submodule(gm, node.target, new)
                swapped[node.target] = f"{type(old).__name__} -> {new!r}"
                record.change(node.name, swapped[node.target], why)
            else:
                record.change(node.name, swapped[node.target], "module already replaced at an earlier call")
            return
        call = _avg_call(node)
        if isinstance(call, str):
            record.skip(node.name, call)
            return
        target, args, kwargs, why = call
        with gm.graph.inserting_before(node):
            new = gm.graph.create_node(node.op, target, args, kwargs)
        new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        record.change(node.name, f"{_call_text(node.target, node.args, node.kwargs)} -> "
                                 f"{_call_text(target, args, kwargs)}", why)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

