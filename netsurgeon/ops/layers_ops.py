"""Op-kind rules for the modules netsurgeon's own passes insert."""
from __future__ import annotations

import dataclasses

import torch.fx as fx
import torch.nn as nn

from ..layers import (ChannelAffine, ExclusiveAvgPool2dSame, FarkasLayer, FarkasSum, FixedLinear, LocationNorm,
                      MinimalRMSNorm, ModeConstant, ScalarBias, ScalarGate, ShapedActivation, ShapedAttention,
                      ValueSkipInit)
from .kinds import NormFamily, NormSpec, OpInfo, OpKind, PoolType
from .registry import ClassifyContext, module_rule, register_module

__all__: list[str] = []


@register_module(ChannelAffine)
def _channel_affine(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.AFFINE, "channel_affine", attrs={"per_channel": True, "channels": m.scale.numel()})


@register_module(LocationNorm)
def _location_norm(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    # An RMS norm without gain over the channels of each location: q = 1, c unchanged (docs/theory.md §3.6).
    return OpInfo(OpKind.NORM, "location_norm", norm=NormSpec(NormFamily.RMS, False),
                  attrs={"module": "LocationNorm", "dim": m.dim, "eps": m.eps, "per_location": True})


@register_module(ExclusiveAvgPool2dSame)
def _exclusive_avg_pool(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.POOL, "avg_pool", attrs={"pool_type": PoolType.AVG, "kernel_size": m.kernel_size,
                                                  "stride": m.stride, "same_padding": True,
                                                  "count_include_pad": False})


@register_module(ShapedActivation)
def _shaped_activation(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    rule = module_rule(m.base)
    base = rule(m.base, node, ctx) if rule is not None else None
    if base is None or base.activation is None:
        return OpInfo(OpKind.ACTIVATION, "shaped_activation", known=False,
                      attrs={"reason": f"unknown base activation {type(m.base).__name__}"})
    spec = dataclasses.replace(base.activation, transform=m.constants())
    return OpInfo(OpKind.ACTIVATION, f"shaped_{base.name}", activation=spec)


@register_module(FarkasLayer)
def _farkas_layer(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    # The wrapped layer's kind; the analysis sees its weights (the one computed unit is neglected).
    inner = module_rule(m.layer)
    base = inner(m.layer, node, ctx) if inner is not None else OpInfo(OpKind.OTHER, "farkas", known=False)
    return dataclasses.replace(base, name=f"farkas_{base.name}", attrs={**base.attrs, "farkas": True,
                                                                        "farkas_agg": m.agg})


@register_module(FarkasSum)
def _farkas_sum(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    # Appends one computed channel; no kernel map (the analysis measures it).
    return OpInfo(OpKind.OTHER, "farkas_sum", attrs={"farkas": True, "reason": "Farkas unit of a block sum"})


@register_module(ScalarGate)
def _scalar_gate(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.AFFINE, "scalar_gate", attrs={"op": "mul", "learned": True})


@register_module(ScalarBias)
def _scalar_bias(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.AFFINE, "scalar_bias", attrs={"op": "add", "learned": True})


@register_module(FixedLinear)
def _fixed_linear(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.LINEAR, "fixed_linear", attrs={"in_features": m.weight.shape[1],
                                                        "out_features": m.weight.shape[0], "fixed": True})


@register_module(MinimalRMSNorm)
def _minimal_rms_norm(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    # Divides by one moving-average scalar: in eval mode a constant scale (train mode: batch-dependent).
    return OpInfo(OpKind.NORM, "minimal_rms_norm", norm=NormSpec(NormFamily.MINIMAL_RMS, True),
                  attrs={"momentum": m.momentum, "eps": m.eps})



@register_module(ShapedAttention)
def _shaped_attention(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    # Token mixing with a fixed matrix at initialization; rules in netsurgeon.analysis.attention_rules.
    return OpInfo(OpKind.OTHER, "shaped_attention", attrs={"mode": m.mode, "causal": m.causal, "attention": True,
                                                           "reason": "shaped self-attention"})


@register_module(ValueSkipInit)
def _value_skipinit(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.OTHER, "value_skipinit_attention", attrs={"mode": m.mode, "causal": m.causal,
                                                                   "attention": True,
                                                                   "reason": "value-skipinit self-attention"})


@register_module(ModeConstant)
def _mode_constant(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
    return OpInfo(OpKind.META, "mode_constant")
