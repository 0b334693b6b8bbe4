"""Facts about module types that passes and analyses act on: how a layer's forward uses its
weight, and the affine map of an eval-mode batch norm.

``nn.Linear`` and ``nn.Conv{1,2,3}d`` (and subclasses that keep their forward) compute
``y = W x + b`` with the stored weight: *plain* layers. Other libraries' layers whose own
forward uses the stored weight the same way are registered here (timm's ``Linear``, and
``Conv2dSame``, which pads to "same" first); layers that transform the weight in forward
(timm's weight-standardized ``StdConv2d``) are registered as such. Every other forward is
unknown and treated as opaque.

Example:
    >>> import torch.nn as nn
    >>> plain_layer(nn.Conv2d(3, 8, 3)), plain_layer(nn.ConvTranspose2d(3, 8, 3))
    (True, False)
    >>> s, t = batch_norm_affine(nn.BatchNorm1d(2).eval())
    >>> s.tolist(), t.tolist()
    ([0.9999950000374997, 0.9999950000374997], [0.0, 0.0])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .._registration import put_undoable
from .registry import lookup_type

__all__ = ["LayerForward", "PLAIN_LAYER_TYPES", "batch_norm_affine", "layer_forward", "pads_same", "plain_layer",
           "register_layer_forward"]

PLAIN_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # y = W x + b with the stored weight
_PLAIN_FORWARDS = frozenset(t.forward for t in PLAIN_LAYER_TYPES)


@dataclass(frozen=True)
class LayerForward:
    """How a registered Linear/Conv subclass's own forward uses its weight.

    Attributes:
        same_padding: it pads its input to "same" output size, then applies the plain op.
        standardizes_weight: it standardizes the weight in forward (the stored weight is not
            what is applied; an init or a fold would be undone).
    """

    same_padding: bool = False
    standardizes_weight: bool = False


_FORWARDS: dict[type, LayerForward] = {}


def register_layer_forward(*types: type, same_padding: bool = False, standardizes_weight: bool = False
                           ) -> Callable[[], None]:
    """State how ``types``' own forward uses the weight; returns the undo step."""
    steps = [put_undoable(_FORWARDS, t, LayerForward(same_padding, standardizes_weight)) for t in types]

    def undo() -> None:
        for step in reversed(steps):
            step()
    return undo


def layer_forward(m: nn.Module) -> LayerForward | None:
    """The registered :class:`LayerForward` of ``m``'s type, or None (a plain or unknown forward)."""
    return lookup_type(_FORWARDS, m)


def plain_layer(m: nn.Module, *, as_is: bool = False) -> bool:
    """True when ``m`` is an ``nn.Linear`` / ``nn.Conv{1,2,3}d`` running that class's forward.

    Args:
        m: the module.
        as_is: also accept registered subclasses whose own forward applies the stored weight
            unchanged (timm's ``Linear``; ``Conv2dSame``, which pads first). Default: False.
    """
    if not isinstance(m, PLAIN_LAYER_TYPES):
        return False
    if type(m).forward in _PLAIN_FORWARDS:
        return True
    fwd = layer_forward(m)
    return as_is and fwd is not None and not fwd.standardizes_weight


def pads_same(m: nn.Module) -> bool:
    """True when ``m``'s forward pads its input to "same" size before the plain op (timm's ``Conv2dSame``)."""
    fwd = layer_forward(m)
    return fwd is not None and fwd.same_padding


def batch_norm_affine(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(s, t)`` of an eval-mode batch norm, ``y = x s + t``, in float64:
    ``s = γ / sqrt(var + eps)``, ``t = β - mean · s`` (docs/theory.md §3.6).

    Raises:
        ValueError: the norm has no running statistics (``track_running_stats=False``).
    """
    mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    if mean is None or var is None:
        raise ValueError("it has no running statistics (track_running_stats=False), so even in eval mode it "
                         "normalizes with batch statistics; no fixed affine map exists")
    mean, var = mean.detach().double(), var.detach().double()
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    w = torch.ones_like(mean) if w is None else w.detach().double()
    b = torch.zeros_like(mean) if b is None else b.detach().double()
    s = w / torch.sqrt(var + float(m.eps))
    return s, b - mean * s
