"""Norm modules recognized by what they compute: Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``,
``MistralRMSNorm``... and a user's own ``RMSNorm`` or channels-last ``LayerNorm`` class.

Such classes are many and unknown in advance, so they are not listed: a module type with a 1-D
``weight`` and an ``eps`` (or ``variance_epsilon``) is run once, on a copy with random weights,
against the two formulas (over the last axis)

- RMS norm: ``x / sqrt(mean(x²) + eps) · w``;
- layer norm: ``(x - mean(x)) / sqrt(var(x) + eps) · w + b``;

and registered as that norm (a leaf, classified ``NORM``) when one matches to float32 rounding.
Anything else keeps being traced through. The check runs once per type; the registration lasts
for the process, as ``netsurgeon.register_module_op`` does.
"""
from __future__ import annotations

import copy
import torch
import torch.fx as fx
import torch.nn as nn

from .kinds import NormFamily, NormSpec, OpInfo, OpKind
from .registry import ClassifyContext, add_module_rule, module_rule

__all__ = ["recognize_activations", "recognize_norms"]

_CHECKED: dict[type, NormFamily | None] = {}


def _eps(m: nn.Module) -> float | None:
    for name in ("eps", "variance_epsilon"):
        v = getattr(m, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
            return float(v)
    return None


def _family(m: nn.Module) -> NormFamily | None:
    """Which norm ``m`` computes over its last axis, from one run of a copy with random weights."""
    w, eps = getattr(m, "weight", None), _eps(m)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or eps is None or w.numel() < 2:
        return None
    trial = copy.deepcopy(m).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trial.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
        x = torch.randn(3, 4, w.numel(), generator=g) * 2.0 + 0.5
        try:
            out = trial(x)
        except Exception:  # not a plain tensor -> tensor module
            return None
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            return None
        weight = trial.weight
        bias = getattr(trial, "bias", None)
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
        centered = x - x.mean(-1, keepdim=True)
        layer = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * weight
        if isinstance(bias, torch.Tensor) and bias.shape == weight.shape:
            layer = layer + bias
        if bias is None and torch.allclose(out, rms, rtol=1e-4, atol=1e-5):
            return NormFamily.RMS
        if torch.allclose(out, layer, rtol=1e-4, atol=1e-5):
            return NormFamily.LAYER
    return None


def _rule(family: NormFamily):
    def rule(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        return OpInfo(OpKind.NORM, f"{family}_norm", norm=NormSpec(family, False, int(m.weight.numel())),
                      attrs={"module": type(m).__name__, "recognized": True})
    return rule


def recognize_norms(model: nn.Module) -> list[str]:
    """Register the norm classes inside ``model`` that no rule covers but that compute an RMS or a
    layer norm over the last axis; returns ``"Class (family)"`` for the newly registered ones."""
    return _recognize(model, _CHECKED, _family, _rule, lambda family: str(family))


def _recognize(model: nn.Module, checked: dict, identify, rule_for, label) -> list[str]:
    """One pass over ``model``'s module types outside torch that no rule covers: ``identify`` (run
    once per type, remembered in ``checked``) says what a type computes, or None; a type that computes
    something gets ``rule_for(it)``. Returns ``"Class (label)"`` for the types registered now."""
    found = []
    for m in model.modules():
        t = type(m)
        if t in checked or module_rule(m) is not None or t.__module__.startswith("torch."):
            continue
        what = identify(m)
        checked[t] = what
        if what is not None:
            add_module_rule(t, rule_for(what))
            found.append(f"{t.__name__} ({label(what)})")
    return found


# ---------------------------------------------------------------------------------------------- activations
# Parameter-free activation classes outside torch (Hugging Face's NewGELUActivation, GELUActivation,
# SiLUActivation..., a user's own): one run against the activations a prototype module computes.
def _prototypes() -> list[nn.Module]:
    protos: list[nn.Module] = [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh(), nn.Sigmoid(),
                               nn.Mish(), nn.Softplus(), nn.ELU(), nn.Hardswish(), nn.Hardsigmoid(), nn.ReLU6()]
    try:
        from timm.layers.activations import QuickGELU
        protos.append(QuickGELU())
    except ImportError:  # timm is a base dependency; a trimmed install only loses quick_gelu here
        pass
    return protos


_ACT_CHECKED: dict[type, nn.Module | None] = {}


_MODULE_STATE = frozenset(vars(nn.Module()))


def _same_activation(m: nn.Module) -> nn.Module | None:
    """The prototype whose values ``m`` reproduces on random inputs, else None. Only classes whose
    instances hold no state of their own qualify: an ``Act(kind)`` class computes what its instance
    says, so its type cannot stand for one activation. Boolean flags (``inplace``, Hugging Face's
    ``_is_hf_initialized``) do not change the values."""
    if any(True for _ in m.parameters()) or any(True for _ in m.buffers()) or any(True for _ in m.children()):
        return None
    if any(not isinstance(v, bool) for k, v in vars(m).items() if k not in _MODULE_STATE):  # flags allowed
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) * 3.0
    try:
        with torch.no_grad():
            out = copy.deepcopy(m)(x.clone())
    except Exception:  # takes other arguments, or is not elementwise
        return None
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None
    for proto in _prototypes():
        with torch.no_grad():
            ref = proto.double()(x.clone())
        if torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-7):
            return proto if module_rule(proto) is not None else None
    return None


def _as(proto: nn.Module):
    rule = module_rule(proto)

    def recognized(m: nn.Module, node: fx.Node, ctx: ClassifyContext) -> OpInfo:
        info = rule(proto, node, ctx)
        return OpInfo(info.kind, info.name, activation=info.activation,
                      attrs={**info.attrs, "module": type(m).__name__, "recognized": True})
    return recognized


def recognize_activations(model: nn.Module) -> list[str]:
    """Register the parameter-free activation classes inside ``model`` that no rule covers but that
    compute a known activation elementwise; returns ``"Class (activation)"`` for the new ones."""
    return _recognize(model, _ACT_CHECKED, _same_activation, _as, lambda proto: f"as {proto!r}")
