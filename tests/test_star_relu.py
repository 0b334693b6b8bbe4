"""MetaFormer's StarReLU (``s * relu(x)² + b``, poolformerv2, caformer) is an activation with the
learnable s and b it holds, not a ``pow`` without a kernel rule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from timm.models.metaformer import StarReLU

import netsurgeon
from netsurgeon.graph import Topology
from netsurgeon.kernels import LocalMaps, get_activation
from netsurgeon.ops import OpKind


def _mlp(scale: float, bias: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), StarReLU(scale_value=scale, bias_value=bias), nn.Linear(64, 8))


def test_star_relu_is_one_activation_with_its_scale_and_bias():
    gm = netsurgeon.trace(_mlp(0.8944, -0.4472), torch.randn(4, 64))
    topo = Topology(gm)
    acts = topo.nodes_of(OpKind.ACTIVATION)
    assert len(acts) == 1 and not [n for n in gm.graph.nodes if "pow" in n.name]
    spec = topo.info(acts[0]).activation
    assert spec.name == "star_relu"
    assert dict(spec.params) == pytest.approx({"scale": 0.8944, "bias": -0.4472})


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0])
def test_star_relu_q_map_is_the_closed_form(q):
    """E[(s relu(z)² + b)²] for z ~ N(0, q): s² (3q²/2) + 2 s b (q/2) + b²."""
    s, b = 0.8944, -0.4472
    maps = LocalMaps(get_activation("star_relu", scale=s, bias=b))
    assert maps.q_map(q) == pytest.approx(s * s * 1.5 * q * q + s * b * q + b * b, rel=1e-8)


def test_analysis_of_a_star_relu_mlp_matches_measurement():
    torch.manual_seed(0)
    width = 512
    model = nn.Sequential(nn.Linear(width, width, bias=False), StarReLU(), nn.Linear(width, width, bias=False))
    for lin in (model[0], model[2]):
        nn.init.normal_(lin.weight, std=1 / math.sqrt(width))
    x = torch.randn(64, width)
    a = netsurgeon.analyze(model, x)
    gm = netsurgeon.trace(model, x)
    act = Topology(gm).nodes_of(OpKind.ACTIVATION)[0]
    with torch.no_grad():
        measured = float(model[1](model[0](x)).pow(2).mean())
    assert a.q(act) == pytest.approx(measured, rel=0.1)


def test_dks_shapes_star_relu_as_a_homogeneous_activation():
    """relu(x)² is positively homogeneous (degree 2): α only rescales β, so DKS solves the shift for
    C'(1) = ξ and C(0) = 0, Q(1) = 1, and reports the Q'(1) it cannot reach, as for ReLU."""
    from netsurgeon.kernels.transforms import homogeneous_degree, solve_dks, transformed

    act = get_activation("star_relu", scale=0.8944, bias=-0.4472)
    assert homogeneous_degree(act) == pytest.approx(2.0)
    assert homogeneous_degree(get_activation("gelu")) is None
    maps = LocalMaps(transformed(act, *solve_dks(act, 1.05)))
    assert (maps.q1, maps.c0(), maps.c_slope_1()) == pytest.approx((1.0, 0.0, 1.05), abs=1e-8)
    assert 1.0 < maps.q_slope_1() < 1.1
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(32, 32), StarReLU())])
    with pytest.warns(UserWarning, match="StarReLU\\) cannot reach Q'\\(1\\) = 1"):
        gm = netsurgeon.transform(model, ["input_norm", "dks"], example_inputs=torch.randn(8, 32))
    from netsurgeon.layers import ShapedActivation

    shaped = [m for m in gm.modules() if isinstance(m, ShapedActivation)]
    assert len(shaped) == 4 and all(isinstance(m.base, StarReLU) for m in shaped)
