"""Per-node kernel propagation (docs/theory.md §3): predicted q, q', k, c at every node.

The input pair has mean squares ``q_in`` and cosine ``c``; a whole grid of input
cosines is propagated in one vectorized pass, so the C map from the input to any node
is read off the grid. Alongside, the derivative ``dk_node / dk_in`` at ``c = 1`` is
propagated exactly (chain rule through each op's map), which gives the cumulative
``C'(1) = (dk_node/dk_in) · q_in / q_node``.

Rules (σw² = fan_in · mean(W²), σb² = mean(b²) from the actual parameters):

* linear / conv: ``q ← σw² q + σb²``, ``k ← σw² k + σb²``; exact for linear, 1×1 and
  delta (centre-tap-only) convs, approximate otherwise (spatial mixing);
* activation: the local maps of docs/theory.md §2 (``netsurgeon.kernels``);
* weighted sum of uncorrelated terms: ``q = Σ w² q_i``, ``k = Σ w² k_i`` (sums of correlated
  terms are found by :mod:`.sums` and measured by the engine instead);
* concatenation: dimension-weighted average; pooling, reshapes, dropout: unchanged;
* per-example norms (layer/group/rms): ``q = gain²``, ``c`` unchanged;
  batch norm in eval mode: the per-channel affine, as a linear map.

Ops without an exact map (max pooling, products of signals, train-mode batch norm,
unknown ops) are tagged unsupported and take measured values when inputs are known.

Each kind's rule is registered with ``@kernel_rule`` (:mod:`.rules`); a module type
registered with ``netsurgeon.register_module_op`` brings its own, which comes first.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..ops import NormFamily, OpInfo, OpKind, batch_norm_affine, dense_weights, pool_type
from .affine import AffineMap, affine_map, affine_moments, signal_nodes
from .rules import (APPROX, EXACT, KERNEL_RULES, UNSUPPORTED, KernelContext, NodeKernel, kernel_rule, reasons,
                    worse)

__all__ = ["AffineMap", "NodeKernel", "EXACT", "APPROX", "UNSUPPORTED", "affine_map", "affine_moments",
           "activation_kernel", "propagate_node", "signal_nodes", "weight_stats"]

_worse, _reasons = worse, reasons  # the names earlier code and tests import


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


def propagate_node(node: fx.Node, info: OpInfo, gm: fx.GraphModule, inputs: list[NodeKernel],
                   activation_maps: Callable[[Any], Any], dims: int | None,
                   cache: dict[int, tuple[float, float, bool]] | None = None) -> NodeKernel | None:
    """Apply the node's kernel rule (its module type's, else its kind's) to the kernels of its
    signal inputs.

    ``cache``: per-analysis store of layer weight statistics (see ``_layer_stats``).

    Returns None when the node has no rule (the caller then uses measured values).
    """
    ctx = KernelContext(node, info, gm, dims, activation_maps, cache)
    rule = KERNEL_RULES.find(info, ctx.module)
    out = rule(ctx, inputs) if rule is not None else None
    if out is not None:
        out.dims = dims
    return out


@kernel_rule(*(kind for kind in OpKind if kind.traits.unchanged))
def _unchanged(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel:
    """Reshapes, dropout, the output: q and k pass through."""
    k = inputs[0]
    return NodeKernel(k.q, k.q2, k.k, k.dk, k.status, k.reason)


@kernel_rule(OpKind.POOL)
def _pool(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """Average pooling: unchanged, with locations assumed alike; other pools have no map."""
    kind = pool_type(ctx.info)
    if kind is None or not kind.averages:
        return None
    k = inputs[0]
    n = _global_pool_size(ctx.node)
    if n is not None:  # one value per channel from n locations (docs/theory.md §3.5)
        # the kernel of independent inputs is |E h|² >= 0 (measured values upstream can dip below)
        k0 = max(0.0, float(np.interp(0.0, np.linspace(-1.0, 1.0, len(k.k)), k.k)))
        return NodeKernel(k.q / n + (1 - 1 / n) * k0, k.q2 / n + (1 - 1 / n) * k0, k.k / n + (1 - 1 / n) * k0,
                          k.dk / n, worse(k.status, APPROX),
                          reasons(k.reason, "global average pooling: distinct locations taken as independent inputs"))
    return NodeKernel(k.q, k.q2, k.k, k.dk, worse(k.status, APPROX),
                      reasons(k.reason, "average pooling: locations assumed alike"))


def _global_pool_size(node: fx.Node) -> int | None:
    """``n`` when ``node`` averages each channel over all its ``n > 1`` locations (``[B, C, *S]`` or
    ``[B, *S, C]`` to one value per channel), from the shapes of an example run; else None."""
    src = node.all_input_nodes[0] if node.all_input_nodes else None
    tin = src.meta.get("tensor_meta") if src is not None else None
    tout = node.meta.get("tensor_meta")
    if not (hasattr(tin, "shape") and hasattr(tout, "shape")) or len(tin.shape) < 3 or len(tout.shape) < 2:
        return None
    per_in, per_out = int(np.prod(tin.shape[1:])), int(np.prod(tout.shape[1:]))
    if per_out not in (int(tin.shape[1]), int(tin.shape[-1])) or per_out == 0 or per_in % per_out:
        return None
    n = per_in // per_out
    return n if n > 1 else None


@kernel_rule(OpKind.LINEAR, OpKind.CONV)
def _layer(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """``q ← σw² q + σb²`` from the layer's own weights: a module's, or the parameters of a functional
    dense layer (``F.linear``, ``addmm``: :func:`~netsurgeon.ops.dense_weights`); other functional
    layers have no map."""
    dense = dense_weights(ctx.gm, ctx.node)
    if dense is not None:
        w, b = dense
        cache = ctx.cache if ctx.cache is not None else {}
        key = id(w._base if w._base is not None else w)  # the parameter (a module's key is the module: no clash)
        if key not in cache:
            cache[key] = (*weight_stats(w, b), True)
        return inputs[0].linear(*cache[key][:2], EXACT, "")
    m = ctx.module
    if m is None:
        return None
    sw, sb, delta = _layer_stats(m, ctx.cache)
    if ctx.info.kind is OpKind.CONV and not delta:
        return inputs[0].linear(sw, sb, APPROX, "conv spatial mixing: locations assumed alike")
    return inputs[0].linear(sw, sb, EXACT, "")


@kernel_rule(OpKind.ACTIVATION)
def _activation_rule(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    if ctx.info.activation is None:
        return None
    return _activation(ctx.activation_maps(ctx.info.activation), inputs[0], ctx.dims)


@kernel_rule(OpKind.ADD)
def _add(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """Weighted sum of uncorrelated terms: ``q = Σ w² q_i``, ``k = Σ w² k_i``."""
    weights = ctx.info.attrs.get("weights")
    if weights is None or len(weights) != len(inputs) or any(w is None for w in weights):
        return None
    # A term written ``c * h`` carries c in its own (AFFINE) kernel already: keep only the sign/alpha.
    from ..graph import op_info

    factors = [1.0 if op_info(a).constant_factor is None else op_info(a).constant_factor
               for a in ctx.node.all_input_nodes]
    if len(factors) != len(weights) or any(f == 0 for f in factors):
        return None
    w2 = [(float(w) / f) ** 2 for w, f in zip(weights, factors)]
    return NodeKernel(sum(w * i.q for w, i in zip(w2, inputs)), sum(w * i.q2 for w, i in zip(w2, inputs)),
                      sum(w * i.k for w, i in zip(w2, inputs)), sum(w * i.dk for w, i in zip(w2, inputs)),
                      worse(*(i.status for i in inputs)), reasons(*(i.reason for i in inputs)))


@kernel_rule(OpKind.AFFINE)
def _affine(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """``c · h``: q and k times c²; a constant scale s and shift t read from the model:
    ``q ← E[s²] q + E[t²]``, ``k ← E[s²] k + E[t²]`` (see :class:`AffineMap` for when it is exact)."""
    if len(inputs) != 1:
        return None
    k = inputs[0]
    factor = ctx.info.constant_factor
    if factor is not None:
        f2 = factor ** 2
        return NodeKernel(f2 * k.q, f2 * k.q2, f2 * k.k, f2 * k.dk, k.status, k.reason)
    signals = signal_nodes(ctx.gm)
    found = affine_map(ctx.gm, ctx.node, signals.__contains__)
    return None if found is None else k.linear(*found.moments, *found.status)


@kernel_rule(OpKind.CONCAT)
def _concat(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """Dimension-weighted average of the parts."""
    if any(i.dims is None for i in inputs):
        return None
    total = sum(i.dims for i in inputs)
    a = [i.dims / total for i in inputs]
    return NodeKernel(sum(w * i.q for w, i in zip(a, inputs)), sum(w * i.q2 for w, i in zip(a, inputs)),
                      sum(w * i.k for w, i in zip(a, inputs)), sum(w * i.dk * 1.0 for w, i in zip(a, inputs)),
                      worse(*(i.status for i in inputs)), reasons(*(i.reason for i in inputs)))


@kernel_rule(OpKind.NORM)
def _norm_rule(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    m = ctx.module
    if m is None or ctx.info.norm is None:
        return None
    return _norm(m, ctx.info, inputs[0], ctx.activation_maps, ctx.dims)


def _norm(m: nn.Module, info: OpInfo, k: NodeKernel, activation_maps: Callable[[Any], Any],
          dims: int | None) -> NodeKernel | None:
    spec = info.norm
    if spec.family is NormFamily.BATCH:
        if m.training or getattr(m, "running_var", None) is None:
            return None  # batch statistics: no exact map
        s, t = batch_norm_affine(m)
        out = k.linear(float((s * s).mean()), float((t * t).mean()), APPROX, "eval batch norm: channels assumed alike")
    elif spec.family.per_example:
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        g2 = float((w.detach().double() ** 2).mean()) if w is not None else 1.0
        b2 = float((b.detach().double() ** 2).mean()) if b is not None else 0.0
        if not (k.q > 0 and k.q2 > 0):  # a zero input normalizes to zero: only the shift is left
            out = NodeKernel(b2, b2, np.full_like(k.k, b2), 0.0, worse(k.status, APPROX),
                             reasons(k.reason, "per-example norm of a zero input: its shift alone"))
            out.dims = dims
            return _activation(activation_maps(spec.activation), out, dims) if spec.activation is not None else out
        c = k.k / np.sqrt(k.q * k.q2)
        dk = k.dk * g2 / k.q
        status = worse(k.status, APPROX) if b2 > 0 or spec.family is not NormFamily.RMS else k.status
        reason = reasons(k.reason, "per-example norm: centering neglected" if spec.family is not NormFamily.RMS else "")
        out = NodeKernel(g2 + b2, g2 + b2, g2 * c + b2, dk, status, reason)
    elif spec.family is NormFamily.MINIMAL_RMS and not m.training:  # x / running_rms: a constant scale
        r2 = float(m.running_rms.detach().double()) ** 2
        out = k.linear(1.0 / r2, 0.0, EXACT, "")
    else:
        return None
    out.dims = dims
    if spec.activation is not None:  # norm+act composite
        return _activation(activation_maps(spec.activation), out, dims)
    return out


def activation_kernel(maps: Any, q1: np.ndarray, q2: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``E φ(u) φ(v)`` for ``E u² = q1``, ``E v² = q2``, ``E uv = k`` (arrays alike), ``k`` first clipped to
    ``|k| <= sqrt(q1 q2)``: rounding or measured values upstream may step outside it."""
    bound = np.sqrt(np.abs(q1 * q2))
    return np.asarray(maps.kernel_map(q1, q2, np.clip(k, -bound, bound)), dtype=float)


def _activation(maps: Any, k: NodeKernel, dims: int | None) -> NodeKernel | None:
    """The local maps of docs/theory.md §2 applied to ``k``; None when the activation has no maps."""
    if maps is None:
        return None
    q1, q2 = float(maps.q_map(np.array([k.q]))[0]), float(maps.q_map(np.array([k.q2]))[0])
    kout = activation_kernel(maps, np.full_like(k.k, k.q), np.full_like(k.k, k.q2), k.k)
    # at c = 1 both inputs share q; measured values upstream leave q and q' a little apart
    near = abs(k.q - k.q2) <= 0.05 * max(k.q, k.q2)
    slope = float(maps.kernel_slope_at_one(float(np.sqrt(k.q * k.q2)))) if near else float("nan")
    return NodeKernel(q1, q2, kout, slope * k.dk, k.status, k.reason, dims)
