"""The ``input_norm`` pass: a per-location norm on every tensor input, which the analysis maps to q = 1."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.ops import OpKind

from structure_pass_models import _record, _x


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, mask=None):
        return self.conv(x)


def test_input_norm_gives_unit_q_at_every_location_and_skips_non_tensor_input():
    m = _TwoInputs()
    z = _x(2, 3, 6, 6)
    x = z / z.norm(dim=1, keepdim=True) * (1 + 9 * _x(2, 1, 6, 6, seed=1).abs())  # a norm >= 1 per location
    gm = netsurgeon.transform(m, ["input_norm"])
    norm = gm.get_submodule("input_norm")
    assert repr(norm) == "LocationNorm(dim=1, eps=1e-06)"
    torch.testing.assert_close(norm(x).pow(2).sum(1), torch.full((2, 6, 6), 3.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(gm(x), m.conv(norm(x)))
    (user,) = next(n for n in gm.graph.nodes if n.name == "x").users
    assert user.target == "input_norm"
    rec = _record(gm, "input_norm")
    assert [c.node for c in rec.changes] == ["x"]
    assert [s.node for s in rec.skipped] == ["mask"] and "not a tensor input" in rec.skipped[0].why


def test_input_norm_is_a_norm_the_analysis_maps_to_unit_q():
    gm = netsurgeon.transform(_TwoInputs(), ["input_norm"])
    topo = netsurgeon.topology(gm)
    info = topo.info("input_norm")
    assert info.kind is OpKind.NORM and info.norm.family == "rms" and info.attrs["per_location"]
    a = netsurgeon.analyze(gm, q_in=5.0)
    assert a.q("x") == 5.0 and a.q("input_norm") == pytest.approx(1.0)
    assert a.status("input_norm") == ("exact", "")


def test_input_norm_channels_last():
    m = nn.Sequential(nn.Linear(6, 3))
    gm = netsurgeon.transform(m, [("input_norm", {"dim": -1})])
    x = _x(2, 5, 6) * 7
    torch.testing.assert_close(gm.get_submodule("input_norm")(x).pow(2).sum(-1), torch.full((2, 5), 6.0))
