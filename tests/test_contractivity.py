"""operator_norm_bound and GradientEnergy (issue 7 §2)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.analysis.contractivity import GradientEnergy, operator_norm_bound


def _dense(op, shape):
    """The matrix of a linear map on inputs of ``shape`` (its Jacobian)."""
    x = torch.zeros(shape, dtype=torch.float64)
    return torch.autograd.functional.jacobian(op, x).reshape(-1, x.numel())


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1),
                                  lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2),
                                  lambda: nn.Conv1d(2, 5, 4, stride=3), lambda: nn.Conv2d(2, 2, 2, dilation=2)])
def test_power_iteration_matches_the_dense_matrix_norm(make):
    torch.manual_seed(0)
    conv = make().double()
    shape = (1, conv.in_channels) + ((7, 7) if isinstance(conv, nn.Conv2d) else (11,))
    b = operator_norm_bound(nn.Sequential(conv), torch.zeros(shape, dtype=torch.float64), iters=2000)
    fn = nn.functional.conv2d if isinstance(conv, nn.Conv2d) else nn.functional.conv1d
    dense = _dense(lambda v: fn(v, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups), shape)
    exact = float(torch.linalg.matrix_norm(dense, 2))
    assert b.factors["_0"] <= exact * (1 + 1e-9)  # power iteration approaches from below
    assert b.factors["_0"] == pytest.approx(exact, rel=1e-3)


def test_network_bound_composes_layers_norms_sums_and_activations():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(6, 6).double(), nn.Linear(6, 3).double()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin1, self.act, self.lin2 = lin1, nn.Tanh(), lin2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.lin1(x))
            return self.lin2(x + 0.5 * h)

    b = operator_norm_bound(Net(), torch.zeros(1, 6, dtype=torch.float64))
    s1 = float(torch.linalg.matrix_norm(lin1.weight.detach(), 2))
    s2 = float(torch.linalg.matrix_norm(lin2.weight.detach(), 2))
    assert b.factors["lin1"] == pytest.approx(s1, rel=1e-6)
    assert b.network == pytest.approx(s2 * (1 + 0.5 * s1), rel=1e-6)  # Σ |w| L over the sum, tanh 1-Lipschitz
    assert "network bound" in b.table()


def test_resnet_bound_has_bn_factors_and_names_max_pool():
    b = operator_norm_bound(timm.create_model("resnet18").eval(), torch.randn(1, 3, 64, 64), iters=20)
    assert b.kinds["bn1"] == "norm" and b.factors["bn1"] > 0
    assert "maxpool" in b.unbounded and b.network == float("inf")
    gm = netsurgeon.transform(timm.create_model("resnet18"), passes=["maxpool_to_avgpool"])
    b = operator_norm_bound(gm, torch.randn(1, 3, 64, 64), iters=20)
    assert not b.unbounded and 0 < b.network < float("inf")


def test_gradient_energy_records_and_plots():
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 1))
    ge = GradientEnergy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(8, 16)).pow(2).mean().backward()
        ge.record()
        opt.step()
    means = ge.mean()
    assert len(means) == 7 and all(v > 0 for v in means.values())
    assert all(len(h) == 5 for h in ge.history.values())
    fig = ge.plot()
    assert fig.axes[0].get_yscale() == "log"
