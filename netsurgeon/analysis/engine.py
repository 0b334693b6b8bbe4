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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .._fileio import write_atomic
from .._validate import require_bool, short_list
from ..errors import InvalidArgumentError, UnknownNodeError, UnsupportedNodeError
from ..graph import Topology, op_info, trace
from ..graph.state import default_inputs
from ..graph.running import eval_mode, example_run
from ..ops import OpKind
from .activation_maps import maps_for
from .local_measure import local_chain, measure_local
from .sums import correlated_sums
from .measure import NodeStats, kernel_stats
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


class AnalysisTable(list):
    """Rows of (name, kind, q, c, C'(1), status); readable ``str`` and notebook HTML."""

    def __str__(self) -> str:
        head = f"{'node':34s} {'kind':11s} {'q':>10s} {'c':>8s} {'C_prime_1':>10s}  status"
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r.name[:34]:34s} {r.kind:11s} {r.q:10.4g} {r.c:8.4f} {r.c_slope_1:10.4g}  {r.status}"
                         + (f" ({r.reason})" if r.reason and r.status != EXACT else ""))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(f"<tr><td>{r.name}</td><td>{r.kind}</td><td>{r.q:.4g}</td><td>{r.c:.4f}</td>"
                        f"<td>{r.c_slope_1:.4g}</td><td>{r.status}</td><td>{r.reason}</td></tr>" for r in self)
        return ("<table><tr><th>node</th><th>kind</th><th>q</th><th>c</th><th>C'(1)</th><th>status</th>"
                f"<th>reason</th></tr>{cells}</table>")


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
        rows = AnalysisTable()
        for name, k in self.kernels.items():
            kind = str(self.topology.graph.nodes[name]["kind"])
            rows.append(_Row(name, kind, k.q, self.c(name), self.c_slope_1(name), k.status, k.reason))
        return rows


def _dims(node: fx.Node) -> int | None:
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape") and len(tm.shape) >= 1:
        return int(np.prod(tm.shape[1:])) if len(tm.shape) > 1 else 1
    return None


def _pairs(example: torch.Tensor, cgrid: np.ndarray, q_in: float, batch: int, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` Gaussian input pairs per cosine of ``cgrid``, stacked: ``[P * batch, ...]`` each."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(cgrid) * batch,) + tuple(example.shape[1:])
    z1 = torch.randn(shape, generator=g, dtype=torch.float64)
    z2 = torch.randn(shape, generator=g, dtype=torch.float64)
    c = torch.as_tensor(np.repeat(cgrid, batch), dtype=torch.float64).reshape((-1,) + (1,) * (len(shape) - 1))
    x1 = z1 * q_in ** 0.5
    x2 = (c * z1 + (1 - c * c).clamp_min(0).sqrt() * z2) * q_in ** 0.5
    return x1.to(example.dtype), x2.to(example.dtype)


class _Done(Exception):
    """Raised to stop the interpreter once every requested node is measured."""


class _NodeMeter(fx.Interpreter):
    """Runs a stacked batch ``[x1; x2]`` and keeps, for the requested nodes only, the
    per-cosine kernel statistics; stops after the last requested node."""

    def __init__(self, gm: fx.GraphModule, names: set[str], points: int, batch: int) -> None:
        super().__init__(gm)
        self.todo = set(names)
        self.points, self.batch = points, batch
        self.stats: dict[str, list[NodeStats]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.todo:
            half = self.points * self.batch
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 1 \
                    and out.shape[0] == 2 * half:
                h1, h2 = out[:half], out[half:]
                b = self.batch
                self.stats[n.name] = [kernel_stats(h1[i * b:(i + 1) * b], h2[i * b:(i + 1) * b])
                                      for i in range(self.points)]
            self.todo.discard(n.name)
            if not self.todo:
                raise _Done
        return out


def _measure_nodes(gm: fx.GraphModule, names: set[str], example: torch.Tensor, cgrid: np.ndarray, q_in: float,
                   batch: int, seed: int) -> dict[str, list[NodeStats]]:
    """Measured statistics of ``names`` for input pairs at each cosine of ``cgrid`` (one stacked run)."""
    x1, x2 = _pairs(example, cgrid, q_in, batch, seed)
    meter = _NodeMeter(gm, names, len(cgrid), batch)
    with torch.no_grad():
        try:
            meter.run(torch.cat([x1, x2]))
        except _Done:
            pass
    return meter.stats


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


def _propagate(gm: fx.GraphModule, topo: Topology, grid: np.ndarray, q_in: float,
               measured: dict[str, list[NodeStats]], cgrid: np.ndarray, cache: dict[int, Any],
               local: set[str] = frozenset(), correlated: dict[str, str] | None = None
               ) -> tuple[dict[str, NodeKernel], list[str]]:
    """One pass of the rules over the graph; nodes without a rule (and the sums of
    ``correlated`` terms) take ``measured`` values when present, else are returned as pending
    (their users see NaN kernels)."""
    correlated = correlated or {}
    kernels: dict[str, NodeKernel] = {}
    pending: list[str] = []
    for node in gm.graph.nodes:
        info = op_info(node)
        if not info.kind.traits.signal or not topo.graph.nodes[node.name]["signal"] and info.kind is not OpKind.OUTPUT:
            continue
        dims = _dims(node)
        if info.kind is OpKind.INPUT:
            kernels[node.name] = NodeKernel(q_in, q_in, q_in * grid, 1.0, EXACT, "", dims)
            continue
        ins = [kernels[a.name] for a in node.all_input_nodes if a.name in kernels]
        blocked = any(np.isnan(i.q) for i in ins)  # downstream of a pending node: find out whether a rule exists
        if blocked:
            ins = [NodeKernel(q_in, q_in, q_in * grid, 1.0, EXACT, "", i.dims) for i in ins]
        out = propagate_node(node, info, gm, ins, maps_for, dims, cache) \
            if ins and node.name not in correlated else None
        if blocked and out is not None:
            out = NodeKernel(*(float("nan"),) * 2, np.full_like(grid, np.nan), float("nan"), UNSUPPORTED,
                             "downstream of unmeasured values", dims)
        elif out is not None and out.status == UNSUPPORTED:  # an exact rule applied to measured inputs
            out.status = "approximate"
            out.reason = "downstream of measured values"
        if out is None:
            reason = correlated.get(node.name) or info.attrs.get("reason") or f"no kernel map for {info.describe()}"
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
                how = "measured on Gaussian inputs drawn at the predicted kernel of the last linear op" \
                    if node.name in local else "measured"
                # dk/dc_in at c_in = 1 from the secant over the two measured points nearest 1
                dk = float((kc[-1] - kc[-2]) / (cgrid[-1] - cgrid[-2]))
                out = NodeKernel(q1, q2, ks, dk, UNSUPPORTED,
                                 f"{reason}; {how}; C'(1) from the secant over c_in in [{cgrid[-2]:.2g}, 1]", dims)
        kernels[node.name] = out
    return kernels, pending


def analyze(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None, *,
            q_in: float = 1.0, c_in: float = 0.0, grid_size: int = 201, empirical_points: int = 21,
            empirical_batch: int | None = None, seed: int = 0, local_measure: bool = True) -> Analysis:
    """Predict q, q', k, c and the cumulative ``C'(1)`` at every node (docs/theory.md §3).

    Nodes without a kernel map (max pooling, products of signals, train-mode batch
    norm) take measured values at ``empirical_points`` cosines: locally when they follow
    a linear op through elementwise or per-channel ops (``local_measure``), otherwise
    from Gaussian input pairs in one batched run of the graph up to the last such node.

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

    Raises:
        UnsupportedNodeError: ops without a map and no ``example_inputs`` to measure them (the first
            few named, all in ``nodes``).
        InvalidArgumentError: ``q_in``/``c_in`` out of range, ``local_measure`` not a bool.
    """
    require_bool("analyze", "local_measure", local_measure)
    if not (0.0 < q_in < math.inf and -1.0 <= c_in <= 1.0):
        raise InvalidArgumentError(f"analyze needs q_in > 0 (finite) and -1 <= c_in <= 1; got q_in={q_in!r}, "
                                   f"c_in={c_in!r}")
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    given = example_inputs is not None
    if example_inputs is None:
        example_inputs = default_inputs(gm)
    with eval_mode(gm):
        topo = Topology(gm)
        if given or (example_inputs is not None and topo.kind_counts().get("concat")):  # dims weight concats
            with example_run(gm.__class__.__name__, example_inputs):  # given inputs are checked up front
                topo = Topology(gm, example_inputs)
        grid = np.linspace(-1.0, 1.0, grid_size)
        cgrid = np.linspace(-1.0, 1.0, empirical_points)
        cache: dict[int, Any] = {}
        correlated = correlated_sums(topo)
        kernels, pending = _propagate(gm, topo, grid, q_in, {}, cgrid, cache, correlated=correlated)
        if pending:
            example = example_inputs[0] if example_inputs is not None else None
            measured = _measure_locally(gm, topo, pending, kernels, grid, cgrid, example, empirical_batch, seed) \
                if local_measure else {}
            rest = [n for n in pending if n not in measured]
            if rest and example is None:
                raise UnsupportedNodeError(f"{len(rest)} node(s) have no kernel map: {short_list(rest)}; pass "
                                           f"example_inputs so they can be measured", nodes=rest)
            if rest:
                batch = empirical_batch or (1 if example.dim() > 2 else 16)
                measured.update(_measure_nodes(gm, set(rest), example, cgrid, q_in, batch, seed))
            missing = [n for n in pending if n not in measured]
            if missing:
                raise UnsupportedNodeError(f"{len(missing)} node(s) have no kernel map and no tensor output to "
                                           f"measure: {short_list(missing)}", nodes=missing)
            kernels, _ = _propagate(gm, topo, grid, q_in, measured, cgrid, cache,
                                    {n for n in measured if n not in rest}, correlated)
    return Analysis(topo, kernels, grid, q_in, c_in)


