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
