"""The ``maxpool_to_avgpool`` pass: max pooling (modules, functions, timm's SAME and global pools)
becomes average pooling that excludes the padding; dilated pools are skipped."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_pool2d

import netsurgeon
from netsurgeon.graph import op_info
from netsurgeon.layers import ExclusiveAvgPool2dSame

from structure_pass_models import _record, _x


def test_maxpool_to_avgpool_on_resnet18_equals_eager_avg_pooling():
    m = timm.create_model("resnet18").eval()
    gm = netsurgeon.transform(m, ["maxpool_to_avgpool"]).eval()
    assert not any("MaxPool" in type(mod).__name__ for mod in gm.modules())
    ref = copy.deepcopy(m)
    ref.maxpool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
    x = _x(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x))
    (change,) = _record(gm, "maxpool_to_avgpool").changes
    assert change.node == "maxpool" and "count_include_pad=False" in change.why


@pytest.mark.parametrize("pool", ["max", "avgmax", "fastmax", "fastavgmax"])
def test_maxpool_to_avgpool_global_pool_variants(pool):
    m = timm.create_model("resnet10t", global_pool=pool).eval()
    gm = netsurgeon.transform(m, ["maxpool_to_avgpool"]).eval()
    netsurgeon.topology(gm)
    assert not any(op_info(n).attrs.get("pool_type") in ("max", "adaptive_max", "max_reduce") for n in gm.graph.nodes)
    ref = timm.create_model("resnet10t", global_pool="avg").eval()
    ref.load_state_dict(m.state_dict())
    ref.maxpool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
    x = _x(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x))


class _Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.same = create_pool2d("max", 3, 2, padding="same")  # timm MaxPool2dSame
        self.dilated = nn.MaxPool2d(3, 1, dilation=2)

    def forward(self, x):
        return F.max_pool2d(x, 3, 2, 1, ceil_mode=True), self.same(x), self.dilated(x)


def test_maxpool_to_avgpool_functional_same_padding_and_dilated_skip():
    m, x = _Pools(), _x(2, 3, 9, 9)
    assert type(m.same).__name__ == "MaxPool2dSame"
    gm = netsurgeon.transform(m, ["maxpool_to_avgpool"])
    a, b, c = gm(x)
    torch.testing.assert_close(a, F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False))
    torch.testing.assert_close(b, F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))  # SAME pads 1 each side here
    torch.testing.assert_close(c, m.dilated(x))
    assert isinstance(gm.same, ExclusiveAvgPool2dSame)
    rec = _record(gm, "maxpool_to_avgpool")
    assert {ch.node for ch in rec.changes} == {"max_pool2d", "same"}
    (skip,) = rec.skipped
    assert skip.node == "dilated" and "dilation" in skip.why
