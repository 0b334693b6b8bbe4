"""Gated linear units (``φ(W₁x) ⊙ W₂x``: SwiGLU, GeGLU, Llama's MLP) under dks and tat.

The unit's maps are ``Q_u(q) = Q_φ(q)·q`` and ``C_u(c) = C_φ(c)·c``. Shaped like any activation
(``Q'(1) = 1``), the gate gave the unit a Q map of slope 2 at ``q = 1``: finite-width deviations of
q doubled at every unit (Llama's predicted and measured kernels missed by 15 standard errors after
4 blocks) and tat's curvature count made κ vanish on a deep stack. The gate is now solved as a gate
(``solve_gate``: ``Q'_φ(1) = 0``, the unit's ``C'(1) = ξ`` or ``C''(1) = κ``), whichever operand
order the model writes.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from netsurgeon.analysis.targets import glu_gates, main_operand
from netsurgeon.errors import TransformError
from netsurgeon.kernels import LocalMaps, get_activation
from netsurgeon.kernels.transforms import solve_gate, transformed


@pytest.mark.parametrize("name", ["silu", "gelu", "tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("target", [("c_slope", 0.02), ("unit_curvature", 0.075)])
def test_gate_constants_meet_their_conditions_by_the_local_maps(name, target):
    """Checked with LocalMaps (its own quadrature of ψ), not the solver's moments."""
    act = get_activation(name)
    t = solve_gate(act, **{target[0]: target[1]})
    maps = LocalMaps(transformed(act, *t))
    assert maps.q1 == pytest.approx(1.0, abs=1e-9)
    assert maps.q_slope_1() == pytest.approx(0.0, abs=1e-8)
    reached = maps.c_slope_1() if target[0] == "c_slope" else maps.c_curv_1() + 2.0 * maps.c_slope_1()
    assert reached == pytest.approx(target[1], rel=1e-7)


def test_gate_solver_refuses_bad_targets_and_a_kinked_gate_for_curvature():
    act = get_activation("silu")
    for kwargs in ({}, {"c_slope": 0.1, "unit_curvature": 0.1}, {"c_slope": 0.0}, {"unit_curvature": math.inf}):
        with pytest.raises(TransformError):
            solve_gate(act, **kwargs)
    with pytest.raises(TransformError, match="derivative jumps"):
        solve_gate(get_activation("relu"), unit_curvature=0.1)
    t = solve_gate(get_activation("relu"), c_slope=0.05)  # C'(1) is finite for a ReLU gate
    assert LocalMaps(transformed(get_activation("relu"), *t)).c_slope_1() == pytest.approx(0.05, rel=1e-6)


class _Stack(nn.Module):
    """``depth`` gated units without skips; ``swap`` writes the linear operand first."""

    def __init__(self, width: int = 64, depth: int = 4, swap: bool = False, act=F.silu) -> None:
        super().__init__()
        self.swap, self.act = swap, act
        self.g = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.u = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.d = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for g, u, d in zip(self.g, self.u, self.d):
            x = d(u(x) * self.act(g(x)) if self.swap else self.act(g(x)) * u(x))
        return x


class _SE(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // 4), nn.Linear(c // 4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x)))) + x * torch.sigmoid(x)


@pytest.mark.parametrize("swap", [False, True])
def test_gated_units_are_found_in_either_operand_order(swap):
    topo = netsurgeon.topology(_Stack(swap=swap))
    units = glu_gates(topo)
    assert len(units) == 4
    for product, (linear, gate) in units.items():
        assert main_operand(topo, product) == linear
        assert topo.graph.nodes[gate]["kind"].value == "activation" and linear.startswith("u")


def test_squeeze_excite_and_written_out_swish_are_not_gated_units():
    assert glu_gates(netsurgeon.topology(_SE())) == {}


class _SelfGated(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.g = nn.Linear(c, c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * torch.sigmoid(self.g(h))


def test_a_signal_times_a_one_layer_gate_of_itself_is_a_gated_unit():
    """``h ⊙ σ(W h)`` is ``φ(W₁x) ⊙ W₂x`` with ``W₂ = I``: the same maps in the wide limit."""
    topo = netsurgeon.topology(_SelfGated())
    assert glu_gates(topo) == {"mul": ("h", "sigmoid")}


def _shape(model: nn.Module, shaping: str, seed: int = 0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return netsurgeon.transform(model, ["input_norm", ("orthogonal_init", {"seed": seed}), shaping],
                                    example_inputs=torch.randn(32, model.g[0].in_features))


@pytest.mark.parametrize("shaping", ["tat", "dks"])
def test_operand_order_does_not_change_the_shaping(shaping):
    a = netsurgeon.derivation(_shape(_Stack(), shaping), shaping)
    b = netsurgeon.derivation(_shape(_Stack(swap=True), shaping), shaping)
    assert a["gate_constants"] and a["gate_constants"] == b["gate_constants"]
    key = "kappa" if shaping == "tat" else "xi"
    assert a[key] == pytest.approx(b[key], rel=1e-12)


def test_tat_counts_a_gated_unit_as_one_activation():
    """A chain of 4 units: max C''_f(1) = 4 units' worth, κ = τ / 4 (the default τ = 0.3)."""
    d = netsurgeon.derivation(_shape(_Stack(depth=4), "tat"), "tat")
    assert d["kappa"] == pytest.approx(0.3 / 4, rel=1e-9)
    t = d["gate_constants"]["silu"]
    maps = LocalMaps(transformed(get_activation("silu"), t["alpha"], t["beta"], t["gamma"], t["delta"]))
    assert maps.c_curv_1() + 2.0 * maps.c_slope_1() == pytest.approx(0.075, rel=1e-7)


def test_dks_gives_each_gated_unit_the_local_slope_xi():
    """A chain of 6 units: every unit has C'(1) = ξ, so ξ⁶ = ζ (1.5)."""
    d = netsurgeon.derivation(_shape(_Stack(depth=6), "dks"), "dks")
    assert d["xi"] == pytest.approx(1.5 ** (1 / 6), rel=1e-9)
    t = d["gate_constants"]["silu"]
    maps = LocalMaps(transformed(get_activation("silu"), t["alpha"], t["beta"], t["gamma"], t["delta"]))
    assert maps.c_slope_1() == pytest.approx(d["xi"] - 1.0, rel=1e-7)


def test_a_deep_vanilla_gated_stack_keeps_unit_q_at_finite_width():
    """24 units of width 128, no skips, no norms: with the gate's Q'(1) = 0 the measured output q
    stays at 1 (before, tat refused this network: its curvature count made κ ≈ 1.6e-7, which no
    transform of silu reaches)."""
    for seed in range(3):
        gm = _shape(_Stack(width=128, depth=24), "tat", seed)
        x = torch.randn(256, 128, generator=torch.Generator().manual_seed(seed))
        x = x / x.pow(2).mean(1, keepdim=True).sqrt()
        with torch.no_grad():
            q = float(gm(x).pow(2).mean())
        assert q == pytest.approx(1.0, abs=0.05)


def test_the_analysis_predicts_the_shaped_gated_stack():
    """The analysis' C map at the output of 6 shaped units against input pairs of known cosine
    pushed through the network at width 512."""
    gm = _shape(_Stack(width=512, depth=6), "tat")
    last = next(n for n in gm.graph.nodes if n.op == "output").args[0].name
    a = netsurgeon.analyze(gm, torch.randn(64, 512, generator=torch.Generator().manual_seed(1)))
    assert a.q(last) == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(2)
    for c in (0.0, 0.5, 0.9):
        x, z = torch.randn(256, 512, generator=g), torch.randn(256, 512, generator=g)
        x = x / x.norm(dim=1, keepdim=True)
        z = z - (z * x).sum(1, keepdim=True) * x
        z = z / z.norm(dim=1, keepdim=True)
        pair = [math.sqrt(512) * x, math.sqrt(512) * (c * x + math.sqrt(1 - c * c) * z)]
        with torch.no_grad():
            y1, y2 = gm(pair[0]), gm(pair[1])
        measured = float(F.cosine_similarity(y1, y2, dim=1).mean())
        assert measured == pytest.approx(float(a.cmap(last)(c)), abs=0.02)
