"""``analyze``: predicted Q/C maps at every node of a model, at initialization.

Example:
    >>> import torch.nn as nn, netsurgeon
    >>> mlp = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(256, 256), nn.Tanh())])
    >>> a = netsurgeon.analyze(mlp)
    >>> round(float(a.cmap("output")(1.0)), 6)
    1.0
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .._fileio import write_atomic
from .._validate import problem_list, require_bool, short_list
from ..errors import InvalidArgumentError, MissingAnalysisError, UnknownNodeError, UnsupportedNodeError
from ..graph import Topology, op_info, trace
from ..graph.state import default_inputs, nodes_by_name
from ..graph.running import eval_mode, example_run
from ..ops import OpKind
from .activation_maps import maps_for
from .local_measure import local_chain, measure_local
from .sums import correlated_sums, dependent_products
from .tokens import embedding_sources, integer_inputs
from .measure import NodeStats, gram_ready, gram_stats, pair_stats
from .propagate import EXACT, UNSUPPORTED, NodeKernel, propagate_node

__all__ = ["Analysis", "analyze"]


@dataclass
class _Row:
    name: str
    kind: str
    q: float
    c: float
    c_slope_1: float
    status: str
    reason: str
    token_cos: float | None = None  # predicted mean token cosine (analyze(..., tokens=True)), None elsewhere


class AnalysisTable(list):
    """Rows of (name, kind, q, c, C'(1), status), and the predicted mean token cosine when the
    analysis has token kernels; readable ``str`` and notebook HTML."""

    def _tokens(self) -> bool:
        return any(r.token_cos is not None for r in self)

    def __str__(self) -> str:
        tokens = self._tokens()
        head = f"{'node':34s} {'kind':11s} {'q':>10s} {'c':>8s} {'C_prime_1':>10s}" \
            + (f" {'token cos':>9s}" if tokens else "") + "  status"
        lines = [head, "-" * len(head)]
        for r in self:
            cos = "" if not tokens else f" {r.token_cos:9.4f}" if r.token_cos is not None else f" {'':9s}"
            lines.append(f"{r.name[:34]:34s} {r.kind:11s} {r.q:10.4g} {r.c:8.4f} {r.c_slope_1:10.4g}{cos}  {r.status}"
                         + (f" ({r.reason})" if r.reason and r.status != EXACT else ""))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        tokens = self._tokens()

        def cos(r: _Row) -> str:
            return "" if not tokens else f"<td>{r.token_cos:.4f}</td>" if r.token_cos is not None else "<td></td>"

        cells = "".join(f"<tr><td>{r.name}</td><td>{r.kind}</td><td>{r.q:.4g}</td><td>{r.c:.4f}</td>"
                        f"<td>{r.c_slope_1:.4g}</td>{cos(r)}<td>{r.status}</td><td>{r.reason}</td></tr>" for r in self)
        return ("<table><tr><th>node</th><th>kind</th><th>q</th><th>c</th><th>C'(1)</th>"
                + ("<th>token cos</th>" if tokens else "")
                + f"<th>status</th><th>reason</th></tr>{cells}</table>")


class Analysis:
    """Predicted kernel quantities at every node, for input pairs with mean square
    ``q_in`` and every cosine of ``grid`` (the default pair cosine is ``c_in``)."""

    def __init__(self, topo: Topology, kernels: dict[str, NodeKernel], grid: np.ndarray, q_in: float,
                 c_in: float) -> None:
        self.topology = topo
        self.kernels = kernels
        self.grid = grid
        self.q_in = q_in
        self.c_in = c_in
        self.tokens: Any = None  # a TokenAnalysis after analyze(..., tokens=True) on a model with a token axis

    def _get(self, node: str) -> NodeKernel:
        if node not in self.kernels:
            raise UnknownNodeError(f"no analysis for node {node!r}; analysed nodes: "
                                   f"{', '.join(list(self.kernels)[:8])}...")
        return self.kernels[node]

    def cmap(self, node: str) -> Callable[[Any], np.ndarray]:
        """The C map from the network input to ``node``: a vectorized function of ``c_in ∈ [-1, 1]``."""
        c = self._get(node).c
        grid = self.grid

        def c_map(c_in: Any) -> np.ndarray:
            x = np.asarray(c_in, dtype=float)
            if np.any((x < -1 - 1e-12) | (x > 1 + 1e-12)):
                raise InvalidArgumentError(f"c_in must lie in [-1, 1]; got values from {x.min():g} to {x.max():g}")
            return np.interp(x, grid, c)

        return c_map

    def q(self, node: str) -> float:
        return self._get(node).q

    def c(self, node: str) -> float:
        return float(self.cmap(node)(self.c_in))

    def c_slope_1(self, node: str) -> float:
        """Cumulative ``C'(1)`` from the input to ``node``."""
        k = self._get(node)
        return k.dk * self.q_in / k.q if k.q > 0 else float("nan")

    def status(self, node: str) -> tuple[str, str]:
        k = self._get(node)
        return k.status, k.reason

    def plot_cmaps(self, nodes: Sequence[str] | None = None) -> Any:
        """C maps at several depths on one matplotlib figure (returned)."""
        from .plots import plot_cmaps

        return plot_cmaps(self, nodes)

    def save_cmaps(self, path: str | os.PathLike, nodes: Sequence[str] | None = None, dpi: int = 120) -> Path:
        """Save :meth:`plot_cmaps` to ``path`` atomically; the format comes from the extension."""
        import matplotlib.pyplot as plt

        path, figure = Path(path), self.plot_cmaps(nodes)
        try:
            write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=dpi))
        finally:
            plt.close(figure)
        return path

    def plot_q(self) -> Any:
        """q along depth (returned matplotlib figure)."""
        from .plots import plot_q

        return plot_q(self)

    def summary(self) -> str:
        """Depth, the output's C(0) and C'(1), the worst C-map deviation from identity, node statuses."""
        out = [n for n in self.kernels if str(self.topology.graph.nodes[n]["kind"]) == "output"]
        name = out[0] if out else list(self.kernels)[-1]
        worst = max(self.kernels, key=lambda n: float(np.max(np.abs(self.kernels[n].c - self.grid))))
        dev = float(np.max(np.abs(self.kernels[worst].c - self.grid)))
        statuses = {s: sum(k.status == s for k in self.kernels.values()) for s in ("exact", "approximate",
                                                                                     "unsupported")}
        return (f"depth {self.topology.depth()} weight layers; output C(0) = {float(self.cmap(name)(0.0)):.4f}, "
                f"C'(1) = {self.c_slope_1(name):.4g}; worst C-map deviation from identity {dev:.3f} at {worst}; "
                f"nodes: " + ", ".join(f"{v} {k}" for k, v in statuses.items()))

    def table(self) -> AnalysisTable:
        """One row per node; with token kernels (``analyze(..., tokens=True)``) a "token cos" column
        holds the predicted mean token cosine of the nodes that have a token axis."""
        rows = AnalysisTable()
        tokens = self.tokens.nodes if self.tokens is not None else {}
        for name, k in self.kernels.items():
            kind = str(self.topology.graph.nodes[name]["kind"])
            rows.append(_Row(name, kind, k.q, self.c(name), self.c_slope_1(name), k.status, k.reason,
                             tokens[name].predicted_cos if name in tokens else None))
        return rows

    def plot_token_cosines(self, nodes: Sequence[str] | None = None) -> Any:
        """Predicted and measured mean token cosine along the token nodes (a matplotlib figure;
        see :meth:`TokenAnalysis.plot <netsurgeon.analysis.token_kernels.TokenAnalysis.plot>`)."""
        if self.tokens is None:
            raise MissingAnalysisError("this analysis has no token kernels: run analyze(model, example_inputs, "
                                       "tokens=True) on a model with a token axis")
        return self.tokens.plot(nodes)


def _dims(node: fx.Node) -> int | None:
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape") and len(tm.shape) >= 1:
        return int(np.prod(tm.shape[1:])) if len(tm.shape) > 1 else 1
    return None


def _pairs(example: torch.Tensor, cgrid: np.ndarray, q_in: float, batch: int, seed: int
           ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Gaussian inputs of mean square ``q_in`` whose pairs have the cosines of ``cgrid``.

    ``batch`` independent stars ``[u, -u, w_1, ..., w_m]``, ``w_j = a_j u + sqrt(1 - a_j²) z_j``,
    one ``w`` per magnitude ``a_j`` of a cosine strictly inside (-1, 1). The pair for cosine
    ``c`` is ``(u, u)`` at 1, ``(u, -u)`` at -1, and ``(u, w_c)`` or ``(-u, w_|c|)`` otherwise: each
    has the distribution of an independent pair at its cosine, and ``m + 2`` examples (12 for
    21 cosines) serve every cosine instead of two per cosine. Returns the examples ``[N, ...]``
    and, per cosine, the (first, second) example indices of its ``batch`` pairs.

    Drawn in float64 (then cast): a float32 stream seeded 0 is the one that initialized the
    weights of a model built after ``torch.manual_seed(0)``, and inputs drawn from it correlate
    with those weights."""
    mags = sorted({round(abs(float(c)), 12) for c in cgrid if abs(float(c)) < 1.0})
    per = 2 + len(mags)
    feat = tuple(example.shape[1:])
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, 1 + len(mags)) + feat, generator=g, dtype=torch.float64)
    u = z[:, :1]
    a = torch.as_tensor(mags, dtype=torch.float64).reshape((1, -1) + (1,) * len(feat))
    w = a * u + (1 - a * a).clamp_min(0).sqrt() * z[:, 1:]
    x = (torch.cat([u, -u, w], dim=1) * q_in ** 0.5).reshape((batch * per,) + feat)
    base = torch.arange(batch) * per
    slot = {m: 2 + i for i, m in enumerate(mags)}
    pairs = []
    for c in map(float, cgrid):
        i, j = (0, 0) if c >= 1.0 else (0, 1) if c <= -1.0 else (0 if c >= 0 else 1, slot[round(abs(c), 12)])
        pairs.append((base + i, base + j))
    return x.to(example.dtype), pairs


class _Done(Exception):
    """Raised to stop the interpreter once every requested node is measured."""


@dataclass(frozen=True)
class _Layout:
    """Where the batch sits in a node's output: axis ``dim``, of size ``batch * fold``, holds
    example-major slices (``[e0 s0, e0 s1, ..., e1 s0, ...]``: windows, heads or patches folded
    into the batch, ``x.reshape(B * n, ...)``) or, when ``inner``, slice-major ones
    (``[s0 e0, s0 e1, ...]``: ``x.transpose(0, 1).reshape(n * B, ...)``)."""

    dim: int
    fold: int
    inner: bool

    def gram(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The ``[n, n]`` Gram matrix ``<h_i, h_j> / dim(h)`` (float64) of the per-example features
        of ``t`` (a run of ``n`` examples), without gathering the features."""
        a = gram_ready(t)
        lead, rest = math.prod(a.shape[:self.dim]), math.prod(a.shape[self.dim + 1:])
        x = a.reshape(lead * self.fold, n, rest) if self.inner else a.reshape(lead, n, self.fold * rest)
        return torch.bmm(x, x.transpose(1, 2)).double().sum(0) / max(a.numel() // n, 1)

    def example(self, t: torch.Tensor, i: int, n: int) -> torch.Tensor:
        """Example ``i``'s slices of ``t`` (a run of ``n`` examples), as a run of it alone lays them out."""
        if self.inner:
            return t.index_select(self.dim, torch.arange(i, self.fold * n, n, device=t.device))
        return t.narrow(self.dim, i * self.fold, self.fold)

    def describe(self) -> str:
        if self.fold == 1:
            return f"batch in axis {self.dim}"
        order = "slice-major" if self.inner else "example-major"
        return f"batch folded into axis {self.dim} ({self.fold} slices per example, {order})"


def _layouts(shape: Sequence[int], n: int) -> list[_Layout]:
    """The layouts that a tensor of ``shape`` from a run of ``n`` examples allows (axes 0 and 1)."""
    out = []
    for d in range(min(2, len(shape))):
        if shape[d] > 0 and shape[d] % n == 0:
            f = shape[d] // n
            out += [_Layout(d, f, False)] + ([_Layout(d, f, True)] if f > 1 else [])
    return out


def _is_float_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 1


def _what(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


def _elements(node: fx.Node, out: Any, is_signal: Callable[[str], bool]) -> list[tuple[str, int]]:
    """``(getitem user, index)`` for the floating-point tensors that signal users take from a tuple output."""
    found = []
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) \
                and is_signal(u.name) and -len(out) <= u.args[1] < len(out) and _is_float_tensor(out[u.args[1]]):
            found.append((u.name, u.args[1] % len(out)))
    return sorted(found, key=lambda e: e[1])


class _Tapper(fx.Interpreter):
    """Runs the graph and hands the requested outputs to ``take(record name, value)``: a node's
    own output, or for a tuple-valued node the tensors its signal ``getitem`` users take (each
    under the user's name, and the first also under the node's); stops after the last
    requested node."""

    def __init__(self, gm: fx.GraphModule, names: set[str], is_signal: Callable[[str], bool]) -> None:
        super().__init__(gm)
        self.todo, self.is_signal = set(names), is_signal
        self.sources: dict[str, tuple[str, int | None]] = {}  # record name -> (node, tuple index)
        self.inject: dict[str, torch.Tensor] = {}  # node -> the value it takes instead (token embeddings)

    def take(self, name: str, value: Any) -> None:
        """Record one requested output; every subclass says what it keeps (an abstract method)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement take()")

    def run_node(self, n: fx.Node) -> Any:
        out = self.inject[n.name] if n.name in self.inject else super().run_node(n)
        if n.name in self.todo:
            items = _elements(n, out, self.is_signal) if isinstance(out, (tuple, list)) else []
            if items:
                self.sources[n.name] = (n.name, items[0][1])
                self.take(n.name, out[items[0][1]])
                for user, i in items:
                    self.sources[user] = (n.name, i)
                    self.take(user, out[i])
            else:
                self.sources[n.name] = (n.name, None)
                self.take(n.name, out)
            self.todo.discard(n.name)
            if not self.todo:
                raise _Done
        return out

    def run_until_done(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            try:
                self.run(x)
            except _Done:
                pass


class _NodeMeter(_Tapper):
    """Keeps, for the requested nodes, the per-cosine kernel statistics of a run of the stacked
    examples of :func:`_pairs`. An output whose first axis is not the batch (windows, heads or
    patches folded into it; a sequence-first ``(L, B, E)`` layout) gets its statistics under
    every layout its shape allows, in ``folded``, for :func:`_probe_layouts` to choose from."""

    def __init__(self, gm: fx.GraphModule, names: set[str], is_signal: Callable[[str], bool],
                 pairs: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
        super().__init__(gm, names, is_signal)
        self.pairs, self.n = pairs, n
        self.stats: dict[str, list[NodeStats]] = {}
        self.folded: dict[str, dict[_Layout, list[NodeStats]]] = {}
        # the first and the last example's slices under each layout
        self.ends: dict[str, dict[_Layout, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.problems: dict[str, str] = {}

    def take(self, name: str, t: Any) -> None:
        if not _is_float_tensor(t):
            self.problems[name] = f"its output is {_what(t)}, not a floating-point tensor"
        elif t.shape[0] == self.n:
            self.stats[name] = pair_stats(t, self.pairs, pooled=True)
        elif layouts := _layouts(t.shape, self.n):
            a = gram_ready(t)  # once for every layout
            self.folded[name] = {lay: gram_stats(lay.gram(a, self.n), self.pairs, pooled=True) for lay in layouts}
            self.ends[name] = {lay: (lay.example(t, 0, self.n).detach().clone(),
                                     lay.example(t, self.n - 1, self.n).detach().clone()) for lay in layouts}
        else:
            self.problems[name] = (f"its output, of shape {tuple(t.shape)} in a run of {self.n} examples, has no "
                                   f"axis 0 or 1 whose size is a multiple of the batch")


def _fingerprint(t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per slice of every axis: a projection on fixed random weights, rank one over the other
    axes (first order in any change, so a nearly constant output such as a flat softmax still
    shows its changes; the same weights for every slice of an axis, so equal slices have
    equal projections), and its scale (a bound on it from Cauchy-Schwarz). The trailing axes
    are contracted once for all (a few passes over the tensor in all)."""
    a = t.detach().to(torch.float64, memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(size, generator=g, dtype=torch.float64) for size in a.shape]
    norms = [float(w.norm()) for w in ws]
    trailing, squares = [a], [a * a]  # [k]: the axes after k contracted (weights / plain sums)
    for k in range(a.dim() - 1, 0, -1):
        trailing.insert(0, trailing[0] @ ws[k])
        squares.insert(0, squares[0].sum(-1))
    out = []
    for d, size in enumerate(a.shape):
        projection = trailing[d]
        for k in range(d):  # the leading axes, one at a time
            projection = ws[k] @ projection.reshape(a.shape[k], -1)
        square = squares[d].reshape(-1, size).sum(0)
        out.append((projection.reshape(size), square.sqrt() * math.prod(norms[:d] + norms[d + 1:])))
    return out


class _Fingerprints(_Tapper):
    def __init__(self, gm: fx.GraphModule, names: set[str], is_signal: Callable[[str], bool]) -> None:
        super().__init__(gm, names, is_signal)
        self.prints: dict[str, tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def take(self, name: str, t: Any) -> None:
        if _is_float_tensor(t):
            self.prints[name] = (tuple(t.shape), _fingerprint(t))


_SAME = 1e-3  # slices that change by less than this fraction of the largest change count as unchanged
_ROUNDING = 1e-9  # changes between runs below this fraction of a slice's scale are rounding
_ROUNDING_ACROSS = 1e-6  # the same, between two copies of an example at different places of a batch


def _fits(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], f: int,
          inner: bool) -> float | None:
    """How well an axis of ``2 f`` slices splits into two examples of ``f`` slices (``inner``:
    alternating), from its fingerprints in the runs ``[x0, x0]`` and ``[x0, x1]``: in the first,
    the two examples' slices are equal; from the first to the second, those of example 1
    change and those of example 0 do not. The fraction of example 1's slices that change, or
    None when the split does not fit."""
    (pa, scale), (pb, _) = first, second
    def halves(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (v[0::2], v[1::2]) if inner else (v[:f], v[f:])

    step = (pa - pb).abs()
    step = torch.where(step > _ROUNDING * scale, step, torch.zeros_like(step))
    keep, move = halves(step)
    top = float(move.max())
    if not top > 0 or float(keep.max()) > _SAME * top:
        return None
    (a0, a1), (s0, s1) = halves(pa), halves(scale)
    if bool(((a0 - a1).abs() > _ROUNDING_ACROSS * torch.maximum(s0, s1)).any()):
        return None  # the copies of x0 differ: the rows of one example depend on the other
    return float((move > _SAME * top).double().mean())


def _choose_layout(shape: tuple[int, ...], first: list, second: list) -> _Layout | str:
    """The layout of a batch of 2 from the fingerprints of the runs ``[x0, x0]`` and ``[x0, x1]``
    (:func:`_fits`; among several fitting layouts, the one under which most slices change);
    else why there is none."""
    best: tuple[float, _Layout] | None = None
    for d, size in enumerate(shape):
        if size % 2:
            continue
        f = size // 2
        for inner in ((False, True) if f > 1 else (False,)):
            score = _fits(first[d], second[d], f, inner)
            if score is not None and (best is None or score > best[0]):
                best = (score, _Layout(d, f, inner))
    if best is not None and best[1].dim > 1:
        return (f"its output, of shape {shape} at a batch of 2, holds the batch in axis {best[1].dim} "
                f"({best[1].describe()}); only axes 0 and 1 are measured")
    if best is not None:
        return best[1]
    if not any(bool((pa - pb).abs().gt(_ROUNDING * scale).any()) for (pa, scale), (pb, _) in zip(first, second)):
        return "its output does not change with the input, so the axis that holds the batch cannot be found"
    if all(size % 2 for size in shape):
        return f"its output, of shape {shape} at a batch of 2, has no axis that can hold the batch"
    return "its output mixes examples of the batch (its rows depend on several inputs)"


class _Outputs(_Tapper):
    def __init__(self, gm: fx.GraphModule, names: set[str], is_signal: Callable[[str], bool]) -> None:
        super().__init__(gm, names, is_signal)
        self.outputs: dict[str, torch.Tensor] = {}

    def take(self, name: str, t: Any) -> None:
        if _is_float_tensor(t):
            self.outputs[name] = t


_ALONE = 1e-4  # a run of two examples matches their slices of a larger run to this fraction of their variation


def _layouts_from_ends(gm: fx.GraphModule, ends: dict[str, dict[_Layout, tuple[torch.Tensor, torch.Tensor]]],
                       is_signal: Callable[[str], bool], pair: torch.Tensor) -> dict[str, _Layout]:
    """The layouts that one run of the measured run's first and last examples, ``pair``, settles:
    the one layout under which each of the two has in this run the slices it had in the measured
    run. There each sat among other examples, so an output whose rows depend on other examples
    (a batch statistic, a sum or a sort along the folded axis) matches under none. A node matched
    by none or by several is left out, for :func:`_probe_layouts`. Two examples' run in place of
    the probe's four."""
    tap = _Outputs(gm, set(ends), is_signal)
    tap.run_until_done(pair)
    out: dict[str, _Layout] = {}
    for name, options in ends.items():
        got = tap.outputs.get(name)
        if got is None:
            continue
        fits = [lay for lay, parts in options.items() if _same_slices(lay, got, parts)]
        if len(fits) == 1:
            out[name] = fits[0]
    return out


def _same_slices(lay: _Layout, got: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether ``got`` (a run of two examples) holds ``parts`` as its examples 0 and 1 under ``lay``."""
    if got.dim() <= lay.dim or got.shape[lay.dim] != 2 * lay.fold:
        return False
    for i, part in enumerate(parts):
        mine = lay.example(got, i, 2).detach().double()
        if tuple(mine.shape) != tuple(part.shape):
            return False
        spread = float((mine - mine.mean()).abs().max()) if mine.numel() else 0.0
        if not spread > 0 or float((part.double() - mine).abs().max()) > _ALONE * spread:
            return False  # a constant output tells the layouts apart no better than rounding
    return True


def _probe_layouts(gm: fx.GraphModule, names: set[str], is_signal: Callable[[str], bool], example: torch.Tensor,
                   q_in: float, seed: int) -> dict[str, _Layout | str]:
    """Find how each node of ``names`` lays out the batch from two runs of two examples,
    ``[x0, x0]`` and ``[x0, x1]`` (:func:`_choose_layout`)."""
    g = torch.Generator().manual_seed(seed + 1)
    tokens = embedding_sources(gm) if integer_inputs((example,)) else []
    runs = []
    if tokens:  # token ids: the two examples differ at the embedding lookups (injected there)
        ids = example[torch.zeros(2, dtype=torch.long)]
        zs = {n.name: torch.randn((2,) + tuple(n.meta["tensor_meta"].shape[1:]), generator=g,
                                  dtype=torch.float64).to(torch.get_default_dtype()) for n in tokens}
        for same in (True, False):
            tap = _Fingerprints(gm, names, is_signal)
            tap.inject = {k: torch.stack([z[0], z[0]]) if same else z for k, z in zs.items()}
            tap.run_until_done(ids)
            runs.append(tap.prints)
    else:
        z = (torch.randn((2,) + tuple(example.shape[1:]), generator=g, dtype=torch.float64) * q_in ** 0.5
             ).to(example.dtype)
        for x in (torch.stack([z[0], z[0]]), z):
            tap = _Fingerprints(gm, names, is_signal)
            tap.run_until_done(x)
            runs.append(tap.prints)
    out: dict[str, _Layout | str] = {}
    for name in names:
        a, b = runs[0].get(name), runs[1].get(name)
        if a is None or b is None:
            out[name] = "its output is not a floating-point tensor at a batch of 2"
        elif a[0] != b[0]:
            out[name] = f"the shape of its output depends on the input ({a[0]} and {b[0]})"
        else:
            out[name] = _choose_layout(a[0], a[1], b[1])
    return out


@dataclass
class _Measured:
    stats: dict[str, list[NodeStats]]
    problems: dict[str, str]  # node -> why it could not be measured
    notes: dict[str, str]  # node -> how it was measured (layout), for the status reason
    elements: dict[str, str]  # getitem node measured in place of its rule -> reason


def _measure_nodes(gm: fx.GraphModule, topo: Topology, names: set[str], example: torch.Tensor, cgrid: np.ndarray,
                   q_in: float, batch: int, seed: int) -> _Measured:
    """Measured statistics of ``names`` for input pairs at each cosine of ``cgrid``: one run
    of the stacked pairs (:func:`_pairs`), then, for outputs whose first axis is not the batch,
    their layout: from a run of the first and last examples alone (:func:`_layouts_from_ends`),
    else from a probe (:func:`_probe_layouts`, two runs of two examples)."""
    def is_signal(name: str) -> bool:
        return bool(topo.graph.nodes[name]["signal"]) if name in topo.graph else False

    tokens = embedding_sources(gm) if integer_inputs((example,)) else []
    if tokens:  # token ids: the pairs are drawn at the embedding lookups (docs/theory.md §3.10)
        inject, pairs = {}, []
        for i, node in enumerate(tokens):
            q_emb = float(gm.get_submodule(node.target).weight.detach().double().pow(2).mean())
            shape = tuple(node.meta["tensor_meta"].shape)
            emb, pairs = _pairs(torch.zeros(shape, dtype=torch.get_default_dtype()), cgrid, q_emb, batch, seed + i)
            inject[node.name] = emb
        n_rows = next(iter(inject.values())).shape[0]
        x = example[torch.arange(n_rows) % example.shape[0]]
    else:
        x, pairs = _pairs(example, cgrid, q_in, batch, seed)
        inject = {}
    meter = _NodeMeter(gm, names, is_signal, pairs, x.shape[0])
    meter.inject = inject
    meter.run_until_done(x)
    result = _Measured(dict(meter.stats), dict(meter.problems), {}, {})
    if meter.folded:
        ends = x[torch.tensor([0, x.shape[0] - 1])]
        found: dict[str, _Layout | str] = {} if inject else dict(_layouts_from_ends(gm, meter.ends, is_signal, ends))
        rest = set(meter.folded) - set(found)
        if rest:
            found.update(_probe_layouts(gm, rest, is_signal, example, q_in, seed))
        for name, options in meter.folded.items():
            lay = found.get(name, "not reached by the layout probe")
            if isinstance(lay, str):
                result.problems[name] = lay
            elif lay in options:
                result.stats[name] = options[lay]
                result.notes[name] = lay.describe()
            else:
                result.problems[name] = (f"its batch axis ({lay.describe()} at a batch of 2) does not fit its shape "
                                         f"in a run of {x.shape[0]} examples: the layout changes with the batch size")
    for name, (src, index) in meter.sources.items():
        if index is not None and name != src:
            result.elements[name] = f"element {index} of the tuple output of {src}"
    return result


def _measure_locally(gm: fx.GraphModule, topo: Topology, pending: list[str], kernels: dict[str, NodeKernel],
                     grid: np.ndarray, cgrid: np.ndarray, example: torch.Tensor | None, batch: int | None,
                     seed: int) -> dict[str, list[NodeStats]]:
    """The pending nodes that :mod:`.local_measure` can measure on Gaussian fields (see there)."""
    out: dict[str, list[NodeStats]] = {}
    for i, name in enumerate(pending):
        chain = local_chain(topo, name)
        src = kernels.get(chain[0].name) if chain is not None else None
        if src is None or not np.isfinite(src.q):
            continue
        spatial = chain[0].op != "placeholder" and not isinstance(gm.get_submodule(chain[0].target), nn.Linear) \
            or (chain[0].op == "placeholder" and example is not None and example.dim() > 2)
        stats = measure_local(gm, topo, chain, src.q, src.q2, np.interp(cgrid, grid, src.k), example,
                              batch or (1 if spatial else 64), seed + i)
        if stats is not None:
            out[name] = stats
    return out


_RULE_PROBE_GRID = np.array([-1.0, 0.0, 1.0])  # stand-in inputs of nodes downstream of a pending one


def _infinite_source(gm: fx.GraphModule, kernels: dict[str, Any], name: str) -> str:
    """The first node above ``name`` (inclusive) whose q is infinite while its inputs' are finite."""
    nodes = nodes_by_name(gm)
    while True:
        up = next((a.name for a in nodes[name].all_input_nodes if a.name in kernels and np.isinf(kernels[a.name].q)),
                  None)
        if up is None:
            return name
        name = up


def _propagate(gm: fx.GraphModule, topo: Topology, grid: np.ndarray, q_in: float,
               measured: dict[str, list[NodeStats]], cgrid: np.ndarray, cache: dict[int, Any],
               how: dict[str, str] | None = None, correlated: dict[str, str] | None = None,
               prev: dict[str, NodeKernel] | None = None, override: dict[str, str] | None = None
               ) -> tuple[dict[str, NodeKernel], list[str]]:
    """One pass of the rules over the graph; nodes without a rule (and the sums of
    ``correlated`` terms, and the ``override`` nodes: elements of measured tuples) take
    ``measured`` values when present, else are returned as pending (their users see NaN
    kernels). ``how``: how a measured node was measured, for its reason. ``prev``: the kernels
    of an earlier pass, kept where nothing upstream was measured since."""
    correlated, how, override = correlated or {}, how or {}, override or {}
    kernels: dict[str, NodeKernel] = {}
    pending: list[str] = []
    redone: set[str] = set()  # nodes whose kernel may differ from ``prev``
    for node in gm.graph.nodes:
        info = op_info(node)
        if not info.kind.traits.signal or not topo.graph.nodes[node.name]["signal"] and info.kind is not OpKind.OUTPUT:
            continue
        dims = _dims(node)
        if info.kind is OpKind.INPUT:
            kernels[node.name] = NodeKernel(q_in, q_in, q_in * grid, 1.0, EXACT, "", dims)
            continue
        old = prev.get(node.name) if prev is not None else None
        if old is not None and np.isfinite(old.q) and node.name not in measured \
                and not any(a.name in redone for a in node.all_input_nodes):
            kernels[node.name] = old
            continue
        redone.add(node.name)
        ins = [kernels[a.name] for a in node.all_input_nodes if a.name in kernels]
        infinite = [a.name for a in node.all_input_nodes if a.name in kernels and np.isinf(kernels[a.name].q)]
        if infinite:  # name where q first became infinite, not the op that cannot take it
            src = _infinite_source(gm, kernels, infinite[0])
            raise UnsupportedNodeError(
                f"q is infinite at the input of {node.name}: it becomes infinite at {src} "
                f"({op_info(nodes_by_name(gm)[src]).describe()}), whose inputs have finite q (a product "
                f"or rescale against an operand that is zero at initialization?)", nodes=[src, node.name])
        blocked = any(np.isnan(i.q) for i in ins)  # downstream of a pending node: find out whether a rule exists
        if blocked:  # (on three cosines: the values are dropped)
            ins = [NodeKernel(q_in, q_in, q_in * _RULE_PROBE_GRID, 1.0, EXACT, "", i.dims) for i in ins]
        out = propagate_node(node, info, gm, ins, maps_for, dims, cache) \
            if ins and node.name not in correlated and not (node.name in override and node.name in measured) else None
        if blocked and out is not None:
            out = NodeKernel(*(float("nan"),) * 2, np.full_like(grid, np.nan), float("nan"), UNSUPPORTED,
                             "downstream of unmeasured values", dims)
        elif out is not None and out.status == UNSUPPORTED:  # an exact rule applied to measured inputs
            out.status = "approximate"
            out.reason = "downstream of measured values"
        if out is None:
            reason = override.get(node.name) or correlated.get(node.name) or info.attrs.get("reason") \
                or f"no kernel map for {info.describe()}"
            stats = measured.get(node.name)
            if stats is None:
                pending.append(node.name)
                nan = float("nan")
                out = NodeKernel(nan, nan, np.full_like(grid, nan), nan, UNSUPPORTED, reason, dims)
            else:
                kc = np.array([st.k for st in stats])
                ks = np.interp(grid, cgrid, kc)
                q1 = float(np.mean([st.q for st in stats]))
                q2 = float(np.mean([st.q2 for st in stats]))
                # dk/dc_in at c_in = 1 from the secant over the two measured points nearest 1
                dk = float((kc[-1] - kc[-2]) / (cgrid[-1] - cgrid[-2]))
                out = NodeKernel(q1, q2, ks, dk, UNSUPPORTED,
                                 f"{reason}; {how.get(node.name, 'measured')}; C'(1) from the secant over c_in in "
                                 f"[{cgrid[-2]:.2g}, 1]", dims)
        kernels[node.name] = out
    return kernels, pending


def analyze(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None, *,
            q_in: float = 1.0, c_in: float = 0.0, grid_size: int = 201, empirical_points: int = 21,
            empirical_batch: int | None = None, seed: int = 0, local_measure: bool = True,
            tokens: bool = False) -> Analysis:
    """Predict q, q', k, c and the cumulative ``C'(1)`` at every node (docs/theory.md §3).

    Nodes without a kernel map (max pooling, products of signals, train-mode batch
    norm) take measured values at ``empirical_points`` cosines: locally when they follow
    a linear op through elementwise or per-channel ops (``local_measure``), otherwise
    from Gaussian input pairs in one batched run of the graph up to the last such node
    (the pairs share examples: 12 inputs serve 21 cosines). An output that folds the batch
    into another axis (Swin's windows, attention heads, patches, a sequence-first
    ``(L, B, E)`` tensor) is measured on its per-example features: three runs of two
    examples show which slices belong to which example. A tensor taken from a tuple
    output is measured at the ``getitem`` that takes it.

    Args:
        model: any ``nn.Module`` or a traced GraphModule (analysed in eval mode).
        example_inputs: an input batch; gives node shapes (needed for concatenations)
            and lets unsupported nodes take measured values. Default: None, which for
            a timm model means one random batch of its ``pretrained_cfg`` input size.
        q_in: mean square of both network inputs. Default: 1.0.
        c_in: the cosine of the input pair reported by ``table()``. Default: 0.0.
        grid_size: number of input cosines in ``[-1, 1]`` propagated at once. Default: 201.
        empirical_points: grid points measured for unsupported nodes. Default: 21.
        empirical_batch: input pairs per measured grid point. Default: None = 16 for flat
            inputs, 1 for inputs with spatial or sequence axes (whose statistics already
            average over every location).
        seed: seed of the measured input pairs. Default: 0.
        local_measure: measure a node that follows a linear op through elementwise or
            per-channel ops (max pooling after conv-BN-ReLU) on Gaussian fields drawn at the
            linear op's predicted kernel, on a 32-per-axis patch (see
            :mod:`netsurgeon.analysis.local_measure`); False runs the network instead.
            Default: True.
        tokens: also measure and predict the token kernels of a sequence model (the ``T x T``
            Gram of one sequence's tokens at every node with a token axis, docs/transformers.md)
            on ``example_inputs``, as ``Analysis.tokens`` (a
            :class:`~netsurgeon.analysis.token_kernels.TokenAnalysis`; None, with a warning, when
            the model has no token axis), a "token cos" column of ``table()`` and
            ``plot_token_cosines()``. Default: False.

    Raises:
        UnsupportedNodeError: ops without a map and no ``example_inputs`` to measure them, or
            whose output cannot be measured (it mixes the examples of the batch, or is not a
            floating-point tensor: the reason is given per node); the first few named, all in
            ``nodes``.
        InvalidArgumentError: ``q_in``/``c_in`` out of range, ``local_measure`` not a bool.
    """
    require_bool("analyze", "local_measure", local_measure)
    require_bool("analyze", "tokens", tokens)
    if not (0.0 < q_in < math.inf and -1.0 <= c_in <= 1.0):
        raise InvalidArgumentError(f"analyze needs q_in > 0 (finite) and -1 <= c_in <= 1; got q_in={q_in!r}, "
                                   f"c_in={c_in!r}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    # traced on the given inputs: shape-dependent code is decided on them, not on a default size
    gm = model if isinstance(model, fx.GraphModule) else trace(model, example_inputs)
    given = example_inputs is not None
    if example_inputs is None:
        example_inputs = default_inputs(gm)
    with eval_mode(gm):
        topo = None if given else Topology(gm)
        if given or (example_inputs is not None and topo.kind_counts().get("concat")):  # dims weight concats
            with example_run(gm.__class__.__name__, example_inputs):  # given inputs are checked up front
                topo = Topology(gm, example_inputs)
        grid = np.linspace(-1.0, 1.0, grid_size)
        cgrid = np.linspace(-1.0, 1.0, empirical_points)
        cache: dict[int, Any] = {}
        correlated = {**correlated_sums(topo), **dependent_products(topo)}
        kernels, pending = _propagate(gm, topo, grid, q_in, {}, cgrid, cache, correlated=correlated)
        if pending:
            example = example_inputs[0] if example_inputs is not None else None
            measured = _measure_locally(gm, topo, pending, kernels, grid, cgrid, example, empirical_batch, seed) \
                if local_measure else {}
            rest = [n for n in pending if n not in measured]
            if rest and example is None:
                raise UnsupportedNodeError(f"{len(rest)} node(s) have no kernel map: {short_list(rest)}; pass "
                                           f"example_inputs so they can be measured", nodes=rest)
            how = {n: "measured on Gaussian inputs drawn at the predicted kernel of the last linear op"
                   for n in measured}
            problems: dict[str, str] = {}
            elements: dict[str, str] = {}
            if rest:
                batch = empirical_batch or (1 if example.dim() > 2 else 16)
                run = _measure_nodes(gm, topo, set(rest), example, cgrid, q_in, batch, seed)
                measured.update(run.stats)
                problems, elements = run.problems, run.elements
                how.update({n: f"measured ({note})" for n, note in run.notes.items()})
            missing = [n for n in pending if n not in measured]
            if missing:
                why = [(n, problems.get(n, "its output was not reached by the measured run")) for n in missing]
                raise UnsupportedNodeError(f"{len(missing)} node(s) have no kernel map and cannot be measured: "
                                           f"{problem_list(why)}", nodes=missing)
            kernels, _ = _propagate(gm, topo, grid, q_in, measured, cgrid, cache, how, correlated, kernels, elements)
    analysis = Analysis(topo, kernels, grid, q_in, c_in)
    if tokens:
        analysis.tokens = _token_analysis(gm, topo, example_inputs)
    return analysis


def _token_analysis(gm: fx.GraphModule, topo: Topology, example_inputs: Sequence[torch.Tensor] | None) -> Any:
    """:func:`~.token_kernels.token_kernels` on the example inputs, or None (warned) without a token axis."""
    import warnings

    from .token_kernels import NoTokenAxisError, token_kernels

    if example_inputs is None:
        raise InvalidArgumentError("analyze(..., tokens=True) needs example_inputs (token ids, tokens or images)")
    try:
        return token_kernels(gm, example_inputs, topology=topo)
    except NoTokenAxisError as exc:
        warnings.warn(f"analyze(..., tokens=True): {exc}; Analysis.tokens is None", stacklevel=3)
        return None


