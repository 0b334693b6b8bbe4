"""Op-kind rules for the modules netsurgeon's own passes insert."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..layers import ChannelAffine
from .kinds import OpInfo, OpKind
from .registry import ClassifyContext, register_module

__all__: list[str] = []


@register_module(ChannelAffine)
def _channel_affine(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.AFFINE, "channel_affine", attrs={"per_channel": True, "channels": m.scale.numel()})
