"""Op-kind classification: activations with parameters, norms, sums, products, unknowns."""
from __future__ import annotations

import pytest
import timm.layers as tl
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from netsurgeon.ops import OpKind


class Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _only(model: nn.Module, kind: OpKind):
    topo = netsurgeon.topology(model)
    nodes = topo.nodes_of(kind)
    assert len(nodes) == 1, (kind, dict(topo.kind_counts()))
    return topo.info(nodes[0])


@pytest.mark.parametrize("module, expected", [
    (nn.ReLU(), "relu"), (nn.LeakyReLU(0.2), "leaky_relu(negative_slope=0.2)"), (nn.ELU(0.5), "elu(alpha=0.5)"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.GELU(), "gelu"), (nn.SiLU(), "silu"), (nn.Mish(), "mish"),
    (nn.Softplus(2.0), "softplus(beta=2, threshold=20)"), (nn.Hardtanh(-2, 3), "hardtanh(min_val=-2, max_val=3)"),
    (nn.ReLU6(), "relu6"), (nn.Hardswish(), "hardswish"), (nn.SELU(), "selu"), (nn.CELU(), "celu(alpha=1)"),
    (nn.PReLU(init=0.3), "prelu(negative_slope=0.3)"), (tl.activations.Swish(), "silu"),
    (tl.activations.HardSigmoid(), "hardsigmoid"), (tl.activations.GELUTanh(), "gelu_tanh"),
])
def test_activation_modules(module, expected):
    info = _only(nn.Sequential(nn.Linear(3, 3), module), OpKind.ACTIVATION)
    assert str(info.activation) == expected


@pytest.mark.parametrize("fn, expected", [
    (lambda x: F.leaky_relu(x, 0.1), "leaky_relu(negative_slope=0.1)"), (torch.tanh, "tanh"),
    (lambda x: x.sigmoid(), "sigmoid"), (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
    (lambda x: x.clamp(min=0), "relu"), (torch.abs, "abs"), (F.softsign, "softsign"),
    (lambda x: F.elu(x, alpha=2.0), "elu(alpha=2)"),
])
def test_activation_functions_and_methods(fn, expected):
    assert str(_only(Wrap(fn), OpKind.ACTIVATION).activation) == expected


def test_norms_and_composites():
    info = _only(nn.Sequential(nn.Conv2d(3, 4, 1), tl.BatchNormAct2d(4, act_layer=nn.SiLU)), OpKind.NORM)
    assert info.norm.family == "batch" and info.norm.train_dependent and str(info.norm.activation) == "silu"
    info = _only(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), OpKind.NORM)
    assert info.norm.family == "layer" and not info.norm.train_dependent
    info = _only(nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)), OpKind.NORM)
    assert info.norm.family == "group"


def test_sums_products_and_affine():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.gamma = nn.Parameter(torch.ones(4))

        def forward(self, x):
            h = 0.5 * self.a(x) + self.b(x)  # weighted sum
            g = self.a(x) * torch.sigmoid(self.b(x))  # product of two signals
            return h * self.gamma + g - x.shape[0]  # layer-scale-like affine, shift

    topo = netsurgeon.topology(M())
    adds = [topo.info(n) for n in topo.nodes_of(OpKind.ADD)]
    assert adds[0].attrs["weights"] == [0.5, 1.0]
    assert len(topo.nodes_of(OpKind.MULTIPLY)) == 1
    assert {topo.info(n).name for n in topo.nodes_of(OpKind.AFFINE)} == {"scale", "shift"}
    assert not topo.unknown


def test_subclass_with_own_forward_is_not_assumed_to_be_its_base():
    class Weird(nn.ReLU):
        def forward(self, x):
            return x.flip(0)

    topo = netsurgeon.topology(nn.Sequential(nn.Linear(2, 2), Weird()))
    assert "activation" not in topo.kind_counts()
    assert topo.kind_counts()["reshape"] == 1  # traced through: its own forward (a flip) is what is seen


class _BufferClamp(nn.Module):
    """Gemma 4's clippable linear: a clamp whose bounds are buffers (±inf unless a checkpoint sets them)."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("lo", torch.tensor(lo))
        self.register_buffer("hi", torch.tensor(hi))

    def forward(self, x):
        return torch.clamp(self.fc(x), self.lo, self.hi)


def test_clamp_bounds_in_buffers_are_read():
    assert _only(_BufferClamp(float("-inf"), float("inf")), OpKind.IDENTITY).name == "clamp"
    assert str(_only(_BufferClamp(-2.0, 3.0), OpKind.ACTIVATION).activation) == "hardtanh(min_val=-2, max_val=3)"
