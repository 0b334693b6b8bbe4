"""``analyze``: predicted Q/C maps at every node of a model, at initialization.

Example:
    >>> import torch.nn as nn, netsurgeon
    >>> mlp = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(256, 256), nn.Tanh())])
    >>> a = netsurgeon.analyze(mlp)
    >>> round(float(a.cmap("output")(1.0)), 6)
    1.0
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UnsupportedNodeError
from ..graph import Topology, op_info, trace
from ..ops import OpKind
from .activation_maps import maps_for
from .measure import measure
from .propagate import EXACT, UNSUPPORTED, NodeKernel, propagate_node

__all__ = ["Analysis", "analyze"]

_SKIP = (OpKind.CONSTANT, OpKind.META)


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
            raise KeyError(f"no analysis for node {node!r}; analysed nodes: {', '.join(list(self.kernels)[:8])}...")
        return self.kernels[node]

    def cmap(self, node: str) -> Callable[[Any], np.ndarray]:
        """The C map from the network input to ``node``: a vectorized function of ``c_in ∈ [-1, 1]``."""
        c = self._get(node).c
        grid = self.grid

        def c_map(c_in: Any) -> np.ndarray:
            x = np.asarray(c_in, dtype=float)
            if np.any((x < -1 - 1e-12) | (x > 1 + 1e-12)):
                raise ValueError("c_in must lie in [-1, 1]")
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


def _pairs(example: torch.Tensor, c: float, q_in: float, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) + tuple(example.shape[1:])
    z1 = torch.randn(shape, generator=g, dtype=torch.float64)
    z2 = torch.randn(shape, generator=g, dtype=torch.float64)
    x1 = z1 * q_in ** 0.5
    x2 = (c * z1 + (1 - c * c) ** 0.5 * z2) * q_in ** 0.5
    return x1.to(example.dtype), x2.to(example.dtype)


def analyze(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None, *,
            q_in: float = 1.0, c_in: float = 0.0, grid_size: int = 201, empirical_points: int = 21,
            empirical_batch: int = 16, seed: int = 0) -> Analysis:
    """Predict q, q', k, c and the cumulative ``C'(1)`` at every node (MATH.md §3).

    Args:
        model: any ``nn.Module`` or a traced GraphModule (analysed in eval mode).
        example_inputs: an input batch; gives node shapes (needed for concatenations)
            and lets unsupported nodes take measured values. Default: None.
        q_in: mean square of both network inputs. Default: 1.0.
        c_in: the cosine of the input pair reported by ``table()``. Default: 0.0.
        grid_size: number of input cosines in ``[-1, 1]`` propagated at once. Default: 201.
        empirical_points: grid points measured for unsupported nodes. Default: 21.
        empirical_batch: input pairs per measured grid point. Default: 16.
        seed: seed of the measured input pairs. Default: 0.

    Raises:
        UnsupportedNodeError: an op without a map and no ``example_inputs`` to measure it.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    was = gm.training
    gm.eval()
    try:
        topo = Topology(gm, example_inputs)
        grid = np.linspace(-1.0, 1.0, grid_size)
        kernels: dict[str, NodeKernel] = {}
        measured: list[Any] | None = None
        for node in gm.graph.nodes:
            info = op_info(node)
            if info.kind in _SKIP or not topo.graph.nodes[node.name]["signal"] and info.kind is not OpKind.OUTPUT:
                continue
            dims = _dims(node)
            if info.kind is OpKind.INPUT:
                kernels[node.name] = NodeKernel(q_in, q_in, q_in * grid, 1.0, EXACT, "", dims)
                continue
            ins = [kernels[a.name] for a in node.all_input_nodes if a.name in kernels]
            out = propagate_node(node, info, gm, ins, maps_for, dims) if ins else None
            if out is not None and out.status == UNSUPPORTED:  # an exact rule applied to measured inputs
                out.status = "approximate"
                out.reason = "downstream of measured values"
            if out is None:
                if example_inputs is None:
                    raise UnsupportedNodeError(
                        f"node {node.name} ({info.describe()}) has no kernel map; pass example_inputs so it can "
                        f"be measured: {node.format_node()}")
                if measured is None:
                    cgrid = np.linspace(-1.0, 1.0, empirical_points)
                    measured = [measure(gm, *_pairs(example_inputs[0], float(c), q_in, empirical_batch, seed + i))
                                for i, c in enumerate(cgrid)]
                stats = [m.nodes.get(node.name) for m in measured]
                if any(s is None for s in stats):
                    raise UnsupportedNodeError(f"node {node.name} ({info.describe()}) has no kernel map and no "
                                               f"tensor output to measure")
                cgrid = np.linspace(-1.0, 1.0, empirical_points)
                ks = np.interp(grid, cgrid, [s.k for s in stats])
                q1 = float(np.mean([s.q for s in stats]))
                q2 = float(np.mean([s.q2 for s in stats]))
                reason = info.attrs.get("reason") or f"no kernel map for {info.describe()}"
                out = NodeKernel(q1, q2, ks, float("nan"), UNSUPPORTED, f"{reason}; measured", dims)
            kernels[node.name] = out
    finally:
        gm.train(was)
    return Analysis(topo, kernels, grid, q_in, c_in)


