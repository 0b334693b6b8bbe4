"""Node shapes recorded by the trace's own check are reused by a topology on inputs of the same
shapes (one forward pass fewer per analysis), and recomputed whenever the graph, a module's
settings, a weight's shape or the inputs' shapes differ."""
from __future__ import annotations

import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.graph import Topology
from netsurgeon.graph.running import shapes_current


class _Counted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.runs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        return self.conv(x)


def _model() -> nn.Sequential:
    return nn.Sequential(_Counted(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_topology_after_trace_reuses_the_shapes_the_trace_recorded():
    x = torch.randn(2, 3, 16, 16)
    gm = netsurgeon.trace(_model(), x, leaf_modules=["0"])
    counted = gm.get_submodule("0")
    before = counted.runs
    topo = Topology(gm, x)
    assert counted.runs == before  # no run: the shapes are the trace's
    assert topo.graph.nodes["_4"]["shape"] == (2, 4)
    Topology(gm, torch.randn(3, 3, 16, 16))  # another batch size: run again
    assert counted.runs == before + 1
    assert Topology(gm, torch.randn(3, 3, 16, 16)).graph.nodes["_4"]["shape"] == (3, 4)


def test_a_changed_module_or_weight_makes_the_shapes_stale():
    x = torch.randn(2, 3, 16, 16)
    gm = netsurgeon.trace(_model(), x)
    assert shapes_current(gm, (x,))
    head = gm.get_submodule("4")  # a wider head, same code
    head.weight, head.bias = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(6))
    gm.get_submodule("4").out_features = 6
    assert not shapes_current(gm, (x,))
    assert Topology(gm, x).graph.nodes["_4"]["shape"] == (2, 6)
    gm2 = netsurgeon.trace(_model(), x)
    gm2.graph.call_function(torch.relu, (next(iter(gm2.graph.nodes)),))
    gm2.recompile()  # the code changed
    assert not shapes_current(gm2, (x,))
