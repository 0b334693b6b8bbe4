"""Product maps in dks/tat (issue 16 §1): the tables cover the cosines the final network takes.

A product's map is a table over the cosines its main operand takes in an analysed copy of the
network. Deep in a ReLU network those lie near 1; the final TReLU slope makes them smaller. A
table read outside its range returned its end value, so the network C(0) computed by the pass
rose again as the activations grew more linear and the slope ran to 1 (tresnet_m: C(0) 0.966
instead of 0.9). The independent check here is the analysis of the result (kernel rules,
products by their independence rule) at the input of the final pooling, which the targets'
network C map ends at.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.analysis.targets import ProductMap
from netsurgeon.errors import UnsupportedNodeError
from netsurgeon.passes._empirical import linearized, monotone_table, widened
from netsurgeon.passes.dks import _solve_trelu


class _SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def _net(plain: int, gated: int, c: int = 32) -> nn.Sequential:
    """``plain`` conv-ReLU layers, then ``gated`` conv-ReLU-SE layers, a global pool and a head."""
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1)]
    for _ in range(plain):
        layers += [nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)]
    for _ in range(gated):
        layers += [nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), _SE(c)]
    return nn.Sequential(*layers, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def _tat(model: nn.Module, x: torch.Tensor, eta: float) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return netsurgeon.transform(model, ["input_norm", ("orthogonal_init", {"seed": 0}), ("tat", {"eta": eta})],
                                    example_inputs=x)


def _pool_input(gm: torch.fx.GraphModule) -> str:
    pools = [n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.AdaptiveAvgPool2d)]
    return pools[-1].args[0].name


@pytest.mark.parametrize("eta", [0.3, 0.6])
def test_tat_network_c0_is_the_target_by_the_analysis_of_the_result(eta):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    gm = _tat(_net(plain=16, gated=4), x, eta)
    der = netsurgeon.derivation(gm, "tat")
    assert "eta_reached" not in der and 0.0 < der["negative_slope"] < 1.0
    c0 = float(netsurgeon.analyze(gm, x).cmap(_pool_input(gm))(np.array([0.0]))[0])
    assert c0 == pytest.approx(eta, abs=2e-3)
    for name, pm in der["product_maps"].items():  # every table reaches the cosines the result takes
        assert min(pm["c_in"]) <= 0.0, name


def test_linearized_keeps_gate_activations_only():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = netsurgeon.trace(_net(plain=1, gated=1, c=8), x)
    lin = linearized(gm)
    targets = [n.target for n in lin.graph.nodes if n.op != "placeholder"]
    assert targets.count(torch.sigmoid) == 1 and targets.count(torch.relu) == 1  # the gate's
    assert not any(isinstance(lin.get_submodule(t), nn.ReLU) for t in targets if isinstance(t, str)
                   and t in dict(lin.named_modules()))
    assert len(list(gm.graph.nodes)) - len(list(lin.graph.nodes)) == 3  # three nn.ReLU on the signal path


def test_widened_extends_the_table_outside_its_range_only():
    narrow = ProductMap(2.0, 0.5, (0.8, 0.9, 1.0), (0.7, 0.85, 1.0), 0.1)
    wide = ProductMap(3.0, 0.7, (-1.0, 0.0, 0.85, 1.0), (-0.5, 0.1, 0.0, 0.9), 0.2)
    got = widened(narrow, wide)
    assert (got.q_ratio, got.slope, got.curvature) == (2.0, 0.5, 0.1)
    assert got.c_in == (-1.0, 0.0, 0.8, 0.9, 1.0) and got.c_out == (-0.5, 0.1, 0.7, 0.85, 1.0)
    assert widened(narrow, None) is narrow


class _Floor:
    """An ideal graph whose network C(0) never falls below 0.95 (the rest of the network correlates)."""

    def network_c0(self, rule) -> float:
        return 0.95 + 0.05 * rule("act", 0.0)


def test_eta_below_what_linear_activations_give_is_refused_or_closest():
    with pytest.raises(UnsupportedNodeError, match=r"a = 1 \(linear activations\) gives the network C_f\(0\) = 0.95"):
        _solve_trelu(_Floor(), {"act"}, {}, 0.9, refuse=True)
    assert _solve_trelu(_Floor(), {"act"}, {}, 0.9, refuse=False) == (1.0, pytest.approx(0.95))


class _TwinPools(nn.Module):
    """NASNet's ``comb_iter_3``: two poolings of one signal, added (a correlated sum)."""

    def __init__(self, c: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(depth))
        self.left, self.right = nn.AvgPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for conv in self.convs:
            h = conv(torch.relu(h))
            h = self.left(h) + self.right(h)
        return self.head(torch.relu(h).mean((2, 3)))


def test_a_weighted_correlated_sum_is_rescaled_to_its_terms_q():
    """normalize_sums weights the sum ``w·p + w·p`` (w² = 1/2); its map's q ratio is taken against
    ``p`` below the weight, so the rescale returns q to that of ``p`` (it was taken against ``w·p``,
    at q = 1/2, and tat refused: an activation received q = 1/2)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = netsurgeon.transform(_TwinPools(), ["normalize_sums", "input_norm", ("orthogonal_init", {"seed": 0}),
                                                 "tat"], example_inputs=x)
    maps = netsurgeon.derivation(gm, "tat")["product_maps"]
    assert len(maps) == 4
    for pm in maps.values():  # (w p + w p)² = 2 p²: the ratio is exact whatever the pooling does to q
        assert pm["q_ratio"] == pytest.approx(2.0, rel=1e-6)


class _Glu(nn.Module):
    """gmixer's GluMlp: ``x1 * silu(x2)``, the only nonlinearity, on the gate path."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc1, fc2 in zip(self.fc1, self.fc2):
            a, b = fc1(x).chunk(2, dim=-1)
            x = fc2(a * torch.nn.functional.silu(b))
        return x


def test_gate_only_activations_are_refused_by_name_when_products_pass_through():
    with pytest.raises(UnsupportedNodeError, match=r"silu") as err:
        netsurgeon.transform(_Glu(), [("tat", {"products": "neutral"})], example_inputs=torch.randn(8, 16))
    assert "silu" in " ".join(err.value.nodes) and "leave" in str(err.value)


def test_a_glu_split_from_one_projection_is_a_gated_unit():
    """``a, b = fc1(x).chunk(2, -1); a * silu(b)``: the halves come from disjoint rows of one weight,
    hence independent; the product is a gated linear unit and tat shapes its gate (it refused the
    model before: its only activations were on gate paths)."""
    from netsurgeon.analysis.sums import dependent_products
    from netsurgeon.analysis.targets import glu_gates

    topo = netsurgeon.topology(_Glu())
    assert dependent_products(topo) == {} and len(glu_gates(topo)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = netsurgeon.transform(_Glu(width=256), ["input_norm", ("orthogonal_init", {"seed": 0}), "tat"],
                                  example_inputs=torch.randn(64, 256))
    d = netsurgeon.derivation(gm, "tat")
    assert "silu" in d["gate_constants"] and d["kappa"] == pytest.approx(0.1, rel=1e-9)  # τ / 3 units
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0].name
    assert netsurgeon.analyze(gm, torch.randn(64, 256)).q(out) == pytest.approx(1.0, abs=1e-3)


def test_pieces_of_a_split_along_tokens_are_still_dependent():
    """Rows of one weight make the features independent, not the tokens: halves of the token axis
    share every row, so their product stays measured."""
    from netsurgeon.analysis.sums import dependent_products

    class TokenHalves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.fc(x).chunk(2, dim=1)
            return a * torch.sigmoid(b)

    assert list(dependent_products(netsurgeon.topology(TokenHalves(), torch.randn(2, 6, 8)))) == ["mul"]


def test_a_measured_table_past_one_is_clipped():
    pm = ProductMap(1.0, 1.0, (0.0, 0.5, 1.0), (0.0, 0.6, 1.0076))  # measurement noise past 1 (nextvit)
    assert pm.c_map(1.0) == 1.0 and pm.c_map(0.99) <= 1.0 and pm.c_map(0.5) == pytest.approx(0.6)


def test_monotone_table_pools_scattered_points_at_nonnegative_cosines_only():
    c_in = np.array([0.5, 0.3, 0.31, -0.5, -0.2, 0.3, 0.9])
    c_out = np.array([0.4, 0.1, -0.2, 0.3, -0.1, 0.5, 0.8])
    xs, ys = monotone_table(c_in, c_out)
    assert xs == (-0.5, -0.2, 0.3, 0.31, 0.5, 0.9)  # sorted, the repeated 0.3 dropped (first kept)
    assert ys[:2] == (0.3, -0.1)  # below 0 kept as measured
    assert ys[2] == ys[3] == pytest.approx(-0.05)  # 0.1 then -0.2: pooled
    assert list(ys[2:]) == sorted(ys[2:])


class _PoolMixer(nn.Module):
    """PoolFormer's token mixer without its shortcut, ``pool(h) - h``: a correlated sum whose map
    steepens the C map by itself."""

    def __init__(self, c: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(depth))
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for conv in self.convs:
            h = torch.relu(conv(self.pool(h) - h))
        return h.mean((2, 3))


def test_unreachable_zeta_names_the_products_and_the_zeta_that_works():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    passes = ["normalize_sums", "input_norm", ("orthogonal_init", {"seed": 0})]
    with pytest.raises(UnsupportedNodeError, match=r"zeta = 1.01 is unreachable: .* products with a local C'\(1\) "
                                                    r"above 1: add.*; use zeta > ") as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            netsurgeon.transform(_PoolMixer(), passes + [("dks", {"zeta": 1.01})], example_inputs=x)
    assert err.value.nodes and all(n.startswith("add") for n in err.value.nodes)  # the weighted pool(h) - h
