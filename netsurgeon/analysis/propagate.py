"""Per-node kernel propagation (MATH.md §3): predicted q, q', k, c at every node.

The input pair has mean squares ``q_in`` and cosine ``c``; a whole grid of input
cosines is propagated in one vectorized pass, so the C map from the input to any node
is read off the grid. Alongside, the derivative ``dk_node / dk_in`` at ``c = 1`` is
propagated exactly (chain rule through each op's map), which gives the cumulative
``C'(1) = (dk_node/dk_in) · q_in / q_node``.

Rules (σw² = fan_in · mean(W²), σb² = mean(b²) from the actual parameters):

* linear / conv: ``q ← σw² q + σb²``, ``k ← σw² k + σb²``; exact for linear, 1×1 and
  delta (centre-tap-only) convs, approximate otherwise (spatial mixing);
* activation: the local maps of MATH.md §2 (``netsurgeon.kernels``);
* weighted sum of uncorrelated terms: ``q = Σ w² q_i``, ``k = Σ w² k_i`` (sums of correlated
  terms are found by :mod:`.sums` and measured by the engine instead);
* concatenation: dimension-weighted average; pooling, reshapes, dropout: unchanged;
* per-example norms (layer/group/rms): ``q = gain²``, ``c`` unchanged;
  batch norm in eval mode: the per-channel affine, as a linear map.

Ops without an exact map (max pooling, products of signals, train-mode batch norm,
unknown ops) are tagged unsupported and take measured values when inputs are known.
"""
from __future__ import annotations

import operator

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..ops import OpInfo, OpKind

__all__ = ["NodeKernel", "EXACT", "APPROX", "UNSUPPORTED", "propagate_node"]

EXACT, APPROX, UNSUPPORTED = "exact", "approximate", "unsupported"


@dataclass
class NodeKernel:
    """Predicted kernel quantities at one node, over the grid of input cosines.

    Attributes:
        q: mean square of the first input's features (scalar).
        q2: mean square of the second input's features (scalar).
        k: cross term, one value per grid point.
        dk: ``dk_node / dk_in`` at input ``c = 1``.
        status: ``"exact"``, ``"approximate"`` or ``"unsupported"``.
        reason: why approximate or unsupported.
        dims: feature count per example (for concatenation weights), when known.
    """

    q: float
    q2: float
    k: np.ndarray
    dk: float
    status: str = EXACT
    reason: str = ""
    dims: int | None = None

    @property
    def c(self) -> np.ndarray:
        return self.k / np.sqrt(max(self.q * self.q2, 1e-300))


def _worse(*statuses: str) -> str:
    order = [EXACT, APPROX, UNSUPPORTED]
    return max(statuses, key=order.index)


def _reasons(*parts: str) -> str:
    """The distinct reasons of ``parts`` (each a "; "-joined list), in first-seen order."""
    return "; ".join(dict.fromkeys(r for p in parts if p for r in p.split("; ")))


def weight_stats(weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1, transposed: bool = False
                 ) -> tuple[float, float]:
    """``(σw², σb²)`` with ``σw² = fan_in · mean(W²)`` for PyTorch's ``[out, in/groups, ...]`` layout."""
    w = weight.detach().double()
    if transposed:  # ConvTranspose: [in, out/groups, ...]; each output sees in/groups · k taps on average
        fan_in = w.shape[0] // groups * int(np.prod(w.shape[2:])) if w.dim() > 2 else w.shape[0]
    else:
        fan_in = int(np.prod(w.shape[1:]))
    sw = fan_in * float((w * w).mean())
    sb = float((bias.detach().double() ** 2).mean()) if bias is not None else 0.0
    return sw, sb


def _is_delta(weight: torch.Tensor) -> bool:
    """True when only the centre tap of every kernel is non-zero (delta-initialised conv)."""
    if weight.dim() <= 2 or all(s == 1 for s in weight.shape[2:]):
        return True
    if any(s % 2 == 0 for s in weight.shape[2:]):
        return False
    corner = weight[(slice(None), slice(None)) + (0,) * (weight.dim() - 2)]
    if bool(corner.any()):  # the usual case, decided without touching the whole tensor
        return False
    rest = weight.detach().clone()
    rest[(slice(None), slice(None)) + tuple(s // 2 for s in weight.shape[2:])] = 0
    return not bool(rest.any())


def affine_moments(gm: fx.GraphModule, node: fx.Node, is_signal: Callable[[fx.Node], bool]
                   ) -> tuple[float, float] | None:
    """Mean squares ``(E s², E t²)`` of a per-channel ``s·h + t`` with constant s, t; None if unknown.

    Covers :class:`~netsurgeon.layers.ChannelAffine` and ``h * p`` / ``h.mul(p)`` with a
    parameter or buffer ``p`` (timm's layer scale), possibly reshaped.
    """
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if hasattr(m, "scale") and hasattr(m, "shift"):
            return float(m.scale.detach().double().pow(2).mean()), float(m.shift.detach().double().pow(2).mean())
        return None
    if node.target not in (operator.mul, torch.mul, "mul"):
        return None
    consts = [a for a in node.args if isinstance(a, fx.Node) and not is_signal(a)]
    value = _constant(gm, consts[0]) if len(consts) == 1 else None
    return None if value is None else (float(value.detach().double().pow(2).mean()), 0.0)


def _constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The value of a parameter-only subexpression (``get_attr``, then reshapes/views), or None."""
    if node.op == "get_attr":
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "call_method" and node.target in ("reshape", "view", "unsqueeze", "squeeze", "flatten") \
            and isinstance(node.args[0], fx.Node):
        inner = _constant(gm, node.args[0])
        return None if inner is None else getattr(inner, node.target)(*node.args[1:], **node.kwargs)
    return None


def _layer_stats(m: nn.Module, cache: dict[int, tuple[float, float, bool]] | None) -> tuple[float, float, bool]:
    """``(σ_w², σ_b², is_delta)`` of a layer; ``cache`` (one analysis's, keyed by module id) saves
    re-reading the weights when the analysis runs its second pass."""
    if cache is not None and id(m) in cache:
        return cache[id(m)]
    stats = (*weight_stats(m.weight, getattr(m, "bias", None), getattr(m, "groups", 1),
                           getattr(m, "transposed", False)), _is_delta(m.weight))
    if cache is not None:
        cache[id(m)] = stats
    return stats


def _linear(inp: NodeKernel, sw: float, sb: float, status: str, reason: str) -> NodeKernel:
    return NodeKernel(sw * inp.q + sb, sw * inp.q2 + sb, sw * inp.k + sb, sw * inp.dk,
                      _worse(inp.status, status), _reasons(inp.reason, reason))


def propagate_node(node: fx.Node, info: OpInfo, gm: fx.GraphModule, inputs: list[NodeKernel],
                   activation_maps: Callable[[Any], Any], dims: int | None,
                   cache: dict[int, tuple[float, float, bool]] | None = None) -> NodeKernel | None:
    """Apply the rule of ``info.kind`` to the kernels of the node's signal inputs.

    ``cache``: per-analysis store of layer weight statistics (see ``_layer_stats``).

    Returns None when the node has no rule (the caller then uses measured values).
    """
    kind = info.kind
    if kind in (OpKind.IDENTITY, OpKind.RESHAPE, OpKind.OUTPUT):
        k = inputs[0]
        return NodeKernel(k.q, k.q2, k.k, k.dk, k.status, k.reason, dims)
    if kind is OpKind.POOL:
        k = inputs[0]
        if info.attrs.get("pool_type") in ("avg", "adaptive_avg", "mean"):
            return NodeKernel(k.q, k.q2, k.k, k.dk, _worse(k.status, APPROX),
                              _reasons(k.reason, "average pooling: locations assumed alike"), dims)
        return None
    if kind in (OpKind.LINEAR, OpKind.CONV) and node.op == "call_module":
        m = gm.get_submodule(node.target)
        sw, sb, delta = _layer_stats(m, cache)
        if kind is OpKind.CONV and not delta:
            status, reason = APPROX, "conv spatial mixing: locations assumed alike"
        else:
            status, reason = EXACT, ""
        out = _linear(inputs[0], sw, sb, status, reason)
        out.dims = dims
        return out
    if kind is OpKind.ACTIVATION and info.activation is not None:
        return _activation(activation_maps(info.activation), inputs[0], dims)
    if kind is OpKind.ADD:
        weights = info.attrs.get("weights")
        if weights is None or len(weights) != len(inputs) or any(w is None for w in weights):
            return None
        # A term written ``c * h`` carries c in its own (AFFINE) kernel already: keep only the sign/alpha.
        from ..graph import op_info

        factors = []
        for a in node.all_input_nodes:
            ai = op_info(a)
            factors.append(float(ai.attrs["factor"]) if ai.kind is OpKind.AFFINE and "factor" in ai.attrs else 1.0)
        if len(factors) != len(weights) or any(f == 0 for f in factors):
            return None
        w2 = [(float(w) / f) ** 2 for w, f in zip(weights, factors)]
        return NodeKernel(sum(w * i.q for w, i in zip(w2, inputs)), sum(w * i.q2 for w, i in zip(w2, inputs)),
                          sum(w * i.k for w, i in zip(w2, inputs)), sum(w * i.dk for w, i in zip(w2, inputs)),
                          _worse(*(i.status for i in inputs)), _reasons(*(i.reason for i in inputs)), dims)
    if kind is OpKind.AFFINE and "factor" in info.attrs and len(inputs) == 1:
        f2 = float(info.attrs["factor"]) ** 2
        k = inputs[0]
        return NodeKernel(f2 * k.q, f2 * k.q2, f2 * k.k, f2 * k.dk, k.status, k.reason, dims)
    if kind is OpKind.AFFINE and len(inputs) == 1:
        from ..graph import op_info

        moments = affine_moments(gm, node, lambda a: op_info(a).kind not in (OpKind.CONSTANT, OpKind.META)
                                 and a.op != "get_attr")
        if moments is not None:
            out = _linear(inputs[0], *moments, APPROX, "per-channel scale: channels assumed alike")
            out.dims = dims
            return out
    if kind is OpKind.CONCAT:
        if any(i.dims is None for i in inputs):
            return None
        total = sum(i.dims for i in inputs)
        a = [i.dims / total for i in inputs]
        return NodeKernel(sum(w * i.q for w, i in zip(a, inputs)), sum(w * i.q2 for w, i in zip(a, inputs)),
                          sum(w * i.k for w, i in zip(a, inputs)),
                          sum(w * i.dk * 1.0 for w, i in zip(a, inputs)),
                          _worse(*(i.status for i in inputs)), _reasons(*(i.reason for i in inputs)), dims)
    if kind is OpKind.NORM and node.op == "call_module" and info.norm is not None:
        return _norm(gm.get_submodule(node.target), info, inputs[0], activation_maps, dims)
    return None


def _norm(m: nn.Module, info: OpInfo, k: NodeKernel, activation_maps: Callable[[Any], Any],
          dims: int | None) -> NodeKernel | None:
    spec = info.norm
    if spec.family == "batch":
        if m.training or getattr(m, "running_var", None) is None:
            return None  # batch statistics: no exact map
        var, mean = m.running_var.detach().double(), m.running_mean.detach().double()
        w = m.weight.detach().double() if getattr(m, "weight", None) is not None else torch.ones_like(var)
        b = m.bias.detach().double() if getattr(m, "bias", None) is not None else torch.zeros_like(var)
        s = w / torch.sqrt(var + m.eps)
        t = b - mean * s
        out = _linear(k, float((s * s).mean()), float((t * t).mean()), APPROX,
                      "eval batch norm: channels assumed alike")
    elif spec.family in ("layer", "group", "rms"):
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        g2 = float((w.detach().double() ** 2).mean()) if w is not None else 1.0
        b2 = float((b.detach().double() ** 2).mean()) if b is not None else 0.0
        c = k.k / np.sqrt(k.q * k.q2)
        dk = k.dk * g2 / k.q
        status = _worse(k.status, APPROX) if b2 > 0 or spec.family != "rms" else k.status
        reason = _reasons(k.reason, "per-example norm: centering neglected" if spec.family != "rms" else "")
        out = NodeKernel(g2 + b2, g2 + b2, g2 * c + b2, dk, status, reason)
    elif spec.family == "minimal_rms" and not m.training:  # x / running_rms: a constant scale
        r2 = float(m.running_rms.detach().double()) ** 2
        out = _linear(k, 1.0 / r2, 0.0, EXACT, "")
    else:
        return None
    out.dims = dims
    if spec.activation is not None:  # norm+act composite
        return _activation(activation_maps(spec.activation), out, dims)
    return out


def _activation(maps: Any, k: NodeKernel, dims: int | None) -> NodeKernel | None:
    """The local maps of MATH.md §2 applied to ``k``; None when the activation has no maps."""
    if maps is None:
        return None
    q1, q2 = float(maps.q_map(np.array([k.q]))[0]), float(maps.q_map(np.array([k.q2]))[0])
    bound = np.sqrt(k.q * k.q2)  # rounding or measured values may step outside |k| <= sqrt(q q')
    kout = np.asarray(maps.kernel_map(np.full_like(k.k, k.q), np.full_like(k.k, k.q2),
                                      np.clip(k.k, -bound, bound)), dtype=float)
    # at c = 1 both inputs share q; measured values upstream leave q and q' a little apart
    near = abs(k.q - k.q2) <= 0.05 * max(k.q, k.q2)
    slope = float(maps.kernel_slope_at_one(float(np.sqrt(k.q * k.q2)))) if near else float("nan")
    return NodeKernel(q1, q2, kout, slope * k.dk, k.status, k.reason, dims)
