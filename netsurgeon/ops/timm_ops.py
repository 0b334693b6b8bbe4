"""Op-kind rules for timm's layers: activations, norm+act composites, conv variants."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .activations import register_activation
from .kinds import ActivationSpec, NormFamily, NormSpec, OpInfo, OpKind, PoolType
from .modules import layer_forward, register_layer_forward
from .registry import ClassifyContext, module_rule, register_module
from .torch_ops import conv_attrs, keys

__all__: list[str] = []

try:
    import timm.layers as tl
    import timm.layers.activations as ta
    import timm.layers.activations_me as tme
    import timm.layers.norm as tn
    import timm.layers.norm_act as tna
except ImportError:  # pragma: no cover - timm is a base dependency
    tl = None


def _composite_activation(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> ActivationSpec | None:
    act = getattr(m, "act", None)
    if act is None:
        return None
    rule = module_rule(act)
    if rule is None:
        return ActivationSpec(f"unknown:{type(act).__name__}")
    info = rule(act, node, ctx)
    return info.activation


def _norm(family: str, train_dependent: Any, composite: bool = False, reason: str | None = None
          ) -> Callable[..., OpInfo]:
    def rule(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        dep = train_dependent(m) if callable(train_dependent) else bool(train_dependent)
        channels = getattr(m, "num_features", None) or getattr(m, "num_channels", None)
        if channels is None and getattr(m, "normalized_shape", None):
            channels = int(m.normalized_shape[-1])
        act = _composite_activation(m, node, ctx) if composite else None
        attrs: dict[str, Any] = {"module": type(m).__name__}
        if reason is not None:
            attrs["reason"] = reason
        if composite:
            attrs["op_key"] = keys.NORM_ACT
        elif family is NormFamily.INSTANCE:
            attrs["op_key"] = keys.INSTANCE_NORM
        if family is NormFamily.BATCH:
            attrs["track_running_stats"] = bool(getattr(m, "track_running_stats", True))
            attrs["affine"] = bool(getattr(m, "affine", True))
        return OpInfo(OpKind.NORM, f"{family}_norm", norm=NormSpec(family, dep, channels, act, composite),
                      attrs=attrs)

    return rule


def _tracks(m: nn.Module) -> bool:
    return bool(getattr(m, "track_running_stats", True))


if tl is not None:
    for _name, _types in (("silu", (ta.Swish, tme.SwishMe)), ("mish", (ta.Mish, tme.MishMe)),
                          ("sigmoid", (ta.Sigmoid,)), ("tanh", (ta.Tanh,)),
                          ("hardswish", (ta.HardSwish, tme.HardSwishMe)),
                          ("hardsigmoid", (ta.HardSigmoid, tme.HardSigmoidMe)),
                          ("hard_mish", (ta.HardMish, tme.HardMishMe)), ("gelu", (ta.GELU,)),
                          ("gelu_tanh", (ta.GELUTanh,)), ("quick_gelu", (ta.QuickGELU,))):
        register_activation(_name, torch_modules=_types)

    # MetaFormer's StarReLU, s * relu(x)² + b, with its learnable s and b read off the module
    from timm.models.metaformer import StarReLU as _StarReLU

    def _star_relu(x: torch.Tensor, scale: float = 1.0, bias: float = 0.0) -> torch.Tensor:
        return scale * torch.relu(x) ** 2 + bias

    register_activation("star_relu", _star_relu, params={"scale": 1.0, "bias": 0.0}, kinks=(0.0,), scale=None,
                        one_sided=True, torch_modules=(_StarReLU,),
                        module=lambda scale, bias: _StarReLU(scale_value=scale, bias_value=bias))

    # how timm's Linear/Conv subclasses use their weight (netsurgeon.ops.modules)
    register_layer_forward(tl.Linear)
    register_layer_forward(tl.Conv2dSame, same_padding=True)
    register_layer_forward(tl.StdConv2d, tl.ScaledStdConv2d, standardizes_weight=True)
    register_layer_forward(tl.StdConv2dSame, tl.ScaledStdConv2dSame, same_padding=True, standardizes_weight=True)

    @register_module(ta.PReLU)
    def _timm_prelu(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        w = m.weight.detach().flatten().tolist()
        slope: Any = float(w[0]) if len(w) == 1 else tuple(float(v) for v in w)
        return OpInfo(OpKind.ACTIVATION, "prelu", activation=ActivationSpec("prelu", (("negative_slope", slope),)))

    # norm + act composites: kept as callable modules, activation visible in the spec
    register_module(tna.BatchNormAct2d, tna.SyncBatchNormAct)(_norm(NormFamily.BATCH, _tracks, composite=True))
    register_module(tna.FrozenBatchNormAct2d)(_norm(NormFamily.BATCH, False, composite=True))
    register_module(tna.GroupNormAct, tna.GroupNorm1Act)(_norm(NormFamily.GROUP, False, composite=True))
    register_module(tna.LayerNormAct, tna.LayerNormAct2d, tna.LayerNormActFp32, tna.LayerNormAct2dFp32)(
        _norm(NormFamily.LAYER, False, composite=True))
    register_module(tna.RmsNormAct, tna.RmsNormAct2d, tna.RmsNormActFp32, tna.RmsNormAct2dFp32)(
        _norm(NormFamily.RMS, False, composite=True))
    # plain norms with their own forward
    register_module(tn.LayerNorm, tn.LayerNorm2d, tn.LayerNormFp32, tn.LayerNorm2dFp32, tn.LayerNormExp2d)(
        _norm(NormFamily.LAYER, False))
    register_module(tn.GroupNorm, tn.GroupNorm1)(_norm(NormFamily.GROUP, False))
    register_module(tn.RmsNorm, tn.RmsNorm2d, tn.RmsNormFp32, tn.RmsNorm2dFp32,
                    tn.SimpleNorm, tn.SimpleNorm2d, tn.SimpleNormFp32, tn.SimpleNorm2dFp32)(_norm(NormFamily.RMS, False))
    # EvoNorm divides a nonlinear function of x by a statistic of x: no norm-then-activation split
    _evonorm = "EvoNorm: its nonlinearity is built into the normalization; no kernel map"
    register_module(tl.EvoNorm2dB0, tl.EvoNorm2dB1, tl.EvoNorm2dB2)(_norm(NormFamily.OTHER, True, reason=_evonorm))
    register_module(tl.EvoNorm2dS0, tl.EvoNorm2dS0a, tl.EvoNorm2dS1, tl.EvoNorm2dS1a, tl.EvoNorm2dS2,
                    tl.EvoNorm2dS2a)(_norm(NormFamily.OTHER, False, reason=_evonorm))
    # filter response norm: x / rms over the locations of each channel (an RMS instance norm), affine, then
    # its act (Act2d) or a learned threshold max(x, τ) (Tlu2d)
    register_module(tl.FilterResponseNormAct2d)(_norm(NormFamily.INSTANCE, False, composite=True))
    register_module(tl.FilterResponseNormTlu2d)(
        _norm(NormFamily.INSTANCE, False, reason="filter response norm's threshold max(x, τ): no kernel map"))
    register_module(tl.SplitBatchNorm2d)(_norm(NormFamily.BATCH, _tracks))

    @register_module(tl.Conv2dSame, tl.StdConv2d, tl.StdConv2dSame, tl.ScaledStdConv2d, tl.ScaledStdConv2dSame)
    def _timm_conv(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        attrs = conv_attrs(m)
        attrs["module"] = type(m).__name__
        fwd = layer_forward(m)
        attrs["weight_standardized"] = fwd is not None and fwd.standardizes_weight
        attrs["same_padding"] = fwd is not None and fwd.same_padding
        return OpInfo(OpKind.CONV, "conv2d", attrs=attrs)

    @register_module(tl.DropPath, tl.DropBlock2d)
    def _timm_drop(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        return OpInfo(OpKind.IDENTITY, type(m).__name__.lower(),
                      attrs={"module": type(m).__name__, "dropout": float(getattr(m, "drop_prob", 0.0))})

    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    register_module(AvgPool2dSame)(
        lambda m, node, ctx: OpInfo(OpKind.POOL, "avg_pool", attrs={"pool_type": PoolType.AVG}))
    register_module(MaxPool2dSame)(
        lambda m, node, ctx: OpInfo(OpKind.POOL, "max_pool", attrs={"pool_type": PoolType.MAX}))

try:
    from torchvision.ops import StochasticDepth as _TvStochasticDepth
    from torchvision.ops.misc import FrozenBatchNorm2d as _TvFrozenBN

    register_module(_TvFrozenBN)(_norm(NormFamily.BATCH, False))

    @register_module(_TvStochasticDepth)
    def _tv_stochastic_depth(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        # torchvision's drop-path: the identity in eval mode, like timm's DropPath
        return OpInfo(OpKind.IDENTITY, "stochasticdepth", attrs={"module": type(m).__name__, "dropout": float(m.p)})
except Exception:  # noqa: BLE001 - torchvision may be absent or fail to load its ops
    pass
