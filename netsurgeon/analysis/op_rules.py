"""Kernel rules (docs/theory.md §3) and DKS-target rules (§4.4) for the common ops that are
neither layers nor activations: padding, resampling, ``F.normalize``, patch (un)folding, tuple
outputs (recurrent modules, ``topk``, ``x.max(dim)``), instance norms and norm+activation
composites. Each rule is keyed by the op key its classification rule stores
(:mod:`netsurgeon.ops.torch_ops.keys`); the constant scales and shifts of ``AFFINE`` nodes are
read by :func:`.affine.affine_map`.

What each rule assumes (reported as the node's reason when it is approximate):

* padding: zero, reflect, replicate, circular: q and c unchanged. Exact for zero pad widths;
  otherwise the padded locations are taken to be like the signal's, as the conv rule does for a
  conv's own zero padding (a delta conv after the pad sees the signal only). A non-zero constant
  has no map.
* interpolation: nearest with integer upscale factors copies every location equally often:
  exact. Otherwise each output location is a weighted sum of input locations, which are taken
  as independent inputs (as for global average pooling): ``q ← s q + (1 - s) k0`` with ``s``
  the mean sum of squared weights and ``k0`` the kernel at input cosine 0.
* ``F.normalize(x, p=2, dim)``: every vector along ``dim`` has unit norm, so ``q = 1/n``
  exactly (``n`` its length); the cosine is unchanged, exactly when the vector is the whole
  example, else with locations assumed alike.
* unfold: a rearrangement of the input's locations; exact for non-overlapping patches that
  tile it, else locations assumed alike. Fold sums the entries that land on each location:
  ``q ← mean(count) q`` with the entries assumed uncorrelated and alike, exact when every
  location receives exactly one entry.
* tuple outputs: the op's value is no tensor; the elements taken from it (``getitem``) are
  measured (docs/theory.md §3.7) and the DKS targets keep the op kind's rule.
* instance norms (``nn.InstanceNorm*``, timm's filter response norms): each channel of each
  example normalized over its locations: ``q = mean(γ²) + mean(β²)``, c unchanged, channels
  assumed alike (centering neglected where there is one).
* norm+activation composites (timm's ``GroupNormAct``, ``LayerNormAct2d``, ``RmsNormAct``,
  ``FilterResponseNormAct2d``...): the norm's rule, then the activation's local maps; for the
  DKS targets the norm resets q to 1 and the composite's ``.act`` is the activation the ``dks``
  and ``tat`` passes reshape.

Example:
    >>> import torch, torch.nn as nn, torch.nn.functional as F, netsurgeon
    >>> class M(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(16, 16)
    ...     def forward(self, x):
    ...         return F.normalize(self.fc(x), dim=1)
    >>> a = netsurgeon.analyze(M(), torch.randn(4, 16))
    >>> round(a.q("normalize"), 6), a.status("normalize")[0]
    (0.0625, 'exact')
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import UnsupportedNodeError
from ..ops import NormFamily, OpKind, batch_norm_affine
from ..ops.torch_ops import keys
from .ideal_rules import _Q_TOL, NO_RULE, IdealRule, _pass_through, norm_family_problem
from .propagate import _activation, _norm
from .rules import APPROX, EXACT, IDEAL_RULES, KERNEL_RULES, KernelContext, KernelRule, NodeKernel, reasons, worse

__all__ = ["composite_activation"]

IdealGraph = Any  # netsurgeon.analysis.targets.IdealGraph (imports this package's rules)
Apply = Callable[..., "tuple[float, float]"]  # an IdealRule's apply


def _kernel(key: str) -> Callable[[KernelRule], KernelRule]:
    """Register the decorated function as the kernel rule of op key ``key``."""
    def deco(rule: KernelRule) -> KernelRule:
        KERNEL_RULES.add(key, rule)
        return rule
    return deco


def _ideal(key: str, check: Callable[..., str | None] | None = None) -> Callable[[Apply], Apply]:
    """Register the decorated ``apply`` (with ``check``) as the DKS-target rule of op key ``key``."""
    def deco(apply: Apply) -> Apply:
        IDEAL_RULES.add(key, IdealRule(apply, check))
        return apply
    return deco


def _shape(node: Any) -> tuple[int, ...] | None:
    """A node's recorded output shape (``tensor_meta``, from a run on example inputs), or None."""
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in tm.shape) if hasattr(tm, "shape") else None


def _same(k: NodeKernel, status: str, reason: str) -> NodeKernel:
    """q, q' and k passed on, ``status``/``reason`` joined with the input's."""
    return NodeKernel(k.q, k.q2, k.k, k.dk, worse(k.status, status), reasons(k.reason, reason))


def _scaled(k: NodeKernel, f: float, status: str, reason: str) -> NodeKernel:
    return NodeKernel(f * k.q, f * k.q2, f * k.k, f * k.dk, worse(k.status, status), reasons(k.reason, reason))


def _ints(x: Any, n: int) -> tuple[int, ...] | None:
    """``x`` as ``n`` ints (an int repeated), or None."""
    if isinstance(x, int) and not isinstance(x, bool):
        return (x,) * n
    if isinstance(x, (tuple, list)) and len(x) == n and all(isinstance(i, int) for i in x):
        return tuple(x)
    return None


# ---------------------------------------------------------------- padding
@_kernel(keys.PAD)
def _pad(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """Zero, reflect, replicate or circular padding: unchanged (see the module docstring)."""
    a = ctx.info.attrs
    mode, value, pad = a.get("mode", "constant"), a.get("value", 0.0), a.get("pad")
    if mode == "constant" and not (isinstance(value, (int, float)) and value == 0):
        return None  # a non-zero constant: its own locations change q and c
    if isinstance(pad, (tuple, list)) and all(isinstance(p, int) and p == 0 for p in pad):
        return _same(inputs[0], EXACT, "")
    why = ("zero padding: padded zeros not counted, locations assumed alike (as for a conv's own padding)"
           if mode == "constant" else f"{mode} padding repeats border locations: locations assumed alike")
    return _same(inputs[0], APPROX, why)


def _pad_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    a = d["info"].attrs
    if a.get("mode", "constant") == "constant" and not (isinstance(a.get("value"), (int, float)) and a["value"] == 0):
        return f"padding with the constant {a.get('value')}: its locations change q and c; no kernel map"
    return None


IDEAL_RULES.add(keys.PAD, IdealRule(_pass_through, _pad_check))


# ---------------------------------------------------------------- resampling
def _scale_factors(node: fx.Node, attrs: dict) -> list[float] | None:
    """The spatial scale factors, from the op's arguments or the recorded shapes."""
    scale = attrs.get("scale_factor")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        src = _shape(node.args[0]) if node.args else None
        return [float(scale)] * (len(src) - 2 if src is not None else 1)
    if isinstance(scale, (tuple, list)) and all(isinstance(s, (int, float)) for s in scale):
        return [float(s) for s in scale]
    src, out = (_shape(node.args[0]) if node.args else None), _shape(node)
    if src is None or out is None or len(src) != len(out) or len(src) < 3:
        return None
    return [o / i for i, o in zip(src[2:], out[2:])]


@_kernel(keys.INTERPOLATE)
def _interpolate(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel:
    """Nearest with integer upscale factors copies locations equally often (exact). Otherwise each
    output location is ``Σ_i w_i h_i`` over input locations; with distinct locations taken as
    independent inputs (their kernel is the one at input cosine 0, ``k0``, as for global pooling)
    ``q ← s q + (1 - s) k0``, ``k ← s k + (1 - s) k0`` with ``s`` the mean of ``Σ_i w_i²``."""
    a, k = ctx.info.attrs, inputs[0]
    mode = a.get("mode") or "nearest"
    factors = _scale_factors(ctx.node, a)
    if mode in ("nearest", "nearest-exact") and factors and all(f >= 1 and float(f).is_integer() for f in factors):
        return _same(k, EXACT, "")
    src, out = (_shape(ctx.node.args[0]) if ctx.node.args else None), _shape(ctx.node)
    s = None
    if src is not None and out is not None and len(src) == len(out) >= 3:
        s = _interpolation_weight2(str(mode), tuple(src[2:]), tuple(out[2:]), a.get("align_corners"),
                                   bool(a.get("antialias")))
    if s is None:
        return _same(k, APPROX, f"{mode} interpolation: locations assumed alike (no shapes to weigh them)")
    k0 = float(np.interp(0.0, np.linspace(-1.0, 1.0, len(k.k)), k.k))
    return NodeKernel(s * k.q + (1 - s) * k0, s * k.q2 + (1 - s) * k0, s * k.k + (1 - s) * k0, s * k.dk,
                      worse(k.status, APPROX),
                      reasons(k.reason, f"{mode} interpolation: distinct locations taken as independent inputs"))


# Under the DKS assumptions resampling passes q through, as average pooling does (locations alike).
IDEAL_RULES.add(keys.INTERPOLATE, IdealRule(_pass_through))


@functools.lru_cache(maxsize=64)
def _interpolation_weight2(mode: str, src: tuple[int, ...], out: tuple[int, ...], align_corners: Any,
                           antialias: bool) -> float | None:
    """The mean over output locations of ``Σ_i w_i²`` (``w`` the weights on the input locations) of
    ``F.interpolate``, a product over the axes (every mode is separable): each axis's weight matrix
    comes from resampling unit impulses along that axis alone."""
    total = 1.0
    for axis, (n_in, n_out) in enumerate(zip(src, out)):
        sq = 0.0
        for start in range(0, n_in, 256):  # impulses as channels, a block at a time
            eye = torch.eye(n_in, dtype=torch.float64)[start:start + 256]
            shape = [1, eye.shape[0]] + [n_in if d == axis else 1 for d in range(len(src))]
            size = [n_out if d == axis else 1 for d in range(len(src))]
            kwargs: dict[str, Any] = {"mode": mode}
            if mode in ("linear", "bilinear", "bicubic", "trilinear"):
                kwargs["align_corners"] = align_corners
            if antialias:
                kwargs["antialias"] = True
            try:
                y = F.interpolate(eye.reshape(shape), size=size, **kwargs)
            except (RuntimeError, ValueError, NotImplementedError):  # a mode torch cannot resample one axis at
                return None  # a time: no rule, so the engine measures the node (its reason says so)
            sq += float(y.pow(2).sum())
        total *= sq / n_out
    return total


# ---------------------------------------------------------------- F.normalize
def _normalized(node: fx.Node, attrs: dict) -> tuple[int, bool] | None:
    """``(n, whole)``: the length of the normalized vectors, and whether each is a whole example."""
    shape = _shape(node.args[0]) if node.args else None
    shape = shape or _shape(node)
    dim = attrs.get("dim", 1)
    if shape is None or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
        return None
    dim %= len(shape)
    if dim == 0:
        return None  # across the batch: not a per-example map
    n = shape[dim]
    return n, n == math.prod(shape[1:])


def _normalize_problem(attrs: dict, node: fx.Node) -> str | None:
    if attrs.get("p", 2.0) != 2:
        return f"normalize with p = {attrs.get('p')}: no kernel map (only p = 2)"
    if _normalized(node, attrs) is None:
        return (f"normalize over dim {attrs.get('dim')}: its length there is unknown (pass example_inputs) "
                f"or it is the batch dim")
    return None


@_kernel(keys.NORMALIZE)
def _normalize(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """``x / ||x||`` along ``dim``: ``q = 1/n``, ``k = c/n``, ``dk ← dk / (n √(q q'))``."""
    if _normalize_problem(ctx.info.attrs, ctx.node) is not None:
        return None
    n, whole = _normalized(ctx.node, ctx.info.attrs)
    k = inputs[0]
    s = n * math.sqrt(max(k.q * k.q2, 1e-300))
    status, why = (EXACT, "") if whole else (APPROX, "unit norm per location: locations assumed alike")
    return NodeKernel(1.0 / n, 1.0 / n, k.k / s, k.dk / s, worse(k.status, status), reasons(k.reason, why))


@_ideal(keys.NORMALIZE, check=lambda graph, node, d: _normalize_problem(d["info"].attrs, node))
def _normalize_ideal(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
                     v: dict[str, float], act: Any) -> tuple[float, float]:
    """q becomes ``1/n`` whatever it was; the value passes (the cosine is kept)."""
    return 1.0 / _normalized(node, d["info"].attrs)[0], v[ins[0]]


# ---------------------------------------------------------------- unfold / fold
@_kernel(keys.UNFOLD)
def _unfold(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel:
    """Patches of locations, as columns: exact for non-overlapping patches that tile the input."""
    a, shape = ctx.info.attrs, _shape(ctx.node.args[0]) if ctx.node.args else None
    ks, stride = _ints(a.get("kernel_size"), 2), _ints(a.get("stride"), 2)
    tiles = (ks is not None and ks == stride and _ints(a.get("padding"), 2) == (0, 0)
             and _ints(a.get("dilation"), 2) == (1, 1) and shape is not None and len(shape) == 4
             and shape[2] % ks[0] == 0 and shape[3] % ks[1] == 0)
    if tiles:
        return _same(inputs[0], EXACT, "")
    return _same(inputs[0], APPROX, "unfold: overlapping, padded or partial patches; locations assumed alike")


def _fold_counts(attrs: dict) -> torch.Tensor | None:
    """How many entries land on each output location (``F.fold`` of ones), or None."""
    out, ks = _ints(attrs.get("output_size"), 2), _ints(attrs.get("kernel_size"), 2)
    dil, pad, stride = (_ints(attrs.get(n), 2) for n in ("dilation", "padding", "stride"))
    if None in (out, ks, dil, pad, stride):
        return None
    blocks = [(o + 2 * p - d * (k - 1) - 1) // s + 1 for o, p, d, k, s in zip(out, pad, dil, ks, stride)]
    if min(blocks) < 1:
        return None
    ones = torch.ones(1, ks[0] * ks[1], blocks[0] * blocks[1], dtype=torch.float64)
    return F.fold(ones, out, ks, dilation=dil, padding=pad, stride=stride)


@_kernel(keys.FOLD)
def _fold(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """Sums of the entries landing on each location: ``q ← mean(count) q``."""
    counts = _fold_counts(ctx.info.attrs)
    if counts is None:
        return None
    a = ctx.info.attrs
    if bool((counts == 1).all()) and _ints(a.get("padding"), 2) == (0, 0):
        return _same(inputs[0], EXACT, "")
    return _scaled(inputs[0], float(counts.mean()), APPROX,
                   "fold sums overlapping patches: the summed entries assumed uncorrelated and alike")


# ---------------------------------------------------------------- tuple outputs
@_kernel(keys.TUPLE_OUTPUT)
def _tuple_output(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel:
    """No single tensor: no values here (the elements taken from it are measured)."""
    nan = float("nan")
    return NodeKernel(nan, nan, np.full_like(inputs[0].k, nan), nan, APPROX,
                      "tuple output: no single tensor; the elements taken from it are measured")


@_kernel(keys.TUPLE_ITEM)
def _tuple_item(ctx: KernelContext, inputs: list[NodeKernel]) -> None:
    """An element of a tuple output has no rule: the engine measures it."""
    return None


def _kind_rule(d: dict) -> IdealRule:
    rule = IDEAL_RULES.for_kind(d["kind"])
    return rule if rule is not None else NO_RULE


def _tuple_output_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    """The op kind's check (an LSTM has no rule, ``nn.MultiheadAttention`` is a product...)."""
    check = _kind_rule(d).check
    return None if check is None else check(graph, node, d)


@_ideal(keys.TUPLE_OUTPUT, check=_tuple_output_check)
def _tuple_output_ideal(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
                        v: dict[str, float], act: Any) -> tuple[float, float]:
    return _kind_rule(d).apply(graph, node, d, ins, q, v, act)


IDEAL_RULES.add(keys.TUPLE_ITEM, IdealRule(_pass_through))  # the tuple op itself is checked


# ---------------------------------------------------------------- instance norms
def _instance(m: Any, info: Any, k: NodeKernel) -> NodeKernel | None:
    """Each channel normalized over its locations, then ``γ x + β`` per channel."""
    if getattr(m, "tau", None) is not None:
        return None  # filter response norm's threshold max(x, τ)
    if getattr(m, "track_running_stats", False) and getattr(m, "running_var", None) is not None and not m.training:
        s, t = batch_norm_affine(m)
        return k.linear(float((s * s).mean()), float((t * t).mean()), APPROX,
                        "eval instance norm with running statistics: channels assumed alike")
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    g2 = float(w.detach().double().pow(2).mean()) if w is not None else 1.0
    b2 = float(b.detach().double().pow(2).mean()) if b is not None else 0.0
    c = k.k / math.sqrt(max(k.q * k.q2, 1e-300))
    centred = not type(m).__name__.startswith("FilterResponseNorm")  # FRN divides by the rms, no centering
    why = "instance norm: channels assumed alike" + ("; centering neglected" if centred else "")
    return NodeKernel(g2 + b2, g2 + b2, g2 * c + b2, k.dk * g2 / k.q, worse(k.status, APPROX), reasons(k.reason, why))


@_kernel(keys.INSTANCE_NORM)
def _instance_rule(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    return None if ctx.module is None else _instance(ctx.module, ctx.info, inputs[0])


def _eps(graph: IdealGraph, node: fx.Node) -> float:
    return float(getattr(graph.topo.gm.get_submodule(node.target), "eps", 0.0)) if node.op == "call_module" else 0.0


def _instance_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    m = graph.topo.gm.get_submodule(node.target) if node.op == "call_module" else None
    if m is not None and getattr(m, "tau", None) is not None:
        return d["info"].attrs.get("reason", "threshold max(x, τ): no kernel map")
    return None


@_ideal(keys.INSTANCE_NORM, check=_instance_check)
def _instance_ideal(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
                    v: dict[str, float], act: Any) -> tuple[float, float]:
    """Like a per-example norm: q reset to 1 (``q / (q + eps)``), value unchanged."""
    return q[ins[0]] / (q[ins[0]] + _eps(graph, node)), v[ins[0]]


# ---------------------------------------------------------------- norm+activation composites
@_kernel(keys.NORM_ACT)
def _norm_act(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """The norm's rule, then the local maps of its activation."""
    m, spec = ctx.module, ctx.info.norm
    if m is None or spec is None:
        return None
    if spec.family is not NormFamily.INSTANCE:
        return _norm(m, ctx.info, inputs[0], ctx.activation_maps, ctx.dims)
    out = _instance(m, ctx.info, inputs[0])
    if out is None or spec.activation is None:
        return out
    return _activation(ctx.activation_maps(spec.activation), out, ctx.dims)


def _norm_act_check(graph: IdealGraph, node: fx.Node, d: dict) -> str | None:
    problem = norm_family_problem(d["info"])
    if problem is not None:
        return problem
    act = d["info"].norm.activation
    if act is None or act.name == "identity":
        return None
    if act.name.startswith("unknown:"):
        return f"norm+activation composite: its activation {act.name[8:]} is not identified"
    module = graph.topo.gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(getattr(module, "act", None), torch.nn.Module):
        return "norm+activation composite without an .act module: its activation cannot be reshaped"
    return None


@_ideal(keys.NORM_ACT, check=_norm_act_check)
def _norm_act_ideal(graph: IdealGraph, node: fx.Node, d: dict, ins: list[str], q: dict[str, float],
                    v: dict[str, float], act: Any) -> tuple[float, float]:
    """The norm resets q to 1 (``q / (q + eps)``); its activation then applies the caller's rule."""
    first = ins[0]
    q_norm = q[first] / (q[first] + _eps(graph, node))
    spec = d["info"].norm.activation
    if spec is None or spec.name == "identity":
        return q_norm, v[first]
    if abs(q_norm - 1.0) > _Q_TOL:
        raise UnsupportedNodeError(f"the activation of {node.name} receives q = {q_norm:.6g} under the DKS "
                                   f"assumptions, not 1: the norm's eps = {_eps(graph, node):g} is not small against "
                                   f"its input's q = {q[first]:.4g} (lower eps, e.g. to 1e-5)", nodes=[node.name])
    return 1.0, act(node.name, v[first])


def composite_activation(info: Any) -> Any:
    """The activation spec of a norm+activation composite that the ``dks``/``tat`` passes reshape
    (its module's ``.act``), or None."""
    spec = info.norm
    if info.kind is not OpKind.NORM or spec is None or not spec.composite or spec.activation is None:
        return None
    return None if spec.activation.name == "identity" else spec.activation
