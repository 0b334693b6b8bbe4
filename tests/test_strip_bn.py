"""strip_bn edge cases: shared outputs, shared modules, forward folds, linear+BN1d, composites."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d

import netsurgeon
from netsurgeon.layers import ChannelAffine

from conftest import count_batch_norms, randomize_norm_stats, rel_diff


def _fold(m: nn.Module, x: torch.Tensor):
    m = randomize_norm_stats(m).eval()
    gm = netsurgeon.transform(m, ["strip_bn"], example_inputs=(x,)).eval()
    with torch.no_grad():
        assert rel_diff(m(x), gm(x)) <= 1e-5
    return gm, netsurgeon.report(gm).passes[0]


class SharedOutput(nn.Module):
    """conv output feeds the BN and a skip: fx's fuse would silently alter the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_with_other_users_is_not_altered_for_them():
    gm, rep = _fold(SharedOutput(), torch.randn(2, 3, 8, 8))
    change = rep.changes[0]
    assert change.what == "replaced by a fixed per-channel affine"
    assert "also used by add" in change.why
    assert isinstance(gm.get_submodule("bn.affine"), ChannelAffine)


class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))


def test_conv_called_twice_is_not_folded():
    gm, rep = _fold(SharedModule(), torch.randn(2, 4, 5, 5))
    assert all("called at 2 places" in c.why for c in rep.changes)


class PreAct(nn.Module):
    """BN -> 1x1 conv without padding: folds forwards; BN -> 3x3 padded conv: cannot."""

    def __init__(self):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1, groups=2)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn2(self.conv1(self.bn1(x))))


def test_forward_fold_into_unpadded_grouped_conv_and_refusal_with_padding():
    gm, rep = _fold(PreAct(), torch.randn(2, 4, 6, 6))
    by_node = {c.node: c for c in rep.changes}
    assert by_node["bn1"].what == "folded into following Conv2d conv1"
    assert by_node["bn2"].what == "folded into preceding Conv2d conv1"  # conv1 now feeds bn2 directly
    assert count_batch_norms(gm) == 0


def test_forward_fold_refused_when_consumer_pads():
    m = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    gm, rep = _fold(m, torch.randn(2, 4, 6, 6))
    assert rep.changes[0].what == "replaced by a fixed per-channel affine"
    assert "pads its input" in rep.changes[0].why


def test_linear_batchnorm1d_folds_with_known_rank_only():
    m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    gm, rep = _fold(m, torch.randn(4, 5))
    assert rep.changes[0].what == "folded into preceding Linear 0"
    blind = netsurgeon.transform(randomize_norm_stats(m).eval(), ["strip_bn"])  # no example inputs
    assert "rank is unknown" in netsurgeon.report(blind).passes[0].changes[0].why


def test_composite_keeps_activation_and_its_parameters():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.PReLU))
    gm, rep = _fold(m, torch.randn(2, 3, 6, 6))
    assert isinstance(gm.get_submodule("1.act"), nn.PReLU)
    assert "1.act.weight" in gm.state_dict()
    removed = netsurgeon.transform(m, [("strip_bn", {"mode": "remove"})])
    assert "kept 1.act" in netsurgeon.report(removed).passes[0].changes[0].what
    assert count_batch_norms(removed) == 0


def test_no_running_stats_is_reported_not_folded():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    gm = netsurgeon.transform(m, ["strip_bn"])
    rep = netsurgeon.report(gm).passes[0]
    assert rep.skipped and "no running statistics" in rep.skipped[0].why


def test_removed_network_trains():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 3))
    gm = netsurgeon.transform(m, [("strip_bn", {"mode": "remove"})])
    assert count_batch_norms(gm) == 0
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.Adam(gm.parameters(), lr=0.02)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "resnetv2_50"])
def test_fx_fuse_would_skip_composites_but_strip_bn_does_not(name):
    import timm

    model = timm.create_model(name).eval()
    gm = netsurgeon.transform(model, ["strip_bn"])
    assert count_batch_norms(model) > 0 and count_batch_norms(gm) == 0
