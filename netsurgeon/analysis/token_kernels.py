"""Token kernels of sequence models: the ``T x T`` Gram of one sequence's tokens at every node,
measured and predicted (docs/transformers.md).

A node whose output has a token axis (``[B, T, C]`` tokens, ``[B, H, T, d]`` heads, the ``[B, C, T]``
of a flattened patch embedding) carries, per example, the token kernel ``Σ_ij = <x_i, x_j> / n``
with ``n`` the features per token (heads and head features together). Attention mixes the tokens
of a sequence, so this, not the kernel of a pair of inputs, is what decides whether a deep
transformer keeps its token geometry; its mean off-diagonal cosine going to 1 is rank collapse
(Noci et al. arXiv:2206.03126; He et al. arXiv:2302.10322).

* **Measured**: the traced model runs in eval mode on the example inputs (or on random inputs of
  the same kind, one batch per seed); every token node records the Gram per example, its mean over
  examples, and the spread of the per-example mean token cosines.
* **Predicted**: from each example's measured kernel at the start node (the last measured node in
  front of the first attention through which every path to it goes: the embedding, or the patch
  embedding with its position embedding added) the kernels are propagated node by node, example by
  example (examples differ in their tokens' q, and a per-token normalization or an activation of
  their mean kernel is not the mean of theirs); the table compares the means over examples.
  Token-pointwise nodes (linear layers, activations, norms over the features, constant scales,
  sums, reshapes that split features into heads) take the engine's own rules
  (:func:`~.propagate.propagate_node`), with the token pairs as the grid: ``k`` is the vector of
  all ``Σ_ij``; activations take every pair at its two tokens' own q. Attention maps
  ``Σ -> A Σ Aᵀ``: exactly with ``A = init_matrix()`` for ``ShapedAttention`` / ``ValueSkipInit``
  whose logits are zero, and for ``scaled_dot_product_attention`` or a written-out
  ``softmax(q kᵀ) v`` whose queries (or keys) are zero; approximately, with ``A`` measured on the
  inputs (each example's own) and ``A Σ Aᵀ`` averaged over heads, otherwise. Every other token-mixing node
  (pooling, a cls-token concat, a position-dependent shift, a conv along the sequence) takes its
  measured kernel.

Example:
    >>> import torch, torch.nn as nn, torch.nn.functional as F
    >>> class Mix(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.v = nn.Linear(64, 64, bias=False)
    ...     def forward(self, x):
    ...         return F.scaled_dot_product_attention(x * 0, x, self.v(x), is_causal=True)
    >>> tk = token_kernels(Mix(), torch.randn(8, 6, 64), start="independent")
    >>> row = [r for r in tk.table() if r.node == "scaled_dot_product_attention"][0]
    >>> row.status, round(row.predicted_cos, 4)  # mean of sqrt((min(i,j)+1) / (max(i,j)+1)) over i != j
    ('exact', 0.6897)
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .._fileio import write_atomic
from ..errors import InvalidArgumentError, UnknownNodeError
from ..graph import Topology, op_info, trace
from ..graph.running import eval_mode, example_run
from ..layers import ShapedAttention, ValueSkipInit
from ..ops import NormFamily, OpKind, dense_weights
from .activation_maps import maps_for
from .affine import affine_map, signal_nodes
from .propagate import activation_kernel, propagate_node
from .rules import APPROX, EXACT, NodeKernel, reasons, worse
from .sums import correlated_sums, dependent_products
from .tokens import embedding_sources

__all__ = ["describe_fit", "fit_shaped_attention", "MEASURED", "NoTokenAxisError", "TokenAnalysis", "TokenNode", "TokenRow", "TokenTable", "token_kernels"]

MEASURED = "measured"
_SOURCE = "first token node: the tokens start here"
_ORDER = (EXACT, APPROX, MEASURED)
_SAME_Q = 1e-6  # per-token mean squares this close (relative) count as one q
_SAME_A = 1e-6  # attention matrices this close (relative to their largest entry) count as one
_SDPA = F.scaled_dot_product_attention
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}
# ops that reorder or gather along an axis: token mixing whatever their kind
_REORDER = {"roll", "flip", "fliplr", "flipud", "gather", "index_select", "take_along_dim", "sort", "argsort",
            "cumsum", "cumprod", "scatter", "scatter_add"}
# kinds whose kernel rule acts on every ``k`` entry alone, without reading q: one call with all pairs is exact
_Q_FREE = {OpKind.RESHAPE, OpKind.IDENTITY, OpKind.OUTPUT, OpKind.ADD, OpKind.CONCAT, OpKind.LINEAR, OpKind.AFFINE,
           OpKind.MULTIPLY}


class NoTokenAxisError(InvalidArgumentError):
    """The model has no node with a token axis."""


def _worse(*statuses: str) -> str:
    return max(statuses, key=_ORDER.index)


# ---------------------------------------------------------------- results
@dataclass
class TokenNode:
    """Token kernels at one node.

    Attributes:
        name: the fx node. ``tokens``: ``T``, the length of its token axis.
        axes: ``(batch axis, token axis)`` of its output.
        measured: ``[T, T]`` Gram ``<x_i, x_j> / n``, mean over the examples.
        cos_per_example: the mean off-diagonal token cosine of each example's Gram.
        predicted: ``[T, T]`` predicted kernel (the measured one where the status is "measured").
        status: ``"exact"``, ``"approximate"`` or ``"measured"``; ``reason``: why.
        attention: whether the node is an attention node.
    """

    name: str
    tokens: int
    axes: tuple[int, int]
    measured: np.ndarray
    cos_per_example: np.ndarray
    predicted: np.ndarray | None = None
    status: str = MEASURED
    reason: str = ""
    attention: bool = False

    @property
    def measured_cos(self) -> float:
        """Mean off-diagonal cosine of the example-mean Gram."""
        return _mean_cos(self.measured)

    @property
    def predicted_cos(self) -> float:
        return _mean_cos(self.predicted) if self.predicted is not None else float("nan")

    @property
    def se(self) -> float:
        """Standard error of :attr:`measured_cos` over the examples (from the spread of the
        per-example cosines: the first-order delta method)."""
        c = self.cos_per_example[np.isfinite(self.cos_per_example)]
        return float(np.std(c, ddof=1) / math.sqrt(len(c))) if len(c) > 1 else float("nan")

    @property
    def measured_q(self) -> float:
        return float(np.mean(np.diag(self.measured)))

    @property
    def predicted_q(self) -> float:
        return float(np.mean(np.diag(self.predicted))) if self.predicted is not None else float("nan")


@dataclass
class TokenRow:
    node: str
    tokens: int
    predicted_cos: float
    measured_cos: float
    se: float
    predicted_q: float
    measured_q: float
    status: str
    reason: str


class TokenTable(list):
    """Rows of :meth:`TokenAnalysis.table`; readable ``str`` and notebook HTML."""

    def __str__(self) -> str:
        head = (f"{'node':34s} {'T':>4s} {'pred cos':>9s} {'meas cos':>9s} {'SE':>8s} {'pred q':>10s} "
                f"{'meas q':>10s}  status")
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r.node[:34]:34s} {r.tokens:4d} {r.predicted_cos:9.4f} {r.measured_cos:9.4f} {r.se:8.2g} "
                         f"{r.predicted_q:10.4g} {r.measured_q:10.4g}  {r.status}"
                         + (f" ({r.reason})" if r.reason else ""))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(f"<tr><td>{r.node}</td><td>{r.tokens}</td><td>{r.predicted_cos:.4f}</td>"
                        f"<td>{r.measured_cos:.4f}</td><td>{r.se:.2g}</td><td>{r.predicted_q:.4g}</td>"
                        f"<td>{r.measured_q:.4g}</td><td>{r.status}</td><td>{r.reason}</td></tr>" for r in self)
        return ("<table><tr><th>node</th><th>T</th><th>pred cos</th><th>meas cos</th><th>SE</th><th>pred q</th>"
                f"<th>meas q</th><th>status</th><th>reason</th></tr>{cells}</table>")


class TokenAnalysis:
    """Measured and predicted token kernels at every node with a token axis (graph order).

    Attributes:
        nodes: ``{name: TokenNode}`` in graph order.
        start: the node the prediction starts from; ``attention``: the attention nodes, in order.
        examples: the number of sequences measured.
    """

    def __init__(self, nodes: dict[str, TokenNode], start: str | None, attention: list[str], examples: int) -> None:
        self.nodes = nodes
        self.start = start
        self.attention = attention
        self.examples = examples

    def _get(self, node: str) -> TokenNode:
        if node not in self.nodes:
            raise UnknownNodeError(f"no token kernel for node {node!r}; nodes with a token axis: "
                                   f"{', '.join(list(self.nodes)[:8])}{'...' if len(self.nodes) > 8 else ''}")
        return self.nodes[node]

    def matrix(self, node: str, kind: str = "predicted") -> np.ndarray:
        """The ``[T, T]`` token kernel at ``node``: ``kind`` "predicted" or "measured" (mean over examples)."""
        if kind not in ("predicted", "measured"):
            raise InvalidArgumentError(f"kind must be 'predicted' or 'measured', got {kind!r}")
        n = self._get(node)
        out = n.predicted if kind == "predicted" else n.measured
        return np.array(out, copy=True)

    def cos(self, node: str, kind: str = "predicted") -> float:
        """The mean off-diagonal token cosine at ``node``."""
        return _mean_cos(self.matrix(node, kind))

    def table(self) -> TokenTable:
        rows = TokenTable()
        for n in self.nodes.values():
            rows.append(TokenRow(n.name, n.tokens, n.predicted_cos, n.measured_cos, n.se, n.predicted_q, n.measured_q,
                                 n.status, n.reason))
        return rows

    def plot(self, nodes: Sequence[str] | None = None, ax: Any = None, label: str | None = None,
             x: Sequence[float] | None = None) -> Any:
        """Mean token cosine along ``nodes`` (default: every token node, in graph order): the
        prediction as a line, the measurement as points with ±2 SE bars, attention nodes marked.
        ``ax``/``label``/``x`` put several analyses on one axes. Returns the figure."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        names = list(nodes) if nodes is not None else list(self.nodes)
        for n in names:
            self._get(n)
        xs = np.arange(len(names)) if x is None else np.asarray(x, dtype=float)
        if len(xs) != len(names):
            raise InvalidArgumentError(f"x has {len(xs)} values for {len(names)} nodes")
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4))
        pred = np.array([self.nodes[n].predicted_cos for n in names])
        meas = np.array([self.nodes[n].measured_cos for n in names])
        se = np.array([self.nodes[n].se for n in names])
        tag = f"{label}: " if label else ""
        line, = ax.plot(xs, pred, "-", label=f"{tag}predicted")
        ax.errorbar(xs, meas, yerr=2 * np.nan_to_num(se), fmt="o", ms=3, color=line.get_color(), alpha=0.7,
                    label=f"{tag}measured (±2 SE)")
        att = [i for i, n in enumerate(names) if self.nodes[n].attention]
        if att and len(att) < len(names):
            ax.plot(xs[att], pred[att], "x", color=line.get_color(), ms=5)
        if x is None and len(names) <= 12:
            ax.set_xticks(xs, names, rotation=45, ha="right", fontsize=7)
        else:
            ax.set_xlabel("node (graph order)" if x is None else "depth")
        ax.set_ylabel("mean token cosine")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
        fig = fig or ax.figure
        fig.tight_layout()
        return fig

    def save_plot(self, path: str | os.PathLike, nodes: Sequence[str] | None = None, dpi: int = 120) -> Path:
        """Save :meth:`plot` to ``path`` atomically; the format comes from the extension."""
        import matplotlib.pyplot as plt

        path, figure = Path(path), self.plot(nodes)
        try:
            write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=dpi))
        finally:
            plt.close(figure)
        return path

    def summary(self) -> str:
        counts = {s: sum(n.status == s for n in self.nodes.values()) for s in _ORDER}
        last = self.attention[-1] if self.attention else (list(self.nodes)[-1] if self.nodes else None)
        tail = "" if last is None else (f"; at {last}: predicted cos {self.nodes[last].predicted_cos:.4f}, measured "
                                        f"{self.nodes[last].measured_cos:.4f} ± {self.nodes[last].se:.2g}")
        return (f"{len(self.nodes)} token nodes, {len(self.attention)} attention, start {self.start}, "
                f"{self.examples} sequences; " + ", ".join(f"{v} {k}" for k, v in counts.items()) + tail)


def _mean_cos(s: np.ndarray | None) -> float:
    """Mean off-diagonal cosine of a kernel matrix (pairs with a zero token left out)."""
    if s is None or s.shape[0] < 2:
        return float("nan")
    d = np.diag(s)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = s / np.sqrt(np.outer(d, d))
    off = ~np.eye(s.shape[0], dtype=bool) & np.isfinite(c)
    return float(c[off].mean()) if off.any() else float("nan")


# ---------------------------------------------------------------- axes
@dataclass(frozen=True)
class _Axes:
    """Where a tensor keeps its examples and tokens. ``token == batch``: both merged into one axis,
    examples outer (``x.view(-1, C)`` in front of a matmul), ``tokens`` of them per example."""

    batch: int
    token: int | None
    tokens: int | None = None

    @property
    def merged(self) -> bool:
        return self.token is not None and self.token == self.batch


def _token_count(m: "_Measured", name: str) -> int:
    ax = m.axes[name]
    return int(ax.tokens) if ax.merged else int(m.shapes[name][ax.token])


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(int(s), 1)
    return out[::-1]


def _map_axes(shape: Sequence[int], axes: _Axes, out: torch.Tensor, n: int) -> _Axes | None:
    """Where ``axes`` of a contiguous tensor of ``shape`` went in ``out`` (a view or copy of it
    computed on the meta device): the axis of ``out`` with the same stride and size (or a smaller
    size: a slice); the examples and tokens merged into one axis (examples outer) or split back
    out of it; None when the batch axis is lost or merged otherwise."""
    strides = _contiguous_strides(shape)

    def axis(stride: int, size: int) -> int | None:
        return next((b for b in range(out.dim()) if out.stride(b) == stride and out.shape[b] == size), None)

    if axes.merged:
        t, s = int(axes.tokens), strides[axes.batch]
        kept = axis(s, n * t)
        if kept is not None:
            return _Axes(kept, kept, t)
        b, tok = axis(s * t, n), axis(s, t)
        return _Axes(b, tok) if b is not None and tok is not None else None

    def find(a: int) -> int | None:
        cands = [b for b in range(out.dim()) if out.stride(b) == strides[a] and out.shape[b] > 0]
        same = [b for b in cands if out.shape[b] == shape[a]]
        fewer = [b for b in cands if out.shape[b] < shape[a]]
        return same[0] if same else fewer[0] if fewer else None

    b = find(axes.batch)
    if b is None or out.shape[b] != n:
        tok = axes.token
        if tok is not None and shape[tok] >= 2 and strides[axes.batch] == shape[tok] * strides[tok]:
            merged = axis(strides[tok], n * int(shape[tok]))
            if merged is not None:
                return _Axes(merged, merged, int(shape[tok]))
        return None
    t = find(axes.token) if axes.token is not None else None
    return _Axes(b, t if t != b else None)


def _flattened_patches(shape: Sequence[int], out_shape: Sequence[int]) -> int | None:
    """The token axis of a ``[B, C, H*W]`` (or ``[B, H*W, C]``) flattening of a ``[B, C, H, W]``
    (or ``[B, H, W, C]``) map, whose locations become the tokens; else None."""
    if len(shape) < 4 or len(out_shape) != 3:
        return None
    if out_shape[1] == shape[1] and out_shape[2] == math.prod(shape[2:]) > 1:
        return 2
    if out_shape[2] == shape[-1] and out_shape[1] == math.prod(shape[1:-1]) > 1:
        return 1
    return None


def _node_args(node: fx.Node) -> list[fx.Node]:
    """The fx nodes among the args (lists included), in order."""
    out: list[fx.Node] = []
    fx.node.map_arg(node.args, lambda a: out.append(a) or a)
    fx.node.map_arg(node.kwargs, lambda a: out.append(a) or a)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- attention sites
@dataclass
class _Site:
    node: str
    kind: str  # "sdpa", "module", "written"
    value: str | None  # the value node
    probs: str | None = None  # written out: the attention-matrix node
    scores: str | None = None  # written out: the q kᵀ node


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _is_matmul(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _MATMULS


def _find_sites(gm: fx.GraphModule, signal: set[str]) -> tuple[dict[str, _Site], set[str]]:
    """Attention nodes, and the nodes of written-out attention matrices (scores, softmax,
    dropout: their last axis holds keys, not features, so they are no token nodes)."""
    sites: dict[str, _Site] = {}
    weights: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _SDPA:
            v = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
            sites[node.name] = _Site(node.name, "sdpa", v.name if isinstance(v, fx.Node) else None)
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), (ShapedAttention, ValueSkipInit)):
            v = node.args[2] if len(node.args) > 2 else node.kwargs.get("v")
            sites[node.name] = _Site(node.name, "module", v.name if isinstance(v, fx.Node) else None)
        elif _is_matmul(node) and len(node.args) >= 2 and all(isinstance(a, fx.Node) and a.name in signal
                                                              for a in node.args[:2]):
            chain = _softmax_chain(node.args[0], signal)
            if chain is not None:
                nodes, scores = chain
                weights |= set(nodes)
                sites[node.name] = _Site(node.name, "written", node.args[1].name, node.args[0].name, scores)
    return sites, weights


def _single_signal_input(node: fx.Node, signal: set[str]) -> fx.Node | None:
    ins = [a for a in node.all_input_nodes if a.name in signal]
    return ins[0] if len(ins) == 1 else None


def _softmax_chain(p: fx.Node, signal: set[str]) -> tuple[list[str], str | None] | None:
    """``(nodes from the attention matrix back to the q kᵀ product, that product)`` when ``p`` is
    a softmax (through dropout, casts, reshapes and constant scales); None otherwise."""
    passing = (OpKind.IDENTITY, OpKind.RESHAPE, OpKind.AFFINE)
    nodes, cur = [], p
    for _ in range(8):
        nodes.append(cur.name)
        if op_info(cur).name == "softmax":
            break
        nxt = _single_signal_input(cur, signal)
        if nxt is None or op_info(cur).kind not in passing:
            return None
        cur = nxt
    else:
        return None
    cur = _single_signal_input(cur, signal)
    for _ in range(8):  # scale, mask (added, masked_fill, where), casts
        if cur is None:
            return nodes, None
        if _is_matmul(cur):
            nodes.append(cur.name)
            return nodes, cur.name
        nodes.append(cur.name)
        cur = _single_signal_input(cur, signal)
    return nodes, None


# ---------------------------------------------------------------- the measured run
@dataclass
class _Attn:
    """An attention node's matrices: ``fixed`` ``[H, T, S]`` when every example has the same, else
    ``per_example`` ``[N, H, T, S]`` (float32); ``zero_logits``: its queries or keys are zero."""

    fixed: np.ndarray | None = None
    per_example: torch.Tensor | None = None
    zero_logits: bool = False
    problem: str | None = None


@dataclass
class _Measured:
    axes: dict[str, Any] = field(default_factory=dict)  # node -> _Axes | list | None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    grams: dict[str, np.ndarray] = field(default_factory=dict)  # [B, T, T]: each example's Gram
    cos: dict[str, np.ndarray] = field(default_factory=dict)  # per-example mean cosine
    attn: dict[str, _Attn] = field(default_factory=dict)
    zero: dict[str, bool] = field(default_factory=dict)  # scores node -> an operand is zero
    parts: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # node -> (nn.Linear node, its rows)


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


class _Run(fx.Interpreter):
    """Runs the graph once on all the examples, following the batch and token axes from node to
    node and recording the token Grams and the attention matrices."""

    def __init__(self, gm: fx.GraphModule, n: int, signal: set[str], sites: dict[str, _Site],
                 weights: set[str]) -> None:
        super().__init__(gm)
        self.n, self.signal, self.sites, self.weights = n, signal, sites, weights
        self.scores = {s.scores: s.node for s in sites.values() if s.scores}
        self.m = _Measured()
        self.rows: dict[str, tuple[str, Any]] = {}  # node -> (nn.Linear node, the Linear's output index of each entry)
        self.width: dict[str, int] = {}
        self.numel: dict[str, int] = {}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.index = {n.name: i for n, i in order.items()}
        self.last_user = {n.name: max((order[u] for u in n.users), default=-1) for n in gm.graph.nodes}

    def run_node(self, node: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        out = super().run_node(node)
        if isinstance(out, torch.Tensor):
            self.m.shapes[node.name] = tuple(out.shape)
        axes = self._axes(node, args, kwargs, out)
        self.m.axes[node.name] = axes
        if isinstance(axes, _Axes) and axes.token is not None and _is_float(out) and node.name in self.signal \
                and node.name not in self.weights and node.op != "output" \
                and (axes.tokens if axes.merged else out.shape[axes.token]) >= 2:
            self._gram(node.name, out, axes)
        if node.name in self.scores:
            self.m.zero[node.name] = any(_is_float(a) and not bool(a.any()) for a in args[:2])
        if node.name in self.sites:
            self._attention(node, self.sites[node.name], args, kwargs, out)
        self._rows(node, args, kwargs, out)
        return out

    # which outputs of a linear layer a reshaped part holds --------------------------------------
    def _rows(self, node: fx.Node, args: tuple, kwargs: dict, out: Any) -> None:
        """Follow the output index of an ``nn.Linear`` through reshapes, permutes and splits, so a
        part of its features (the ``v`` of a fused ``qkv``) is known by the rows that make it."""
        kind = op_info(node).kind
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if dense_weights(self.module, node) is not None \
                and _is_float(out) and any(op_info(u).kind in (OpKind.RESHAPE, OpKind.IDENTITY) for u in node.users):
            index = torch.arange(out.shape[-1], dtype=torch.int32, device=out.device)
            self.rows[node.name] = (node.name, index.expand(out.shape).contiguous())  # views need real strides
            self.width[node.name] = int(out.shape[-1])
            self.numel[node.name] = out.numel()
        elif src is not None and src.name in self.rows and node.op in ("call_method", "call_function") \
                and kind in (OpKind.RESHAPE, OpKind.IDENTITY):
            lin, idx = self.rows[src.name]
            try:
                if node.target is operator.getitem and isinstance(idx, list):
                    res = idx[node.args[1]]
                elif any(isinstance(a, torch.Tensor) for a in list(args[1:]) + list(kwargs.values())):
                    res = None
                elif node.op == "call_method":
                    res = getattr(idx, node.target)(*args[1:], **kwargs)
                else:
                    res = node.target(idx, *args[1:], **kwargs)
            except Exception:  # noqa: BLE001 - the part stays unknown
                res = None
            if isinstance(res, (tuple, list)):
                self.rows[node.name] = (lin, list(res))
            elif isinstance(res, torch.Tensor) and isinstance(out, torch.Tensor) \
                    and tuple(res.shape) == tuple(out.shape):
                self.rows[node.name] = (lin, res)
                width = self.width[lin]
                if res.numel() < self.numel[lin]:  # fewer entries than the whole output: a part of the rows
                    rows = torch.bincount(res.reshape(-1).long(), minlength=width).nonzero().flatten()
                    if len(rows) < width:
                        self.m.parts[node.name] = (lin, rows.cpu().numpy())
        i = self.index[node.name]
        for a in node.all_input_nodes:
            if self.last_user.get(a.name) == i:
                self.rows.pop(a.name, None)

    # axes -----------------------------------------------------------------
    def _axes(self, node: fx.Node, args: tuple, kwargs: dict, out: Any) -> Any:
        if node.op == "placeholder":
            if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != self.n:
                return None
            token = 1 if (out.dim() == 2 and not out.is_floating_point()) or (out.dim() == 3 and _is_float(out)) \
                else None
            return _Axes(0, token)
        if node.op in ("get_attr", "output"):
            return None
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and isinstance(self.m.axes.get(node.args[0].name), list) and isinstance(node.args[1], int):
            items = self.m.axes[node.args[0].name]
            return items[node.args[1]] if -len(items) <= node.args[1] < len(items) else None
        main = next((a for a in _node_args(node) if isinstance(self.m.axes.get(a.name), _Axes)), None)
        if main is None or main.name not in self.m.shapes:
            return None
        axes, shape = self.m.axes[main.name], self.m.shapes[main.name]
        kind = op_info(node).kind
        if node.op in ("call_method", "call_function") and kind in (OpKind.RESHAPE, OpKind.IDENTITY) \
                and node.args and node.args[0] is main:
            sim = self._simulate(node, args, kwargs, shape)
            if sim is not None:
                if isinstance(sim, (tuple, list)):
                    return [_map_axes(shape, axes, t, self.n) if isinstance(t, torch.Tensor) else None for t in sim]
                if isinstance(sim, torch.Tensor):
                    mapped = _map_axes(shape, axes, sim, self.n)
                    if mapped is not None and mapped.token is None and axes.token is None and axes.batch == 0:
                        t = _flattened_patches(shape, tuple(sim.shape))
                        return _Axes(0, t) if t is not None else mapped
                    return mapped
            return None
        if isinstance(out, (tuple, list)):  # a module or op with several outputs: each element alike
            return [self._same(axes, shape, t) for t in out]
        return self._same(axes, shape, out)

    def _same(self, axes: _Axes, shape: tuple[int, ...], out: Any) -> _Axes | None:
        """The axes of an op that keeps its input's layout (elementwise, linear, attention...)."""
        if not isinstance(out, torch.Tensor):
            return None
        if out.dim() == len(shape) and out.shape[axes.batch] == self.n * (axes.tokens if axes.merged else 1):
            return axes
        if out.dim() == len(shape) + 1 and tuple(out.shape[:-1]) == tuple(shape):  # an embedding lookup
            return axes
        return None

    @staticmethod
    def _simulate(node: fx.Node, args: tuple, kwargs: dict, shape: tuple[int, ...]) -> Any:
        """The op applied to a contiguous meta tensor of the input's shape (its view semantics),
        or None when it has other tensor operands or fails there."""
        tensors: list[torch.Tensor] = []
        fx.node.map_aggregate((args[1:], kwargs), lambda a: tensors.append(a) if isinstance(a, torch.Tensor) else a)
        if tensors:
            return None
        meta = torch.empty(shape, device="meta")
        try:
            if node.op == "call_method":
                return getattr(meta, node.target)(*args[1:], **kwargs)
            return node.target(meta, *args[1:], **kwargs)
        except Exception:  # noqa: BLE001 - an op that does not run on meta tensors loses the axes
            return None

    # measurements ---------------------------------------------------------
    def _gram(self, name: str, out: torch.Tensor, axes: _Axes) -> None:
        if axes.merged:
            t = int(axes.tokens)
            x = out.detach().movedim(axes.batch, 0).reshape(self.n, t, -1).double()
        else:
            t = out.shape[axes.token]
            x = out.detach().movedim((axes.batch, axes.token), (0, 1)).reshape(self.n, t, -1).double()
        if x.shape[2] == 0:
            return
        g = x @ x.transpose(1, 2) / x.shape[2]
        self.m.grams[name] = g.cpu().numpy()
        d = torch.diagonal(g, dim1=1, dim2=2)
        c = g / (d[:, :, None] * d[:, None, :]).sqrt()
        off = ~torch.eye(t, dtype=torch.bool)
        c = torch.where(off & torch.isfinite(c), c, torch.full_like(c, float("nan")))
        self.m.cos[name] = torch.nanmean(c.reshape(self.n, -1), dim=1).cpu().numpy()

    def _attention(self, node: fx.Node, site: _Site, args: tuple, kwargs: dict, out: Any) -> None:
        rec = _Attn()
        self.m.attn[node.name] = rec
        try:
            if site.kind == "written":
                a = args[0]
                rec.zero_logits = bool(self.m.zero.get(site.scores, False)) if site.scores else False
            else:
                a = self._probe(node, args, kwargs)
                q, k = (args[0], args[1]) if len(args) >= 2 else (None, None)
                rec.zero_logits = any(_is_float(x) and not bool(x.any()) for x in (q, k))
        except Exception as exc:  # noqa: BLE001 - reported as the node's reason
            rec.problem = f"its attention matrix could not be read ({type(exc).__name__})"
            return
        axes = self.m.axes.get(node.name)
        if not (_is_float(a) and isinstance(axes, _Axes) and axes.token == a.dim() - 2):
            rec.problem = "its output does not hold the tokens in the second-to-last axis"
            return
        a = a.detach().movedim(axes.batch, 0)
        a = a.reshape(self.n, -1, a.shape[-2], a.shape[-1])
        scale = float(a.abs().max()) or 1.0
        if float((a - a[:1]).abs().max()) <= _SAME_A * scale:
            rec.fixed = a[0].double().cpu().numpy()
        else:
            rec.per_example = a.float().cpu().clone()

    def _probe(self, node: fx.Node, args: tuple, kwargs: dict) -> torch.Tensor:
        """The attention matrix of an sdpa call or an attention module: the call with the value
        replaced by the identity over the keys (its output is linear in the value)."""
        args = list(args)
        v = args[2] if len(args) > 2 else kwargs.get("value" if _is_sdpa(node) else "v")
        s = v.shape[-2]
        eye = torch.eye(s, dtype=v.dtype, device=v.device).expand(*v.shape[:-2], s, s)
        if len(args) > 2:
            args[2] = eye
        else:
            kwargs = {**kwargs, ("value" if _is_sdpa(node) else "v"): eye}
        with torch.no_grad():
            if node.op == "call_module":
                return self.module_of(node)(*args, **kwargs)
            return node.target(*args, **kwargs)

    def module_of(self, node: fx.Node) -> nn.Module:
        return self.module.get_submodule(node.target)


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is _SDPA


# ---------------------------------------------------------------- prediction
# matmul-like functions: the position of the right-hand matrix among the args
_RIGHT_OPERAND = {operator.matmul: 1, torch.matmul: 1, torch.mm: 1, torch.bmm: 1, torch.addmm: 2, torch.baddbmm: 2}


def _mixing(node: fx.Node, gm: fx.GraphModule, m: _Measured, signal: set[str], signals: set[fx.Node]) -> str | None:
    """Why ``node`` mixes tokens (so it is measured), or None for a token-pointwise node."""
    info = op_info(node)
    axes = m.axes[node.name]
    out_shape = m.shapes[node.name]
    t = axes.token
    ins = [a for a in node.all_input_nodes if a.name in signal]
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and isinstance(m.axes.get(node.args[0].name), list):
        return f"an element of the tuple output of {node.args[0].name}"
    tokens = [a for a in ins if isinstance(m.axes.get(a.name), _Axes) and a.name in m.grams]
    if not tokens:
        return _SOURCE
    kind = info.kind
    if kind is OpKind.CONCAT:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if not isinstance(dim, int):
            return "concatenation along an unknown axis"
        if dim % len(out_shape) == t:
            return "concatenation along the tokens (a cls token, registers)"
    for a in ins:
        if a not in tokens:
            return f"its input {a.name} has no token axis"
        if _token_count(m, a.name) != _token_count(m, node.name):
            return f"changes the number of tokens ({_token_count(m, a.name)} -> {_token_count(m, node.name)})"
    if _name(node) in _REORDER:
        return f"{_name(node)} reorders or gathers entries"
    first = ins[0]
    in_axes = m.axes[first.name]
    if kind is OpKind.LINEAR:
        if in_axes.token == len(m.shapes[first.name]) - 1:
            return "a linear map over the token axis"
        right = _RIGHT_OPERAND.get(node.target) if node.op == "call_function" else None
        if right is not None and len(node.args) > right and node.args[right] is first:
            # the signal as a matmul's right operand: contracted along its second-to-last axis
            dim = len(m.shapes[first.name]) - 2
            if dim in (in_axes.token, in_axes.batch):
                return "a linear map over the token axis"
        return None
    if kind is OpKind.CONV:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        ks = getattr(mod, "kernel_size", None)
        if mod is None or ks is None or any(k != 1 for k in ks) or any(s != 1 for s in getattr(mod, "stride", (1,))):
            return "a convolution along the sequence"
        return None
    if kind is OpKind.NORM:
        return _norm_mixing(node, gm, info, in_axes, m.shapes[first.name])
    if kind is OpKind.AFFINE:
        if info.constant_factor is not None:
            return None
        found = affine_map(gm, node, signals.__contains__)
        if found is not None and any(_varies_along(c, out_shape, t) for c in (found.s, found.t)):
            return "a position-dependent scale or shift (position embedding)"
        return None
    if kind is OpKind.CONCAT:
        return None
    if kind in (OpKind.ACTIVATION, OpKind.ADD, OpKind.MULTIPLY, OpKind.RESHAPE, OpKind.IDENTITY):
        return None
    if kind is OpKind.OTHER and info.attrs.get("op_key") == "op:normalize":
        dim = info.attrs.get("dim", 1)
        if isinstance(dim, int) and dim % len(out_shape) not in (t, axes.batch):
            return None
        return "normalizes along the tokens"
    if kind is OpKind.POOL:
        return "pooling"
    return info.attrs.get("reason") or f"no token rule for {info.name}"


def _norm_mixing(node: fx.Node, gm: fx.GraphModule, info: Any, axes: _Axes, shape: tuple[int, ...]) -> str | None:
    spec = info.norm
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    if spec is None or mod is None:
        return "a normalization without a module"
    if spec.family is NormFamily.BATCH:
        return "batch norm over the token axis" if axes.token == 1 or axes.merged else None
    if spec.family in (NormFamily.LAYER, NormFamily.RMS):
        dims = getattr(mod, "normalized_shape", None)
        count = len(dims) if isinstance(dims, (tuple, list, torch.Size)) else 1
        if axes.token >= len(shape) - count:
            return "a norm over the token axis"
        return None
    if spec.family is NormFamily.MINIMAL_RMS:
        return None
    if info.attrs.get("per_location"):  # LocationNorm: over the channels of each location
        return "a norm over the token axis" if getattr(mod, "dim", 1) % len(shape) == axes.token else None
    return f"a {spec.family} norm mixes the statistics of the tokens"


def _varies_along(c: torch.Tensor, shape: Sequence[int], axis: int) -> bool:
    if c.dim() == 0:
        return False
    lead = len(shape) - c.dim()
    if lead < 0:
        return True
    ax = axis - lead
    if ax < 0 or c.shape[ax] == 1:
        return False
    return bool((c - c.narrow(ax, 0, 1)).abs().max() > 0)


def _same_q(d: np.ndarray) -> bool:
    top = float(np.max(np.abs(d))) if d.size else 0.0
    return top == 0.0 or float(np.max(d) - np.min(d)) <= _SAME_Q * top


def _rule(node: fx.Node, gm: fx.GraphModule, sigmas: list[np.ndarray], dims: list[int], out_dims: int,
          cache: dict) -> tuple[np.ndarray, str, str] | None:
    """The engine's rule of ``node`` applied to the examples' token kernels (``[B, T, T]`` each):
    with every example's token pairs as its grid (one call, exact when the rule reads no q or every
    token has the same q); an activation at every pair with its two tokens' own q (exact); any
    other rule row by row at each token's own q, the two orders of every pair combined by their
    geometric mean (approximate)."""
    info = op_info(node)
    shape = sigmas[0].shape
    if info.kind in _Q_FREE or all(_same_q(np.diagonal(s, axis1=-2, axis2=-1)) for s in sigmas):
        ins = []
        for s, n in zip(sigmas, dims):
            q = float(np.mean(np.diagonal(s, axis1=-2, axis2=-1)))
            ins.append(NodeKernel(q, q, s.ravel().copy(), 1.0, EXACT, "", n))
        out = propagate_node(node, info, gm, ins, maps_for, out_dims, cache)
        if out is None:
            return None
        k = np.asarray(out.k, dtype=float).reshape(shape)
        return 0.5 * (k + np.swapaxes(k, -1, -2)), out.status, out.reason
    if len(sigmas) == 1 and info.kind is OpKind.ACTIVATION:
        found = _pairwise(info, sigmas[0])
        if found is not None:
            return found
    per, status, reason = [], EXACT, ""
    for b in range(shape[0]):
        found = _row_rule(node, info, gm, [s[b] for s in sigmas], dims, out_dims, cache)
        if found is None:
            return None
        per.append(found[0])
        status, reason = worse(status, found[1]), reasons(reason, found[2])
    if info.kind is not OpKind.NORM and info.attrs.get("op_key") != "op:normalize":
        d = np.concatenate([np.diagonal(s, axis1=-2, axis2=-1).ravel() for s in sigmas])
        spread = float((d.max() - d.min()) / max(abs(d.mean()), 1e-300))
        status = worse(status, APPROX)
        reason = reasons(reason, f"tokens' q differ (spread {spread:.2g}): each pair taken at equal q, "
                                 f"geometric mean of both orders")
    return np.stack(per), status, reason


def _row_rule(node: fx.Node, info: Any, gm: fx.GraphModule, sigmas: list[np.ndarray], dims: list[int],
              out_dims: int, cache: dict) -> tuple[np.ndarray, str, str] | None:
    """:func:`_rule`'s row-by-row path on one example's ``[T, T]`` kernels."""
    t = sigmas[0].shape[0]
    rows, status, reason = [], EXACT, ""
    cos = []
    for s in sigmas:
        d = np.diag(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = s / np.sqrt(np.outer(d, d))
        cos.append(np.where(np.isfinite(c), c, 0.0))
    for i in range(t):
        ins = [NodeKernel(float(s[i, i]), float(s[i, i]), c[i] * s[i, i], 1.0, EXACT, "", n)
               for s, c, n in zip(sigmas, cos, dims)]
        out = propagate_node(node, info, gm, ins, maps_for, out_dims, cache)
        if out is None:
            return None
        rows.append(np.asarray(out.k, dtype=float))
        status, reason = worse(status, out.status), reasons(reason, out.reason)
    r = np.array(rows)
    prod = r * r.T
    sym = np.where(prod > 0, np.sign(r) * np.sqrt(np.abs(prod)), 0.5 * (r + r.T))
    np.fill_diagonal(sym, np.diag(r))
    return sym, status, reason


def _pairwise(info: Any, s: np.ndarray) -> tuple[np.ndarray, str, str] | None:
    """An activation at every token pair with each token's own q (``s``: ``[B, T, T]``): its local
    maps take the two points' mean squares separately (docs/theory.md §2), so this is as exact as
    the maps are."""
    maps = maps_for(info.activation) if info.activation is not None else None
    if maps is None:
        return None
    d = np.diagonal(s, axis1=-2, axis2=-1)
    q1, q2 = (np.ascontiguousarray(a) for a in np.broadcast_arrays(d[..., :, None], d[..., None, :]))
    k = activation_kernel(maps, q1, q2, s)
    t = s.shape[-1]
    k[..., np.arange(t), np.arange(t)] = np.asarray(maps.q_map(d), dtype=float)
    return 0.5 * (k + np.swapaxes(k, -1, -2)), EXACT, ""


def _attend(rec: _Attn, sigma: np.ndarray) -> np.ndarray:
    """Each example's ``mean over heads of A Σ Aᵀ`` (``sigma``: ``[B, S, S]``; ``A``: fixed
    ``[H, T, S]`` or per example ``[B, H, T, S]``)."""
    a = rec.fixed[None] if rec.fixed is not None else rec.per_example.double().numpy()
    out = []
    for b in range(sigma.shape[0]):
        ab = a[0] if a.shape[0] == 1 else a[b]
        out.append(np.mean(ab @ sigma[b] @ np.swapaxes(ab, -1, -2), axis=0))
    return np.stack(out)


def _independent(grams: np.ndarray) -> np.ndarray:
    """Independent tokens with the measured mean q, for every example of ``grams`` ``[B, T, T]``."""
    b, t = grams.shape[:2]
    q = float(np.mean(np.diagonal(grams, axis1=-2, axis2=-1)))
    return np.repeat((q * np.eye(t))[None], b, axis=0)


def _dominates(gm: fx.GraphModule, d: str, target: str, signal: set[str]) -> bool:
    """Whether every signal path from the inputs to ``target`` passes through ``d``."""
    seen: set[str] = set()
    todo = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name != d]
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.name == target:
            return False
        todo.extend(u for u in n.users if u.name in signal and u.name != d)
    return True


@dataclass
class _P:
    """One node's prediction: ``sigma`` with its ``status`` and ``reason``; ``measured``: taken from
    the measurement; ``origin``: the node whose rule (or measurement) made the status what it is."""

    sigma: np.ndarray
    status: str
    reason: str
    measured: bool = False
    origin: str | None = None


def _predict(gm: fx.GraphModule, topo: Topology, m: _Measured, sites: dict[str, _Site], order: list[str],
             start: str | None, start_kernel: np.ndarray | None, signal: set[str],
             fit: Callable[[fx.Node, nn.Module, np.ndarray], None] | None = None) -> dict[str, _P]:
    """The predicted token kernel of every token node, in graph order."""
    nodes = {n.name: n for n in gm.graph.nodes}
    signals = signal_nodes(gm)
    skip = {**correlated_sums(topo), **dependent_products(topo)}
    cache: dict[int, Any] = {}
    out: dict[str, _P] = {}
    clean = {start} if start is not None else set()  # measured nodes whose users are not "downstream of measured"
    for name in order:
        node = nodes[name]
        if name == start:
            sigma = start_kernel if start_kernel is not None else m.grams[name]
            how = "given" if start_kernel is not None else "measured"
            out[name] = _P(sigma, MEASURED, f"start of the prediction ({how} token kernel)", True, name)
            continue
        found = None
        if name in m.parts and name not in sites:
            found = _part_rule(gm, nodes, m.parts[name], out, clean, name)
        found = found or _split_item(node, m, out, clean)
        if found is not None:
            out[name] = found
            continue
        why = _site_problem(name, sites, m, out) if name in sites else skip.get(name) \
            or _mixing(node, gm, m, signal, signals)
        if why is None and name in sites:
            out[name] = _attention_rule(gm, node, sites[name], m, out, clean, fit)
            continue
        if why is None:
            ins = [a for a in node.all_input_nodes if a.name in signal]
            sigmas = [out[a.name].sigma for a in ins]
            res = None
            if all(np.isfinite(x).all() for x in sigmas):
                res = _rule(node, gm, sigmas, [_per_example(m, a.name) for a in ins], _per_example(m, name), cache)
                if res is None:
                    info = op_info(node)
                    why = info.attrs.get("reason") or f"no kernel map for {info.describe()}"
            else:
                why = "its input kernel is not finite"
            if res is not None:
                out[name] = _inherit(_P(*res, origin=name if res[1] != EXACT else None),
                                     [(a.name, out[a.name]) for a in ins], clean)
                continue
        if why == _SOURCE:
            clean.add(name)
        out[name] = _P(m.grams[name], MEASURED, why, True, name)
    return out


def _inherit(p: _P, inputs: list[tuple[str, _P]], clean: set[str]) -> _P:
    """``p`` made no more exact than its inputs: a measured input (other than the start or a
    first token node) makes it approximate; the reason names where an inherited status comes from."""
    for name, q in inputs:
        status, origin = (APPROX, name) if q.measured and name not in clean else (q.status, q.origin)
        if q.measured and name in clean:
            continue
        if _ORDER.index(status) > _ORDER.index(p.status):
            p.status, p.origin = status, origin
            note = f"downstream of the measured {name}" if q.measured else f"after {status} {origin}"
            p.reason = reasons(p.reason, note)
    return p


def _part_rule(gm: fx.GraphModule, nodes: dict[str, fx.Node], part: tuple[str, np.ndarray], out: dict[str, _P],
               clean: set[str], name: str) -> _P | None:
    """Some outputs of an ``nn.Linear`` (the ``q``, ``k`` or ``v`` of a fused ``qkv``, split by reshapes):
    the linear rule with those rows' weights, ``Σ ← fan_in · mean(W_rows²) Σ + mean(b_rows²)``."""
    lin, rows = part
    node = nodes[lin]
    src = next((a for a in node.all_input_nodes if a.name in out), None)  # addmm's input is its second arg
    if src is None:
        return None
    weight, bias = dense_weights(gm, node)
    idx = torch.as_tensor(rows, dtype=torch.long)
    w = weight.detach().double().cpu()[idx]
    sw = w.shape[1] * float(w.pow(2).mean())
    sb = float(bias.detach().double().cpu()[idx].pow(2).mean()) if bias is not None else 0.0
    p = _P(sw * out[src.name].sigma + sb, EXACT, f"outputs {_ranges(rows)} of {lin}")
    return _inherit(p, [(src.name, out[src.name])], clean)


def _ranges(rows: np.ndarray) -> str:
    """``a:b`` runs of sorted row indices, e.g. ``512:768``."""
    rows = np.sort(np.asarray(rows))
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = [f"{r[0]}:{r[-1] + 1}" if len(r) > 1 else str(r[0]) for r in np.split(rows, cuts)]
    return ",".join(runs[:4]) + (",..." if len(runs) > 4 else "")


def _split_item(node: fx.Node, m: _Measured, out: dict[str, _P], clean: set[str]) -> _P | None:
    """A tensor taken from the tuple of a split (``unbind``, ``chunk``, ``split``) of a token node
    along the features, not traced back to a linear layer's rows: the whole one's kernel, the
    features taken alike."""
    if node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    whole = node.args[0]
    if not isinstance(m.axes.get(whole.name), list) or op_info(whole).kind is not OpKind.RESHAPE or not whole.args:
        return None
    src = whole.args[0]
    if not isinstance(src, fx.Node) or src.name not in out or m.shapes.get(src.name) is None:
        return None
    ax, sax = m.axes.get(node.name), m.axes.get(src.name)
    if not (isinstance(ax, _Axes) and isinstance(sax, _Axes)) \
            or _token_count(m, node.name) != _token_count(m, src.name):
        return None
    p = _P(out[src.name].sigma, APPROX, f"a part of the features of {src.name}, taken alike", origin=node.name)
    return _inherit(p, [(src.name, out[src.name])], clean)


def _per_example(m: _Measured, name: str) -> int:
    shape, ax = m.shapes[name], m.axes[name]
    examples = shape[ax.batch] // int(ax.tokens) if ax.merged else shape[ax.batch]
    return int(math.prod(shape) // max(examples, 1))


def _site_problem(name: str, sites: dict[str, _Site], m: _Measured, out: dict[str, _P]) -> str | None:
    site, rec = sites[name], m.attn.get(name)
    if rec is None or rec.problem:
        return f"attention: {rec.problem if rec else 'not reached'}"
    if site.value is None or site.value not in out:
        return "attention: its value has no token kernel"
    if not np.isfinite(out[site.value].sigma).all():
        return "attention: its value's kernel is not finite"
    a = rec.fixed if rec.fixed is not None else rec.per_example
    if a.shape[-1] != out[site.value].sigma.shape[-1]:
        return "attention: its value's tokens do not match the keys"
    return None


def _attention_rule(gm: fx.GraphModule, node: fx.Node, site: _Site, m: _Measured, out: dict[str, _P],
                    clean: set[str], fit: Callable[[fx.Node, nn.Module, np.ndarray], None] | None = None) -> _P:
    """Each example's ``Σ -> mean over heads of A Σ_v Aᵀ`` (docs/transformers.md). With ``fit``, a
    ShapedAttention is first fitted to the value kernel it receives (:func:`fit_shaped_attention`)."""
    rec = m.attn[site.node]
    mod = gm.get_submodule(node.target) if site.kind == "module" else None
    if fit is not None and isinstance(mod, ShapedAttention) and rec.fixed is not None:
        fit(node, mod, out[site.value].sigma)
        init = mod.init_matrix(rec.fixed.shape[-1]).numpy()
        p = _P(_attend(_Attn(fixed=init), out[site.value].sigma), EXACT,
               f"attention: A = {type(mod).__name__}.init_matrix(), rows fitted to its value kernel")
        return _inherit(p, [(site.value, out[site.value])], clean)
    status, why = APPROX, "attention: A measured on the inputs, A Σ Aᵀ per example averaged over heads"
    if rec.fixed is not None and site.kind == "module":
        mod = gm.get_submodule(node.target)
        t = rec.fixed.shape[-2]
        init = mod.init_matrix(t).numpy() if rec.fixed.shape[-1] == t else None
        if init is not None and init.shape[-2:] == rec.fixed.shape[-2:] and init.shape[0] in (1, rec.fixed.shape[0]) \
                and float(np.abs(init - rec.fixed).max()) <= 1e-5:
            rec = _Attn(fixed=np.broadcast_to(init, rec.fixed.shape))
            status, why = EXACT, f"attention: A = {type(mod).__name__}.init_matrix() (zero query-key logits)"
    elif rec.fixed is not None and rec.zero_logits:
        status, why = EXACT, "attention: fixed A (zero queries or keys: the softmax of the mask)"
    if status == EXACT and float(np.abs(rec.fixed - rec.fixed[:1]).max()) > 1e-9:
        status, why = APPROX, why + "; heads' matrices differ: each head's value kernel taken as the whole one"
    p = _P(_attend(rec, out[site.value].sigma), status, why, origin=node.name if status != EXACT else None)
    return _inherit(p, [(site.value, out[site.value])], clean)


# ---------------------------------------------------------------- inputs
def _random_like(gm: fx.GraphModule, example: tuple[torch.Tensor, ...], seed: int, batch: int
                 ) -> tuple[torch.Tensor, ...]:
    """Random inputs of the kind of ``example``: Gaussian with its mean and standard deviation
    for floats, uniform ids below the embedding table's size for integers; others repeated."""
    g = torch.Generator().manual_seed(seed)
    vocab = [gm.get_submodule(n.target).num_embeddings for n in embedding_sources(gm)]
    out = []
    for x in example:
        shape = (batch,) + tuple(x.shape[1:])
        if x.is_floating_point():
            mu, sd = float(x.double().mean()), float(x.double().std()) if x.numel() > 1 else 1.0
            out.append((mu + (sd or 1.0) * torch.randn(shape, generator=g, dtype=torch.float64)).to(x.device, x.dtype))
        elif x.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            top = min(vocab) if vocab else int(x.max()) + 1
            out.append(torch.randint(0, max(top, 1), shape, generator=g).to(x.device, x.dtype))
        else:
            out.append(x[torch.arange(batch, device=x.device) % x.shape[0]])
    return tuple(out)


def _examples(gm: fx.GraphModule, example: tuple[torch.Tensor, ...], seeds: Any, batch: int | None
              ) -> tuple[torch.Tensor, ...]:
    if seeds is None:
        return example
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise InvalidArgumentError(f"token_kernels: seeds must be at least 1, got {seeds}")
        seeds = list(range(seeds))
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise InvalidArgumentError(f"token_kernels: seeds must be a positive int or a sequence of ints, got {seeds!r}")
    per = batch or example[0].shape[0]
    runs = [_random_like(gm, example, s, per) for s in seeds]
    return tuple(torch.cat([r[i] for r in runs]) for i in range(len(example)))


# ---------------------------------------------------------------- entry point
def token_kernels(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, *,
                  seeds: int | Sequence[int] | None = None, batch: int | None = None,
                  start: str | np.ndarray = "measured", topology: Topology | None = None) -> TokenAnalysis:
    """Measured and predicted token kernels at every node with a token axis (docs/transformers.md).

    Args:
        model: a sequence model (``nn.Module`` or traced GraphModule; run in eval mode).
        example_inputs: an input batch: token ids ``[B, T]``, tokens ``[B, T, C]`` or images
            (a patch embedding flattened to ``[B, C, T]`` or ``[B, T, C]``). Each example is one
            sequence; at least two are needed for a standard error.
        seeds: None (default) measures on ``example_inputs``; an int ``n`` or a list of seeds
            measures on one random batch of the same kind per seed instead (Gaussian with the
            example's mean and standard deviation for floats, uniform ids below the embedding
            table's size for token ids), all in one run.
        batch: sequences per seed. Default: the example's batch size.
        start: the kernel the prediction starts from at the start node: ``"measured"`` (default,
            its mean measured Gram), ``"independent"`` (``q I`` with ``q`` its measured mean
            square: the wide-limit kernel of independent tokens, e.g. distinct random embedding
            rows) or a ``[T, T]`` array.
        topology: the model's :class:`~netsurgeon.graph.Topology` when already built (on the
            traced ``model`` with these inputs).

    Returns:
        A :class:`TokenAnalysis`.

    Raises:
        InvalidArgumentError: bad ``seeds``/``batch``/``start``; :class:`NoTokenAxisError` (a
            subclass) for a model without a token axis.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not example_inputs or not isinstance(example_inputs[0], torch.Tensor):
        raise InvalidArgumentError("token_kernels needs example inputs (a tensor or a tuple of tensors)")
    example_inputs = tuple(example_inputs)
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise InvalidArgumentError(f"token_kernels: batch must be a positive int, got {batch!r}")
    if not (isinstance(start, np.ndarray) or start in ("measured", "independent")):
        raise InvalidArgumentError(f"token_kernels: start must be 'measured', 'independent' or a [T, T] array, "
                                   f"got {start!r}")
    gm = model if isinstance(model, fx.GraphModule) else trace(model, example_inputs)
    with eval_mode(gm):
        if topology is None:
            with example_run(gm.__class__.__name__, example_inputs):
                topology = Topology(gm, example_inputs)
        inputs = _examples(gm, example_inputs, seeds, batch)
        n = int(inputs[0].shape[0])
        signal = {name for name, d in topology.graph.nodes(data=True) if d["signal"]}
        sites, weights = _find_sites(gm, signal)
        run = _Run(gm, n, signal, sites, weights)
        with torch.no_grad(), example_run(gm.__class__.__name__, inputs):
            run.run(*inputs)
    m = run.m
    order = [node.name for node in gm.graph.nodes if node.name in m.grams]
    if not order:
        raise NoTokenAxisError(f"{type(model).__name__} has no node with a token axis (inputs of shape "
                               f"{tuple(example_inputs[0].shape)}): token_kernels needs token ids [B, T], "
                               f"tokens [B, T, C] or a patch embedding flattened to [B, C, T]")
    attention = [s for s in order if s in sites]
    # first pass: which nodes are measured; the start is the last of them that every path to the
    # first attention node goes through
    first = _predict(gm, topology, m, sites, order, None, None, signal)
    start_node = order[0]
    if attention:
        before = order[:order.index(attention[0])]
        for name in reversed(before):
            if first[name].measured and _dominates(gm, name, attention[0], signal):
                start_node = name
                break
    kernel = None
    if isinstance(start, np.ndarray):
        b, t = m.grams[start_node].shape[:2]
        if start.shape != (t, t):
            raise InvalidArgumentError(f"token_kernels: start must be [{t}, {t}] at {start_node}, got {start.shape}")
        kernel = np.repeat(np.asarray(start, dtype=float)[None], b, axis=0)
    elif start == "independent":
        kernel = _independent(m.grams[start_node])
    pred = _predict(gm, topology, m, sites, order, start_node, kernel, signal)
    nodes: dict[str, TokenNode] = {}
    for name in order:
        p, ax = pred[name], m.axes[name]
        nodes[name] = TokenNode(name, _token_count(m, name), (ax.batch, ax.token), m.grams[name].mean(0),
                                m.cos[name], np.asarray(p.sigma, dtype=float).mean(0), p.status, p.reason,
                                name in sites)
    return TokenAnalysis(nodes, start_node, attention, n)


def fit_shaped_attention(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor
                         ) -> list[tuple[str, float, float]]:
    """Rescale the rows of every :class:`~netsurgeon.layers.ShapedAttention` of ``gm``, in graph order,
    so that every token leaves the block with the mean q of the value kernel it receives
    (:func:`netsurgeon.kernels.attention.fit_rows`), the pattern's softmax kept. The kernels are
    predicted from the example tokens' measured kernel at the start node (position and token-type
    embeddings shared by all sequences correlate the tokens, which independent tokens would miss)
    through the blocks already fitted and the MLPs as they are; one set of rows is fitted to the
    examples' mean kernel.

    Returns:
        ``[(node, largest/smallest token q the block gave before, after)]`` per fitted block.
    """
    from ..kernels.attention import fit_rows

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    fitted: list[tuple[str, float, float]] = []

    def fit(node: fx.Node, mod: nn.Module, sigma: np.ndarray) -> None:
        t = mod.length
        sigma = sigma.mean(0)  # one set of rows for every example: fitted to their mean kernel
        if sigma.shape[0] != t or not np.isfinite(sigma).all():
            return
        with torch.no_grad():
            p = mod.init_matrix(t)[0].numpy()
            p = p / p.sum(axis=1, keepdims=True)
        before = np.einsum("ij,jk,ik->i", mod.init_matrix(t)[0].numpy(), sigma, mod.init_matrix(t)[0].numpy())
        d = fit_rows(p, sigma)
        mod.set_rows(torch.tensor(d))
        after = np.einsum("ij,jk,ik->i", d[:, None] * p, sigma, d[:, None] * p)
        fitted.append((node.name, float(before.max() / before.min()), float(after.max() / after.min())))

    with eval_mode(gm):
        with example_run(gm.__class__.__name__, example_inputs):
            topology = Topology(gm, example_inputs)
        signal = {name for name, d in topology.graph.nodes(data=True) if d["signal"]}
        sites, weights = _find_sites(gm, signal)
        run = _Run(gm, int(example_inputs[0].shape[0]), signal, sites, weights)
        with torch.no_grad(), example_run(gm.__class__.__name__, example_inputs):
            run.run(*example_inputs)
    m = run.m
    order = [node.name for node in gm.graph.nodes if node.name in m.grams]
    attention = [s for s in order if s in sites]
    if not attention:
        return fitted
    first = _predict(gm, topology, m, sites, order, None, None, signal)
    start_node = order[0]
    for name in reversed(order[:order.index(attention[0])]):
        if first[name].measured and _dominates(gm, name, attention[0], signal):
            start_node = name
            break
    _predict(gm, topology, m, sites, order, start_node, None, signal, fit)
    return fitted


def describe_fit(fitted: list[tuple[str, float, float]]) -> str:
    """One line on :func:`fit_shaped_attention`'s result."""
    if not fitted:
        return "no shaped attention block was fitted"
    worst = max(fitted, key=lambda f: f[1])
    return (f"{len(fitted)} shaped attention block(s): rows rescaled to the token kernels they receive (predicted "
            f"from the example tokens through the MLPs as they are now), so every token leaves with the same q; the "
            f"largest spread of token q it removed: {worst[1]:.4g}x at {worst[0]}")
