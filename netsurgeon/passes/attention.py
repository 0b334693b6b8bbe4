"""``attention_shaping``: self-attention whose matrix at initialization is a chosen pattern.

Without skips and normalization, deep transformers lose their token geometry: attention that is
uniform at initialization averages the tokens, and every token cosine goes to 1 with depth (rank
collapse). Signal-propagation attention (He et al., arXiv:2302.10322) makes each block's
attention matrix at initialization a fixed non-negative matrix ``A_l`` that carries a
positive-definite token kernel ``Σ_{l-1}`` to the next one of a schedule, ``A_l Σ_{l-1} A_lᵀ = Σ_l``
(docs/theory.md §9, ``netsurgeon.kernels.attention``):

* ``mode="e-spa"`` (default): ``Σ_ij = ρ^{|i-j|}``, correlation decaying with distance;
* ``mode="u-spa"``: ``Σ = (1-ρ) I + ρ 11ᵀ``, uniform;
* ``mode="value-skipinit"`` (He & Hofmann, arXiv:2311.01906): ``A -> α I + β A`` with trainable
  ``α = 1``, ``β = 0``, so attention starts as the identity.

The schedule runs from independent tokens (``ρ_0 = 0``) to a last kernel whose mean off-diagonal
cosine is ``final_cosine``, with the same step in ``log(1 - ρ)`` per block; its length is the
number of self-attention blocks in the graph. The query-key product starts at zero and the
pattern comes from a trainable position bias and a fixed per-position rescaling
(:class:`~netsurgeon.layers.ShapedAttention`). How the product starts at zero is ``query``:
``"zero-weights"`` zeroes the rows of the query projection (the paper's choice; the rows are
found by differentiating the query through RoPE, head splits and fused ``qkv`` layouts) and
``"zero-gain"`` multiplies the logits by a trainable per-head gain starting at 0 (for queries
without a projection of their own).

Sites: ``F.scaled_dot_product_attention`` calls and ``softmax(q @ kᵀ · scale + mask) @ v`` written
out (with constant scales, additive, ``masked_fill`` or ``torch.where`` masks, dtype casts and
dropout between). Masks must be causal or empty on the example inputs; a mask node that depends
on the inputs (padding) is kept and added. Cross-attention (keys from another source than the
queries) is left and reported; self-attention that cannot be rewritten (inside an opaque leaf,
an unrecognised op between the product and the softmax) is refused by node name.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InvalidArgumentError, UnsupportedNodeError
from ..graph.attention import write_out_multihead_attention
from ..graph.running import eval_mode
from ..graph.state import default_inputs
from ..kernels import attention as patterns
from ..layers import ShapedAttention, ValueSkipInit
from ..layers.attention import mix_heads
from ..ops import linear_parameters
from ..report import PassRecord, Preservation
from ._edit import call_sites
from .base import Pass, register_pass

__all__ = ["AttentionShaping", "find_attention"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAX = {F.softmax, torch.softmax}
_MATMUL = {torch.matmul, operator.matmul}
_CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "contiguous"}
_MHA_LIKE = ("Attention", "MultiheadAttention", "SelfAttention")


@dataclasses.dataclass(eq=False)
class Site:
    """One self-attention computation found in a graph.

    Attributes:
        node: the node whose value is the attention output (the sdpa call, or ``A @ v``).
        q, k, v: the query, key and value nodes.
        masks: mask nodes the call adds to the logits (bool masks allow where True).
        dropout: the sdpa call's ``dropout_p`` (a number or a node), or None.
        dropout_rate: the rate of a dropout module between softmax and ``@ v`` (written out).
        causal: ``is_causal`` of the call (masks are read from the example run).
        scale: the logits' scale (None: ``1/sqrt(d)``).
        enable_gqa: the sdpa call's ``enable_gqa``.
        written_out: whether the site is a written-out softmax attention.
        key_transposed: ``k`` is the scores' right operand itself, ``kᵀ`` in ``[..., d, T]`` layout
            (LeViT's ``k.permute(0, 2, 3, 1)``); the pass inserts ``k.transpose(-2, -1)`` before reading it.
        value_left: the output is ``v @ Aᵀ`` with ``v`` in ``[..., d, T]`` layout (EfficientViT); the
            rewrite computes ``(A @ vᵀ)ᵀ``.
        logit_mix, weight_mix: talking heads (CaiT, EfficientFormerV2): the linear layer or 1x1 conv that
            mixes the heads of the logits before the softmax, or of the weights after it.
        premix: the number of ``masks`` (the last ones, found walking up) added before ``logit_mix``.
    """

    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    masks: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    dropout: Any = None
    dropout_rate: float = 0.0
    causal: bool = False
    scale: Any = None
    enable_gqa: bool = False
    written_out: bool = False
    key_transposed: bool = False
    value_left: bool = False
    logit_mix: fx.Node | None = None
    weight_mix: fx.Node | None = None
    premix: int = 0
    factors: list[tuple[str, Any]] = dataclasses.field(default_factory=list)


def _bind_sdpa(node: fx.Node) -> dict[str, Any]:
    bound = dict(zip(_SDPA_ARGS, node.args))
    bound.update(node.kwargs)
    return bound


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def _is_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _SOFTMAX) or \
        (node.op == "call_method" and node.target == "softmax") or \
        (node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Softmax)


def _softmax_dim(gm: fx.GraphModule, softmax: fx.Node) -> Any:
    """The axis a softmax node normalizes (an ``nn.Softmax`` module's ``dim``, else the call's)."""
    if softmax.op == "call_module":
        return gm.get_submodule(softmax.target).dim
    return softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL) or \
        (node.op == "call_method" and node.target == "matmul")


def _is_cast(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in _CAST_METHODS


def _dropout_rate(gm: fx.GraphModule, node: fx.Node) -> float | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Dropout):
            return float(m.p)
    return None


def _transposed_key(node: fx.Node) -> fx.Node | None:
    """``k`` when ``node`` is ``k.transpose(-2, -1)`` (any spelling of the last two axes), else None."""
    if node.op == "call_method" and node.target == "transpose" or \
            node.op == "call_function" and node.target is torch.transpose:
        dims = [d for d in node.args[1:3]]
        if len(dims) == 2 and all(isinstance(d, int) for d in dims):
            return node.args[0] if set(dims) in ({-1, -2}, {2, 3}, {1, 2}) else None
    return None


def _permutes(node: Any, dims: tuple[int, ...]) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "permute"):
        return False
    args = node.args[1:]
    args = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)
    return args == dims


def _mixer(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    """The module when ``node`` calls a square linear layer or an ungrouped square 1x1 conv (a head mix)."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return None
    m = gm.get_submodule(node.target)
    if type(m) is nn.Linear and m.in_features == m.out_features:
        return m
    if type(m) is nn.Conv2d and m.in_channels == m.out_channels and m.kernel_size == (1, 1) and m.groups == 1 \
            and m.stride == (1, 1) and m.padding in ((0, 0), "valid") and m.dilation == (1, 1):
        return m
    return None


def _mix_below(gm: fx.GraphModule, x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(mix node, its output)`` when ``x`` [B, H, T, S] goes straight into a head mix: a 1x1 conv over
    the heads, or ``permute(0, 2, 3, 1)``, a linear layer and ``permute(0, 3, 1, 2)`` (CaiT)."""
    for u in x.users:
        if isinstance(_mixer(gm, u), nn.Conv2d) and u.args[0] is x:
            return u, u
        if _permutes(u, (0, 2, 3, 1)) and len(u.users) == 1:
            lin = next(iter(u.users))
            if isinstance(_mixer(gm, lin), nn.Linear) and len(lin.users) == 1:
                back = next(iter(lin.users))
                if _permutes(back, (0, 3, 1, 2)):
                    return lin, back
    return None


def _mix_above(gm: fx.GraphModule, y: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(mix node, its input)`` when ``y`` is the output of a head mix (see :func:`_mix_below`)."""
    if isinstance(_mixer(gm, y), nn.Conv2d) and isinstance(y.args[0], fx.Node):
        return y, y.args[0]
    if _permutes(y, (0, 3, 1, 2)) and isinstance(_mixer(gm, y.args[0]), nn.Linear):
        lin = y.args[0]
        if _permutes(lin.args[0], (0, 2, 3, 1)) and len(lin.users) == 1 and len(lin.args[0].users) == 1:
            return lin, lin.args[0].args[0]
    return None


def _mix_matrix(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [H, H], bias [H] or None)`` of a head-mix node found by :func:`_mix_below`."""
    m = gm.get_submodule(node.target)
    w = m.weight if isinstance(m, nn.Linear) else m.weight[:, :, 0, 0]
    return w, m.bias


def _written_out(gm: fx.GraphModule, softmax: fx.Node) -> Site | str | None:
    """The site that ``softmax`` belongs to, a reason it cannot be one, or None (not attention)."""
    dim = _softmax_dim(gm, softmax)
    if dim not in (-1, 3, 2):
        return None
    # downstream: casts and dropout, then ``P @ v``
    cur, rate = softmax, 0.0
    value_left = False
    weight_mix = None
    while True:
        users = [u for u in cur.users]
        mixed = _mix_below(gm, cur) if weight_mix is None else None
        if mixed is not None and len(users) == 1:
            weight_mix, cur = mixed
            continue
        nxt = next((u for u in users if _is_matmul(u) and u.args[0] is cur), None)
        if nxt is not None:
            end = nxt
            break
        # ``v @ Aᵀ`` with v in [.., d, T] layout (EfficientViT's cascaded group attention): (A @ vᵀ)ᵀ
        nxt = next((w for u in users if _transposed_key(u) is cur for w in u.users
                    if _is_matmul(w) and w.args[1] is u and isinstance(w.args[0], fx.Node)), None)
        if nxt is not None:
            end, value_left = nxt, True
            break
        step = next((u for u in users if _is_cast(u) or _dropout_rate(gm, u) is not None), None)
        if step is None:
            return None
        rate = max(rate, _dropout_rate(gm, step) or 0.0)
        cur = step
    # upstream: scales, masks and casts, then ``q @ kᵀ``
    masks: list[tuple[str, Any]] = []
    factors: list[tuple[str, Any]] = []
    logit_mix, premix_at = None, 0
    cur = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    while isinstance(cur, fx.Node) and not _is_matmul(cur):
        mixed = _mix_above(gm, cur) if logit_mix is None else None
        if mixed is not None:
            (logit_mix, cur), premix_at = mixed, len(masks)
            continue
        if _is_cast(cur):
            cur = cur.args[0]
        elif cur.op == "call_function" and cur.target in (operator.mul, operator.truediv, torch.mul, torch.div):
            a, b = cur.args[0], cur.args[1]
            sig, other = (a, b) if isinstance(a, fx.Node) and _upstream_of_matmul(a) else (b, a)
            if cur.target in (operator.truediv, torch.div) and sig is not a:
                return f"{cur.name}: divides by the attention scores"
            factors.append(("div" if cur.target in (operator.truediv, torch.div) else "mul", other))
            cur = sig
        elif cur.op == "call_function" and cur.target in (operator.add, torch.add):
            a, b = cur.args[0], cur.args[1]
            sig, other = (a, b) if isinstance(a, fx.Node) and _upstream_of_matmul(a) else (b, a)
            masks.append(("add", other))
            cur = sig
        elif cur.op == "call_method" and cur.target == "masked_fill":
            masks.append(("fill", (cur.args[1], cur.args[2])))
            cur = cur.args[0]
        elif cur.op == "call_function" and cur.target is torch.where:
            masks.append(("where", (cur.args[0], cur.args[2])))
            cur = cur.args[1]
        else:
            return f"{cur.name} ({cur.op} {getattr(cur.target, '__name__', cur.target)}) between q @ kᵀ and softmax"
    if not isinstance(cur, fx.Node):
        return None
    if not isinstance(cur.args[1], fx.Node):
        return f"{cur.name}: the scores' right operand is not a tensor of the graph"
    k = _transposed_key(cur.args[1])
    return Site(end, cur.args[0], cur.args[1] if k is None else k, end.args[0] if value_left else end.args[1],
                masks=masks, dropout_rate=rate, written_out=True, factors=factors, key_transposed=k is None,
                value_left=value_left, logit_mix=logit_mix, weight_mix=weight_mix,
                premix=len(masks) - premix_at if logit_mix is not None else 0)


_KEY_TRANSPOSE = "netsurgeon_key_transpose"  # node meta: a key transpose _with_key inserted


def _with_key(gm: fx.GraphModule, site: Site) -> Site:
    """``site`` with ``k`` in ``[..., T, d]`` layout: for scores ``q @ r`` whose right operand ``r`` is
    not a transpose, a node ``k = r.transpose(-2, -1)`` is inserted after ``r`` (``q @ r = q @ kᵀ``)."""
    if not site.key_transposed:
        return site
    with gm.graph.inserting_after(site.k):
        k = gm.graph.call_method("transpose", (site.k, -2, -1))
    k.meta[_KEY_TRANSPOSE] = True
    return dataclasses.replace(site, k=k, key_transposed=False)


def _upstream_of_matmul(node: fx.Node, depth: int = 12) -> bool:
    """Whether a matmul is reached from ``node`` going up through first arguments (the scores' path)."""
    cur = node
    for _ in range(depth):
        if not isinstance(cur, fx.Node):
            return False
        if _is_matmul(cur):
            return True
        if not cur.args:
            return False
        cur = cur.args[1] if cur.op == "call_function" and cur.target is torch.where else cur.args[0]
    return False


def find_attention(gm: fx.GraphModule) -> tuple[list[Site], dict[str, str], list[str]]:
    """The self-attention sites of ``gm`` in graph order, ``{node: why not}`` for softmax attention
    that cannot be read, and the opaque leaves that look like attention modules."""
    sites: list[Site] = []
    problems: dict[str, str] = {}
    for node in gm.graph.nodes:
        if _is_sdpa(node):
            b = _bind_sdpa(node)
            mask = b.get("attn_mask")
            sites.append(Site(node, b["query"], b["key"], b["value"],
                              masks=[("add", mask)] if isinstance(mask, fx.Node) else [],
                              dropout=b.get("dropout_p", 0.0), causal=bool(b.get("is_causal", False)),
                              scale=b.get("scale"), enable_gqa=bool(b.get("enable_gqa", False))))
        elif _is_softmax(gm, node):
            site = _written_out(gm, node)
            if isinstance(site, Site):
                sites.append(site)
            elif isinstance(site, str):
                problems[node.name] = site
    leaves = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, (ShapedAttention, ValueSkipInit)):
                continue
            if any(isinstance(sub, nn.MultiheadAttention) or any(w in type(sub).__name__ for w in _MHA_LIKE)
                   for sub in m.modules()):
                leaves.append(node.name)
    return sites, problems, leaves


# --------------------------------------------------------------------------------------------- projections

def _projection(gm: fx.GraphModule, node: fx.Node
                ) -> tuple[nn.Parameter, nn.Parameter | None, int, int] | None:
    """``(weight, bias, output axis of the weight, channel axis of the output)`` when ``node`` is a
    linear projection (``nn.Linear``, ``F.linear``, ``addmm``, Hugging Face's ``Conv1D``, or an
    ungrouped ``nn.Conv1d/2d/3d``, whose channels are axis 1 of its output)."""
    found = linear_parameters(gm, node)
    if found is not None:
        return (*found, -1)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1 and not m.transposed:
            return m.weight, m.bias, 0, 1
    return None


def _projections_above(gm: fx.GraphModule, node: fx.Node, limit: int = 200) -> list[fx.Node]:
    """The nearest linear projections above ``node`` on every path (not going through them)."""
    found, seen, todo = [], set(), [node]
    while todo and len(seen) < limit:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if _projection(gm, cur) is not None:
            found.append(cur)
            continue
        todo.extend(cur.all_input_nodes)
    return found


def _private(proj: fx.Node, site: Site) -> bool:
    """Whether ``proj`` reaches the output only through this site (or the k/v it feeds, a cache)."""
    stop = {site.node, site.k, site.v}
    seen, todo = set(), [proj]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for u in cur.users:
            if u.op == "output":
                return False
            if u not in stop and not _reads_metadata(u):
                todo.append(u)
    return True


def _reads_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only a tensor's shape, dtype or device (no values flow through it)."""
    if node.op == "call_method" and node.target in ("size", "dim", "type_as_meta", "get_device"):
        return True
    return node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
        and node.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda")


def _roots(node: fx.Node) -> set[fx.Node]:
    """The placeholders ``node`` depends on."""
    seen, todo, out = set(), [node], set()
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur.op == "placeholder":
            out.add(cur)
        todo.extend(cur.all_input_nodes)
    return out


def _opaque(m: nn.Module) -> bool:
    """A leaf whose inside the graph does not show (torch.nn's own modules and netsurgeon's are known)."""
    mod = type(m).__module__
    return not (mod.startswith("torch.") or mod.startswith("netsurgeon."))


class _AttentionSpy(torch.overrides.TorchFunctionMode):
    """Notes whether attention (``scaled_dot_product_attention`` or a softmax) runs inside a call."""

    _MATMULS = (torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm, torch.einsum)

    def __init__(self) -> None:
        super().__init__()
        self.sdpa = self.softmax = self.matmul = False

    @property
    def seen(self) -> bool:
        return self.sdpa or (self.softmax and self.matmul)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.sdpa = True
        elif func in (F.softmax, torch.softmax, torch.Tensor.softmax):
            self.softmax = True
        elif func in self._MATMULS:
            self.matmul = True
        return func(*args, **(kwargs or {}))


class _Capture(fx.Interpreter):
    """Runs the graph once, keeping the values of ``keep`` and making projection outputs leaves
    that require grad, so a query's dependence on its projection's rows can be read."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node], leaves: set[fx.Node]) -> None:
        super().__init__(gm)
        self.keep, self.leaves, self.values = keep, leaves, {}
        self.attention_leaves: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and _opaque(self.module.get_submodule(n.target)):
            with _AttentionSpy() as spy:
                out = super().run_node(n)
            if spy.seen:
                self.attention_leaves.append(n.name)
        else:
            out = super().run_node(n)
        if n in self.leaves and isinstance(out, torch.Tensor) and out.is_floating_point():
            leaf = out.detach().requires_grad_(True)
            self.values[n] = leaf
            return leaf.clone()  # not a leaf itself: the model may write into it in place
        if n in self.keep:
            self.values[n] = out
        return out


def _rows(gm: fx.GraphModule, values: dict[fx.Node, Any], out: fx.Node, projs: list[fx.Node], seed: int
          ) -> dict[fx.Node, torch.Tensor]:
    """``{projection: bool mask of its output features that ``out`` depends on}``."""
    y = values[out]
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    leaves = [values[p] for p in projs]
    grads = torch.autograd.grad((y * r).sum(), leaves, allow_unused=True, retain_graph=True)
    rows = {}
    for p, g in zip(projs, grads):
        if g is not None:
            g = g.detach().abs().movedim(_projection(gm, p)[3], -1)
            used = g.reshape(-1, g.shape[-1]).sum(0) > 0
            if bool(used.any()):
                rows[p] = used
    return rows


# --------------------------------------------------------------------------------------------- the pass

@register_pass
@dataclasses.dataclass
class AttentionShaping(Pass):
    """Give every self-attention block a chosen attention matrix at initialization.

    Options:
        mode: ``"e-spa"`` (default), ``"u-spa"`` or ``"value-skipinit"``.
        final_cosine: mean off-diagonal token cosine of the last block's kernel (E-SPA, U-SPA).
            Default 0.3.
        query: how the query-key product starts at zero: ``"zero-weights"`` (default; the query
            projection's rows) or ``"zero-gain"`` (a trainable per-head gain on the logits).
    """

    name = "attention_shaping"
    summary = "attention matrices at init become E-SPA/U-SPA patterns (trainable position bias) or value-skipinit"
    preserves = Preservation.NONE
    mode: Literal["e-spa", "u-spa", "value-skipinit"] = "e-spa"
    final_cosine: float = 0.3
    query: Literal["zero-weights", "zero-gain"] = "zero-weights"

    def validate(self) -> None:
        super().validate()
        self._require("final_cosine", 0.0 <= float(self.final_cosine) < 0.999, "be in [0, 0.999)")

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        gm = self._run(gm, record, example_inputs)
        unused = [n for n in gm.graph.nodes if n.meta.get(_KEY_TRANSPOSE) and not n.users]
        for n in unused:  # keys of sites left as they are (cross-attention)
            gm.graph.erase_node(n)
        if unused:
            gm.recompile()
        return gm

    def _run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
             ) -> fx.GraphModule:
        for name, what in write_out_multihead_attention(gm)[0]:  # graphs not traced by netsurgeon.trace
            record.change(name, what, "its attention can be shaped")
        sites, problems, leaves = find_attention(gm)
        sites = [_with_key(gm, s) for s in sites]
        inputs = example_inputs if example_inputs is not None else default_inputs(gm)
        values: dict[fx.Node, Any] = {}
        if inputs is not None:  # one run: the values the rewrite reads, and leaves that compute attention
            values, spied = self._capture(gm, sites, inputs)
            leaves = list(dict.fromkeys(leaves + spied))
        if leaves:
            raise UnsupportedNodeError(
                f"attention inside opaque leaf module(s) {', '.join(leaves[:6])}: attention_shaping rewrites the "
                f"graph, so trace through them (drop them from leaf_modules, or see TraceInfo.untraceable_leaves "
                f"for why they could not be traced)", nodes=leaves)
        if problems:
            raise UnsupportedNodeError(
                "softmax attention that attention_shaping cannot read: " +
                "; ".join(f"{n}: {why}" for n, why in list(problems.items())[:6]), nodes=list(problems))
        if not sites:
            record.note("no self-attention (scaled_dot_product_attention or softmax(q @ kᵀ) @ v) in the model"
                        + ("" if inputs is not None else "; without example inputs, leaf modules were not checked"))
            return gm
        if inputs is None:
            raise InvalidArgumentError("attention_shaping needs example_inputs (the sequence length and the masks "
                                       "are read from one run)")
        return self._shape(gm, record, sites, values)

    # ----------------------------------------------------------------------------------------- details

    def _capture(self, gm: fx.GraphModule, sites: list[Site], inputs: tuple[torch.Tensor, ...]
                 ) -> tuple[dict[fx.Node, Any], list[str]]:
        """One eval-mode run keeping the sites' operands, masks and scales, with the projection outputs
        as leaves (for the query rows); and the leaf modules that computed attention inside."""
        keep: set[fx.Node] = set()
        projs: set[fx.Node] = set()
        for s in sites:
            keep |= {s.q, s.k, s.v}
            for _, m in s.masks:
                keep |= {x for x in (m if isinstance(m, tuple) else (m,)) if isinstance(x, fx.Node)}
            keep |= {f for _, f in s.factors if isinstance(f, fx.Node)}
            projs |= set(_projections_above(gm, s.q)) | set(_projections_above(gm, s.k)) \
                | set(_projections_above(gm, s.v))
        cap = _Capture(gm, keep, projs)
        with eval_mode(gm), torch.enable_grad():
            cap.run(*inputs)
        return cap.values, cap.attention_leaves

    def _shape(self, gm: fx.GraphModule, record: PassRecord, sites: list[Site], values: dict[fx.Node, Any]
               ) -> fx.GraphModule:
        projs = {s: _projections_above(gm, s.q) for s in sites} if self._zero_weights else {s: [] for s in sites}
        kv_projs = {s: _projections_above(gm, s.k) + _projections_above(gm, s.v) for s in sites}
        self_sites, plans = [], []
        for s in sites:
            why = self._cross(gm, s, values)
            if why is not None:
                record.skip(s.node.name, f"cross-attention ({why}): left as is")
                continue
            self_sites.append(s)
        if not self_sites:
            record.note("only cross-attention in the model; nothing shaped")
            return gm
        calls = call_sites(gm)
        refusals: dict[str, str] = {}
        for s in self_sites:
            plan = {"site": s}
            try:
                plan.update(self._read(gm, s, values))
            except _Refuse as e:
                refusals[s.node.name] = str(e)
                continue
            if self._zero_weights and self.mode != "value-skipinit":
                try:
                    plan["rows"] = self._query_rows(gm, s, values, projs[s], kv_projs[s], calls)
                except _Refuse as e:  # the product starts at zero through a gain instead, and the block says why
                    plan["gain"] = str(e)
            plans.append(plan)
        if refusals:
            raise UnsupportedNodeError(
                f"attention_shaping cannot rewrite {len(refusals)} self-attention site(s): " +
                "; ".join(f"{n}: {why}" for n, why in list(refusals.items())[:4]), nodes=list(refusals))
        blocks = len(plans)
        for l, plan in enumerate(plans, start=1):
            self._rewrite(gm, record, plan, l, blocks)
        record.note(self._summary(blocks))
        return gm

    @property
    def _zero_weights(self) -> bool:
        return self.query == "zero-weights"

    @staticmethod
    def _cross(gm: fx.GraphModule, s: Site, values: dict[fx.Node, Any]) -> str | None:
        """Why the site is cross-attention (keys from another input than the queries), or None."""
        q, k = values.get(s.q), values.get(s.k)
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() >= 2 and k.dim() >= 2 \
                and q.shape[-2] != k.shape[-2]:
            return f"{q.shape[-2]} queries over {k.shape[-2]} keys"
        pq, pk = _projections_above(gm, s.q), _projections_above(gm, s.k)
        src_q = {p.all_input_nodes[0] for p in pq if p.all_input_nodes}
        src_k = {p.all_input_nodes[0] for p in pk if p.all_input_nodes}
        if src_q and src_k and not (src_q & src_k) and not (set(pq) & set(pk)):
            return "its keys are projected from another node than its queries"
        if _roots(s.q) != _roots(s.k):
            return "its keys come from other model inputs than its queries"
        return None

    def _read(self, gm: fx.GraphModule, s: Site, values: dict[fx.Node, Any]) -> dict[str, Any]:
        q, k = values[s.q], values[s.k]
        if not isinstance(q, torch.Tensor) or q.dim() < 3:
            raise _Refuse("the query is not a [batch, ..., T, d] tensor")
        tq, tk = q.shape[-2], k.shape[-2]
        heads = q.shape[-3] if q.dim() >= 4 else 1
        if self.mode == "value-skipinit" and (s.logit_mix is not None or s.weight_mix is not None):
            raise _Refuse(f"talking heads ({(s.logit_mix or s.weight_mix).name}): value-skipinit computes plain "
                          f"attention, which would drop the head mix; use e-spa or u-spa")
        values = self._premixed(gm, s, values, q, heads)
        allowed = torch.ones(tq, tk, dtype=torch.bool)
        bias_free = True
        for kind, m in s.masks:
            a, free = self._mask_value(kind, m, values, q.dtype, tq, tk)
            allowed &= a
            bias_free &= free
        tril = torch.tril(torch.ones(tq, tk, dtype=torch.bool))
        if s.causal:
            allowed &= tril
        if bool(allowed.all()):
            causal = False
        elif torch.equal(allowed, tril):
            causal = True
        else:
            raise _Refuse("its mask is neither causal nor empty on the example inputs (padding?): shape the "
                          "model with unpadded example inputs")
        offset = None
        if not bias_free:  # a position bias (relative positions, ALiBi): the pattern's bias starts at log P - M
            offset = self._offset(s, values, q.dtype, tq, tk, heads, allowed)
        scale = s.scale
        query_factors: list[tuple[str, fx.Node]] = []
        if s.written_out:
            scale = 1.0
            for kind, f in s.factors:
                val = values.get(f, f) if isinstance(f, fx.Node) else f
                if isinstance(val, torch.Tensor) and val.numel() != 1:
                    # a per-head (or per-query) temperature, constant along the keys: it scales the query rows
                    # (XCA's temperature, Swin V2's logit scale), so the rewrite multiplies the query by it
                    if not isinstance(f, fx.Node) or val.dim() < 1 or val.shape[-1] != 1 or val.dim() > q.dim() \
                            or any(n not in (1, m) for n, m in zip(val.shape[::-1], q.shape[::-1])):
                        raise _Refuse(f"the scores are scaled by a tensor of shape {tuple(val.shape)} that varies "
                                      f"along the keys (only a per-head or per-query scale can move onto the query)")
                    query_factors.append((kind, f))
                    continue
                if isinstance(val, torch.Tensor):
                    val = float(val)
                if not isinstance(val, (int, float)):
                    raise _Refuse(f"the scores are scaled by {val!r}")
                scale = scale / float(val) if kind == "div" else scale * float(val)
        return {"t": tq, "heads": heads, "causal": causal, "scale": scale, "offset": offset,
                "query_factors": query_factors}

    @staticmethod
    def _premixed(gm: fx.GraphModule, s: Site, values: dict[fx.Node, Any], q: torch.Tensor, heads: int
                  ) -> dict[fx.Node, Any]:
        """``values`` with each mask added before the talking heads' logit mix replaced by its mixed value
        (what it adds to the logits the softmax sees)."""
        if s.logit_mix is None and s.weight_mix is None:
            return values
        for mix in (s.logit_mix, s.weight_mix):
            if mix is not None and (q.dim() != 4 or tuple(_mix_matrix(gm, mix)[0].shape) != (heads, heads)):
                raise _Refuse(f"its head mix {mix.name} does not act on the {heads} heads of [batch, heads, T, T] "
                              f"scores")
        values = dict(values)
        for kind, m in s.masks[len(s.masks) - s.premix:]:
            val = values.get(m, m) if kind == "add" and isinstance(m, fx.Node) else None
            if not isinstance(val, torch.Tensor) or val.dtype == torch.bool or val.dim() < 3 \
                    or not bool(torch.isfinite(val).all()):
                raise _Refuse(f"a mask before the head mix {s.logit_mix.name} that is not a finite additive "
                              f"[.., heads, T, T] tensor")
            with torch.no_grad():
                values[m] = mix_heads(_mix_matrix(gm, s.logit_mix)[0], val)
        return values

    @staticmethod
    def _mask_value(kind: str, m: Any, values: dict[fx.Node, Any], dtype: torch.dtype, tq: int, tk: int
                    ) -> tuple[torch.Tensor, bool]:
        """``(allowed [tq, tk], no bias in the allowed part)`` of one mask on the example run."""
        if kind == "add":
            val = values.get(m, m) if isinstance(m, fx.Node) else m
            if not isinstance(val, torch.Tensor):
                raise _Refuse(f"adds {val!r} to the scores")
            val = val.expand(*val.shape[:-2], tq, tk).reshape(-1, tq, tk) if val.dim() >= 2 else \
                val.expand(tq, tk).reshape(1, tq, tk)
            if val.dtype == torch.bool:
                allowed = val
                free = True
            else:
                allowed = val > -1e4
                free = bool((val[allowed] == 0).all()) if bool(allowed.any()) else True
        else:
            cond, fill = m
            cval = values.get(cond, cond) if isinstance(cond, fx.Node) else cond
            if not isinstance(cval, torch.Tensor):
                raise _Refuse("masks with a non-tensor condition")
            cval = cval.expand(*cval.shape[:-2], tq, tk).reshape(-1, tq, tk)
            fval = values.get(fill, fill) if isinstance(fill, fx.Node) else fill
            fval = float(fval) if isinstance(fval, (int, float)) or (isinstance(fval, torch.Tensor)
                                                                       and fval.numel() == 1) else None
            if fval is None or fval > -1e4:
                raise _Refuse("a mask fills in values that are not a large negative number")
            allowed = ~cval if kind == "fill" else cval  # masked_fill fills where True; where keeps where True
            free = True
        if not bool((allowed == allowed[0]).all()):
            raise _Refuse("its mask differs between examples or heads (padding?): shape with unpadded inputs")
        return allowed[0], free

    @staticmethod
    def _offset(s: Site, values: dict[fx.Node, Any], dtype: torch.dtype, tq: int, tk: int, heads: int,
                allowed: torch.Tensor) -> torch.Tensor:
        """The additive masks' values ``M`` per head ``[H, T, T]`` (0 where masked), the same for every
        example (else: refused), so that ``softmax(log P - M + M) = P`` at initialization."""
        total = torch.zeros(1, tq, tk, dtype=torch.float64)
        for kind, m in s.masks:
            val = values.get(m, m) if kind == "add" and isinstance(m, fx.Node) else None
            if not isinstance(val, torch.Tensor) or val.dtype == torch.bool:
                continue
            v = val.detach().double().cpu()
            v = v.reshape((1,) * (4 - v.dim()) + tuple(v.shape)) if v.dim() < 4 else v.reshape(-1, *v.shape[-3:])
            if v.shape[1] not in (1, heads):
                if v.shape[0] == 1 and v.shape[1] % heads == 0:  # [1, B*H, T, S]
                    v = v.reshape(-1, heads, *v.shape[-2:])
                else:
                    raise _Refuse(f"its position bias has shape {tuple(val.shape)}, not per head")
            v = v.expand(v.shape[0], v.shape[1], tq, tk)
            if not bool(torch.isclose(v, v[:1]).all()):
                raise _Refuse("its additive mask differs between examples (it depends on the input)")
            total = total + v[0]
        total = torch.where(allowed, total, torch.zeros((), dtype=torch.float64))
        return total.expand(heads, tq, tk).clone() if total.shape[0] == 1 else total

    def _query_rows(self, gm: fx.GraphModule, s: Site, values: dict[fx.Node, Any], projs: list[fx.Node],
                    kv: list[fx.Node], calls: Any) -> dict[fx.Node, torch.Tensor]:
        if not projs:
            raise _Refuse("its query has no linear projection ")
        rows = _rows(gm, values, s.q, projs, seed=1)
        if not rows:
            raise _Refuse("its query does not depend on a linear projection's output ")
        krows = _rows(gm, values, s.k, [p for p in set(projs) | set(kv)], seed=2)
        vrows = _rows(gm, values, s.v, [p for p in set(projs) | set(kv)], seed=3)
        for p, used in rows.items():
            if not _private(p, s):
                raise _Refuse(f"its query projection {p.name} is used outside this attention ")
            if p.op == "call_module" and calls[p.target] > 1:
                raise _Refuse(f"its query projection {p.target} is called {calls[p.target]} times "
                              f"")
            for other in (krows.get(p), vrows.get(p)):
                if other is not None and bool((used & other).any()):
                    raise _Refuse(f"query and key/value share output features of {p.name} ")
        return rows

    def _pattern(self, l: int, blocks: int, t: int, causal: bool) -> tuple[np.ndarray, np.ndarray, float, float]:
        rhos = patterns.schedule(self.mode, t, blocks, float(self.final_cosine))
        before = patterns.family_kernel(self.mode, t, rhos[l - 1])
        after = patterns.family_kernel(self.mode, t, rhos[l])
        try:
            a = patterns.transition(before, after, causal)
        except patterns.PatternError as e:  # pragma: no cover - the families give non-negative matrices
            raise _Refuse(str(e)) from None
        d, b = patterns.as_softmax(a, causal)
        return d, b, rhos[l - 1], rhos[l]

    def _rewrite(self, gm: fx.GraphModule, record: PassRecord, plan: dict[str, Any], l: int, blocks: int) -> None:
        s: Site = plan["site"]
        t, heads, causal, scale = plan["t"], plan["heads"], plan["causal"], plan["scale"]
        name = f"ns_attention_{l - 1}"
        while hasattr(gm, name):
            name += "_"
        if self.mode == "value-skipinit":
            module: nn.Module = ValueSkipInit(heads, causal=causal, scale=scale, dropout=s.dropout_rate,
                                              enable_gqa=s.enable_gqa)
            what = f"value-skipinit: α I + β A with α = 1, β = 0 per head ({heads}), causal={causal}"
        else:
            d, b, r0, r1 = self._pattern(l, blocks, t, causal)
            gain = not self._zero_weights or "gain" in plan
            offset = plan.get("offset")
            log_p = torch.tensor(b) if offset is None else torch.tensor(b)[None] - offset
            module = ShapedAttention(log_p, torch.tensor(d), heads=heads, causal=causal, scale=scale,
                                     dropout=s.dropout_rate, mode=self.mode, enable_gqa=s.enable_gqa,
                                     logit_gain=0.0 if gain else None, offset=offset,
                                     logit_mix=None if s.logit_mix is None else _mix_matrix(gm, s.logit_mix)[0],
                                     weight_mix=s.weight_mix is not None)
            zeroed = self._zero_query(gm, plan.get("rows", {}))
            module.zeroed_query = []  # (weight, axis, rows, bias): orthogonal_init keeps them at zero
            for p, used in plan.get("rows", {}).items():
                weight, bias, axis, _ = _projection(gm, p)
                module.zeroed_query.append((weight, axis, used.nonzero().flatten().tolist(), bias))
            how = f"query rows zeroed: {zeroed}" if not gain else "logit gain 0 per head" + (
                f" (the query rows cannot be zeroed: {plan['gain']})" if "gain" in plan else "")
            what = (f"{self.mode} block {l}/{blocks}: token kernel ρ {r0:.4g} -> {r1:.4g} over T={t}, "
                    f"{heads} head(s), causal={causal}; {how}"
                    + ("; the model's own position bias is subtracted from the pattern's at initialization"
                       if offset is not None else "")
                    + (f"; talking heads: the logit mix {s.logit_mix.name} is kept (its bias, a constant per head "
                       f"and row, cancels in the softmax)" if s.logit_mix is not None else "")
                    + (f"; talking heads: the weight mix {s.weight_mix.name} starts as the identity (trainable)"
                       if s.weight_mix is not None else ""))
        ref = next(iter(gm.parameters()), None)
        if ref is not None:
            module.to(device=ref.device)
        gm.add_submodule(name, module)
        after = len(s.masks) - s.premix
        mask = self._mask_node(gm, s, s.masks[:after])
        kwargs: dict[str, Any] = {}
        if mask is not None:
            kwargs["attn_mask"] = mask
        premix = self._mask_node(gm, s, s.masks[after:])
        if premix is not None:
            kwargs["premix_mask"] = premix
        if not s.written_out:
            kwargs["dropout_p"] = s.dropout if s.dropout is not None else 0.0
        q = s.q
        with gm.graph.inserting_before(s.node):
            for kind, f in plan.get("query_factors", []):  # (q · t) kᵀ = t ⊙ (q kᵀ) for t constant along the keys
                q = gm.graph.call_function(operator.truediv if kind == "div" else operator.mul, (q, f))
            v = gm.graph.call_method("transpose", (s.v, -2, -1)) if s.value_left else s.v
            new = gm.graph.call_module(name, (q, s.k, v), kwargs)
            out = gm.graph.call_method("transpose", (new, -2, -1)) if s.value_left else new
        out.meta = dict(s.node.meta)
        if s.value_left:
            new.meta = {k: v for k, v in s.node.meta.items() if k == "stack_trace"}
        s.node.replace_all_uses_with(out)
        gm.graph.erase_node(s.node)
        record.change(s.node.name, what, "signal-propagation attention: the token kernel follows the schedule "
                                         "instead of collapsing (docs/theory.md §9)")

    @staticmethod
    def _mask_node(gm: fx.GraphModule, s: Site, masks: list[tuple[str, Any]]) -> fx.Node | None:
        """One additive/bool mask node equal to ``masks`` (None when there are none)."""
        parts: list[fx.Node] = []
        with gm.graph.inserting_before(s.node):
            for kind, m in masks:
                if kind == "add":
                    if isinstance(m, fx.Node):
                        parts.append(m)
                    continue
                cond, fill = m
                if kind == "fill":  # masked_fill(x, cond, fill): fill where cond
                    parts.append(gm.graph.call_function(torch.where, (cond, fill, 0.0)))
                else:  # where(cond, x, fill): keep where cond
                    parts.append(gm.graph.call_function(torch.where, (cond, 0.0, fill)))
        if not parts:
            return None
        out = parts[0]
        if len(parts) > 1:
            with gm.graph.inserting_before(s.node):
                for p in parts[1:]:
                    out = gm.graph.call_function(_add_masks, (out, p))
        return out

    @staticmethod
    @torch.no_grad()
    def _zero_query(gm: fx.GraphModule, rows: dict[fx.Node, torch.Tensor]) -> str:
        done = []
        for p, used in rows.items():
            weight, bias, axis, _ = _projection(gm, p)
            idx = used.nonzero().flatten().to(weight.device)
            weight.index_fill_(axis, idx, 0.0)
            if bias is not None:
                bias.index_fill_(0, idx, 0.0)
            done.append(f"{int(used.sum())} of {used.numel()} in {p.name}")
        return ", ".join(done)

    def _summary(self, blocks: int) -> str:
        if self.mode == "value-skipinit":
            return f"{blocks} self-attention block(s) start as the identity (value-skipinit)"
        return (f"{blocks} self-attention block(s) shaped ({self.mode}): token kernels from independent tokens to a "
                f"mean cosine of {self.final_cosine:g} at the last block")


def _add_masks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two masks as one additive mask (a bool mask allows where True)."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf")) if m.dtype == torch.bool else m
    return additive(a) + additive(b)


class _Refuse(Exception):
    """One site's reason it cannot be rewritten (collected, then raised as one error)."""
