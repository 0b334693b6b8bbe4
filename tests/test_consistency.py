"""rms_norm and modulus passes (issue 7 §2)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.layers import MinimalRMSNorm, Modulus


def test_minimal_rms_norm_train_eval_and_backprop_constant():
    m = MinimalRMSNorm(momentum=0.5)
    x = 3.0 * torch.randn(64, 8)
    y = m.train()(x)
    rms = float(x.pow(2).mean().sqrt())
    assert float(m.running_rms) == pytest.approx(rms, rel=1e-5)  # the first batch initializes the average
    torch.testing.assert_close(y, x / m.running_rms)
    m(2 * x)  # moving average: 0.5 * rms + 0.5 * 2 rms
    assert float(m.running_rms) == pytest.approx(1.5 * rms, rel=1e-4)
    before = m.running_rms.clone()
    m.eval()(x)
    assert torch.equal(m.running_rms, before)  # eval: no update
    x = x.requires_grad_()
    m.eval()(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1.0) / before)  # a constant in backprop


def test_rms_norm_pass_replaces_every_batch_norm_and_keeps_composite_activations():
    for name in ("resnet18", "efficientnet_b0"):
        gm = netsurgeon.transform(timm.create_model(name), passes=["rms_norm"])
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
        n = sum(isinstance(m, MinimalRMSNorm) for m in gm.modules())
        assert n == len(netsurgeon.report(gm).passes[0].changes) > 0
        x = torch.randn(2, 3, 64, 64)
        out = gm.train()(x)
        out.sum().backward()
        assert torch.isfinite(gm.eval()(x)).all()
        assert any(k.endswith("running_rms") for k in gm.state_dict())
    # efficientnet's BatchNormAct2d keeps its SiLU after the new norm
    acts = [m for m in gm.modules() if isinstance(m, nn.SiLU)]
    assert acts


def test_modulus_replaces_relu_family():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.Tanh())
    gm = netsurgeon.transform(net, passes=["modulus"])
    assert sum(isinstance(m, Modulus) for m in gm.modules()) == 2
    x = torch.randn(3, 4)
    h = gm.get_submodule("2")(gm.get_submodule("ns_modulus_0")(gm.get_submodule("0")(x)))
    torch.testing.assert_close(h, net[2](net[0](x).abs()))
    assert netsurgeon.topology(gm).activations()["abs"] == 2
