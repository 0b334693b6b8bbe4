"""Figures of an :class:`~netsurgeon.analysis.Analysis`: C maps at several depths, q along depth."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["plot_cmaps", "plot_q", "depth_nodes"]


def depth_nodes(analysis: Any, count: int = 6) -> list[str]:
    """Up to ``count`` nodes spread evenly over depth (activations and weight layers), the output last."""
    kinds = ("activation", "linear", "conv", "add", "norm")
    candidates = [n for n in analysis.kernels
                  if str(analysis.topology.graph.nodes[n]["kind"]) in kinds]
    outputs = [n for n in analysis.kernels if str(analysis.topology.graph.nodes[n]["kind"]) == "output"]
    if len(candidates) > count - 1:
        idx = np.linspace(0, len(candidates) - 1, count - 1).round().astype(int)
        candidates = [candidates[i] for i in dict.fromkeys(idx)]
    return candidates + outputs[:1]


def plot_cmaps(analysis: Any, nodes: Sequence[str] | None = None) -> Any:
    """C maps from the input to each node on one figure (the "C map degeneration" picture)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    nodes = list(nodes) if nodes is not None else depth_nodes(analysis)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    c = analysis.grid
    ax.plot(c, c, color="0.7", linestyle="--", label="identity")
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(nodes):
        ax.plot(c, analysis.cmap(n)(c), color=cmap(i / max(1, len(nodes) - 1)), label=n)
    ax.set_xlabel("input cosine c_in")
    ax.set_ylabel("cosine at node")
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("C maps along depth")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_q(analysis: Any) -> Any:
    """Predicted q of the first input along the nodes of the graph, in order."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(analysis.kernels)
    q = [analysis.kernels[n].q for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(range(len(q)), q, marker=".")
    ax.set_xlabel("node (graph order)")
    ax.set_ylabel("q")
    ax.set_title("q along depth")
    fig.tight_layout()
    return fig
