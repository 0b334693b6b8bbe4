"""``strip_bn``: fold batch norms into neighbouring linear ops, or remove them.

Fold (default) is exact in eval mode: a batch norm computes the per-channel affine
``y = x * s + t`` with ``s = γ / sqrt(var + eps)``, ``t = β - mean * s`` (docs/theory.md §3.6,
"BatchNorm in eval mode"). It is folded

1. backwards into the conv/linear producing its input: ``W[o] *= s[o]``,
   ``b = b * s + t``, when that layer's output feeds only this norm and the layer is
   called once (torch.fx's ``fuse`` silently alters a conv whose output has other users);
2. else forwards into the conv/linear consuming its output when no nonlinearity lies
   between: ``W[:, i] *= s[i]``, ``b += W t``; exact for convs only without padding
   (padded zeros would see the shift);
3. else it becomes a fixed :class:`~netsurgeon.layers.ChannelAffine`.

Norm+act composites (timm ``BatchNormAct2d``...) keep their activation and dropout.
``mode="remove"`` deletes every batch norm for normalizer-free training.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import Topology, op_info
from ..layers import ChannelAffine
from ..ops import NormFamily, OpKind, batch_norm_affine, pads_same, plain_layer
from ..report import PassRecord, Preservation
from ._edit import bypass, call_sites, composite_parts, replace_with_parts, report_hidden, shapes_from
from .base import Pass, register_pass

__all__ = ["StripBN"]

_bn_scale_shift = batch_norm_affine  # per-channel (s, t) of an eval-mode batch norm, float64


def _foldable_layer(m: nn.Module) -> bool:
    """Plain conv/linear whose forward is linear in its stored weight (timm's ``Conv2dSame`` too)."""
    return plain_layer(m, as_is=True)


def _ensure_bias(layer: nn.Module) -> torch.Tensor:
    if layer.bias is None:
        out = layer.weight.shape[1] if getattr(layer, "transposed", False) else layer.weight.shape[0]
        layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))
    return layer.bias


def _fold_backward(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    """``W[o] *= s[o]``, ``b = b * s + t``; in place, in the weight's dtype (s, t rounded once)."""
    w = layer.weight
    shape = (-1,) + (1,) * (w.dim() - 1)
    bias = _ensure_bias(layer)
    with torch.no_grad():
        w.mul_(s.to(w.device, w.dtype).view(shape))
        bias.copy_((bias.double() * s.to(bias.device) + t.to(bias.device)).to(bias.dtype))


def _fold_forward(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    """``W[:, i] *= s[i]``, ``b += W t`` (per group for grouped convs)."""
    w = layer.weight
    s, t = s.to(w.device), t.to(w.device)
    groups = getattr(layer, "groups", 1)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    group_of_out = torch.arange(out_ch, device=w.device) // (out_ch // groups)
    extra = (1,) * (w.dim() - 2)
    s_in = s.view(groups, in_per_group)[group_of_out].view(out_ch, in_per_group, *extra)
    t_in = t.view(groups, in_per_group)[group_of_out].view(out_ch, in_per_group, *extra)
    shift = (w.double() * t_in).flatten(1).sum(1)
    bias = _ensure_bias(layer)
    with torch.no_grad():
        w.mul_(s_in.to(w.dtype))
        bias.copy_((bias.double() + shift).to(bias.dtype))


@register_pass
@dataclasses.dataclass
class StripBN(Pass):
    """Fold batch norms into adjacent linear ops (exact in eval mode) or remove them.

    Args:
        mode: ``"fold"`` keeps the eval-mode function exactly; ``"remove"`` deletes the
            norms for normalizer-free training. Default: ``"fold"``.
    """

    name = "strip_bn"
    summary = "fold batch norms into adjacent conv/linear layers (exact in eval mode), or remove them"
    mode: Literal["fold", "remove"] = "fold"

    def preservation(self) -> Preservation:
        return Preservation.EXACT_EVAL if self.mode == "fold" else Preservation.NONE

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        Topology(gm)
        norms = [n for n in gm.graph.nodes if op_info(n).kind is OpKind.NORM and op_info(n).norm is not None
                 and op_info(n).norm.family is NormFamily.BATCH]
        report_hidden(gm, record, (nn.modules.batchnorm._BatchNorm,), "not folded or removed")
        if not norms:
            record.note("no batch norm in the model")
            return gm
        shapes = shapes_from(gm, example_inputs) if self.mode == "fold" else {}
        sites = call_sites(gm)
        for node in norms:
            if node.op != "call_module":
                record.skip(node.name, f"functional batch norm {node.format_node()}: its training flag was fixed "
                                       f"when traced; make the calling module a leaf (trace(leaf_modules=...))")
                continue
            module = gm.get_submodule(node.target)
            if self.mode == "remove":
                self._remove(gm, node, module, record)
            else:
                self._fold(gm, node, module, record, shapes, sites)
        return gm


    # -------------------------------------------------------------- remove
    def _remove(self, gm: fx.GraphModule, node: fx.Node, module: nn.Module, record: PassRecord) -> None:
        kept = replace_with_parts(gm, node, node.args[0], composite_parts(module))
        what = f"removed {type(module).__name__}" + (f", kept {', '.join(kept)}" if kept else "")
        record.change(node.name, what, "mode=remove: normalizer-free network")

    # -------------------------------------------------------------- fold
    def _fold(self, gm: fx.GraphModule, node: fx.Node, module: nn.Module, record: PassRecord,
              shapes: dict[str, tuple[int, ...]], sites: dict) -> None:
        try:
            s, t = _bn_scale_shift(module)
        except ValueError as exc:
            record.skip(node.name, f"{type(module).__name__} cannot be folded: {exc}")
            return
        parts = composite_parts(module)
        src = node.args[0]
        reason = self._backward_obstacle(gm, node, src, s, shapes, sites)
        if reason is None:
            layer = gm.get_submodule(src.target)
            _fold_backward(layer, s, t)
            replace_with_parts(gm, node, src, parts)
            record.change(node.name, f"folded into preceding {type(layer).__name__} {src.target}",
                          "eval-mode affine merged into weights and bias")
            return
        fwd_reason = self._forward_obstacle(gm, node, s, parts, shapes, sites)
        if fwd_reason is None:
            user = next(iter(node.users))
            layer = gm.get_submodule(user.target)
            _fold_forward(layer, s, t)
            bypass(node, src)
            record.change(node.name, f"folded into following {type(layer).__name__} {user.target}",
                          f"cannot fold backwards: {reason}")
            return
        affine = ChannelAffine(s.to(src_dtype(module)), t.to(src_dtype(module)))
        affine.to(next((b.device for b in module.buffers()), torch.device("cpu")))
        holder_parts = [("affine", affine)] + parts
        replace_with_parts(gm, node, src, holder_parts)
        record.change(node.name, "replaced by a fixed per-channel affine",
                      f"cannot fold backwards: {reason}; nor forwards: {fwd_reason}")

    @staticmethod
    def _backward_obstacle(gm: fx.GraphModule, node: fx.Node, src: fx.Node, s: torch.Tensor,
                           shapes: dict[str, tuple[int, ...]], sites: dict) -> str | None:
        if not isinstance(src, fx.Node) or src.op != "call_module":
            return "its input is not produced by a conv/linear module"
        layer = gm.get_submodule(src.target)
        if not _foldable_layer(layer):
            return f"its input comes from {type(layer).__name__} {src.target}, not a plain conv/linear"
        if getattr(layer, "transposed", False):
            return f"{src.target} is a transposed conv"
        others = [u.name for u in src.users if u is not node]
        if others:
            return f"{src.target}'s output is also used by {', '.join(others)}; folding would alter it for them"
        if sites[src.target] > 1:
            return f"module {src.target} is called at {sites[src.target]} places (shared weights)"
        if layer.weight.shape[0] != s.numel():
            return f"{src.target} has {layer.weight.shape[0]} outputs but the norm has {s.numel()} channels"
        if isinstance(layer, nn.Linear):
            rank = len(shapes.get(src.name, ()))
            if rank != 2:
                return ("the linear layer's output rank is unknown (pass example_inputs)" if rank == 0 else
                        f"linear output has rank {rank}: the norm's channel dim is not the features dim")
        return None

    @staticmethod
    def _forward_obstacle(gm: fx.GraphModule, node: fx.Node, s: torch.Tensor, parts: list,
                          shapes: dict[str, tuple[int, ...]], sites: dict) -> str | None:
        if parts:
            return f"an activation ({', '.join(type(m).__name__ for _, m in parts)}) follows the norm"
        if len(node.users) != 1:
            return f"its output has {len(node.users)} users"
        user = next(iter(node.users))
        if user.op != "call_module":
            return f"its user {user.name} is not a conv/linear module"
        layer = gm.get_submodule(user.target)
        if not _foldable_layer(layer) or getattr(layer, "transposed", False):
            return f"its user {user.name} is {type(layer).__name__}, not a plain conv/linear"
        if sites[user.target] > 1:
            return f"module {user.target} is called at {sites[user.target]} places"
        in_ch = layer.weight.shape[1] * getattr(layer, "groups", 1)
        if in_ch != s.numel():
            return f"{user.target} takes {in_ch} inputs but the norm has {s.numel()} channels"
        if isinstance(layer, nn.Linear):
            if len(shapes.get(node.name, ())) != 2:
                return "the following linear layer's input rank is not known to be 2"
        else:
            pad = layer.padding
            if pads_same(layer) or (pad != "valid" and any(p != 0 for p in pad)):
                return f"{user.target} pads its input, and padded zeros would see the norm's shift"
        return None


def src_dtype(module: nn.Module) -> torch.dtype:
    for t in list(module.buffers()) + list(module.parameters()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()
