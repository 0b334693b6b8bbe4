"""The ``normalize_sums`` pass: residual and branch-merge sums get weights whose squares sum to one."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.graph import op_info
from netsurgeon.ops import OpKind

from structure_pass_models import _branch, _record, _Scaled, _Three, _x

WS, WR = math.sqrt(0.8), math.sqrt(0.2)


class _Sub(_Scaled):
    def forward(self, x):
        return x - self.f(x)


class _Merge(_Three):
    def forward(self, x):
        return torch.relu(self.f(x)) + torch.relu(self.g(x))


class _Learned(_Scaled):
    """A learned (non-constant) scale on the branch, like timm's LayerScale."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((1, 4, 1, 1), 0.3))

    def forward(self, x):
        return x + self.gamma * self.f(x)


class _SharedFactor(_Scaled):
    """The scaled branch is also an output: the sum reads below the factor, the output keeps it."""

    def forward(self, x):
        h = 0.5 * self.f(x)
        return x + h, h


class _Twice(nn.Module):
    def forward(self, x):
        return x + x


def test_normalize_sums_replaces_constant_factor_and_topology_reports_new_weights():
    m, x = _Scaled().eval(), _x(2, 4, 5, 5)
    gm = netsurgeon.transform(m, ["normalize_sums"])
    torch.testing.assert_close(gm(x), WS * x + WR * m.f(x))
    (block,) = netsurgeon.topology(gm).residual_blocks()
    assert block.weights == pytest.approx([WS, WR])
    assert not any(0.5 in n.args for n in gm.graph.nodes if n.op == "call_function")  # factor node removed
    (change,) = _record(gm, "normalize_sums").changes
    assert "residual sum of 2 terms" in change.what and "(was 0.5)" in change.why
    m = _SharedFactor().eval()
    y, h = netsurgeon.transform(m, ["normalize_sums"])(x)
    torch.testing.assert_close(y, WS * x + WR * m.f(x))
    torch.testing.assert_close(h, 0.5 * m.f(x))


def test_normalize_sums_option_sign_three_terms_and_branch_merge():
    x = _x(2, 4, 5, 5)
    m = _Scaled().eval()
    gm = netsurgeon.transform(m, [("normalize_sums", {"shortcut_weight2": 0.5})])
    torch.testing.assert_close(gm(x), math.sqrt(0.5) * (x + m.f(x)))
    m = _Sub().eval()
    torch.testing.assert_close(netsurgeon.transform(m, ["normalize_sums"])(x), WS * x - WR * m.f(x))
    m = _Three().eval()
    gm = netsurgeon.transform(m, ["normalize_sums"])
    torch.testing.assert_close(gm(x), WS * x + math.sqrt(0.1) * (m.f(x) + m.g(x)))
    assert "residual sum of 3 terms" in _record(gm, "normalize_sums").changes[0].what
    m = _Merge().eval()
    gm = netsurgeon.transform(m, ["normalize_sums"])
    torch.testing.assert_close(gm(x), (torch.relu(m.f(x)) + torch.relu(m.g(x))) / math.sqrt(2))
    assert "branch_merge sum of 2 terms" in _record(gm, "normalize_sums").changes[0].what


def test_normalize_sums_keeps_learned_scale_and_reports_what_it_cannot_do():
    m, x = _Learned().eval(), _x(2, 4, 5, 5)
    gm = netsurgeon.transform(m, [("normalize_sums", {"reset_layer_scale": False})])
    torch.testing.assert_close(gm(x), WS * x + WR * m.gamma * m.f(x))
    assert "kept the non-constant or in-place scaling" in _record(gm, "normalize_sums").changes[0].why
    gm = netsurgeon.transform(_Twice(), ["normalize_sums"])
    (skip,) = _record(gm, "normalize_sums").skipped
    assert skip.node == "add" and "more than once" in skip.why


class _InPlace(nn.Module):
    def __init__(self, read_again: bool):
        super().__init__()
        self.conv, self.f, self.read_again = nn.Conv2d(4, 4, 1), _branch(), read_again

    def forward(self, x):
        h = self.conv(x)
        out = h.add_(self.f(h))
        return h * 2 if self.read_again else out * 2


def test_normalize_sums_in_place_add_rewritten_unless_its_operand_is_read_again():
    m, x = _InPlace(read_again=False).eval(), _x(2, 4, 5, 5)
    gm = netsurgeon.transform(m, ["normalize_sums"])
    h = m.conv(x)
    torch.testing.assert_close(gm(x), 2 * (WS * h + WR * m.f(h)))
    gm = netsurgeon.transform(_InPlace(read_again=True), ["normalize_sums"])
    (skip,) = _record(gm, "normalize_sums").skipped
    assert "works in place" in skip.why and skip.node == "add_"


def test_normalize_sums_on_resnet18_weights_every_block():
    gm = netsurgeon.transform(timm.create_model("resnet18"), [("normalize_sums", {"shortcut_weight2": 0.5})])
    blocks = netsurgeon.topology(gm).residual_blocks()
    assert len(blocks) == 8
    assert all(b.weights == pytest.approx([math.sqrt(0.5)] * 2) for b in blocks)
    adds = [n for n in gm.graph.nodes if op_info(n).kind is OpKind.ADD]
    assert all(op_info(n).attrs["weights"] == pytest.approx([math.sqrt(0.5)] * 2) for n in adds)


def test_normalized_sums_keep_q_order_one_with_depth():
    """SELU has Q(1) = 1 (an attracting fixed point), so with normalized sums and
    orthogonal init every block keeps q = 1; unnormalized sums make q grow with depth.
    (With timm's default ReLU, Q(q) = q/2 and q decays with or without normalization:
    fixing that is the DKS activation transform's job, not these passes'.)"""
    base = [("strip_bn", {"mode": "remove"}), "maxpool_to_avgpool", ("orthogonal_init", {"seed": 0})]
    x = _x(4, 3, 32, 32)
    qs = {}
    for normalize in (True, False):
        m = timm.create_model("resnet18", act_layer=nn.SELU)
        gm = netsurgeon.transform(m, base[:1] + ["normalize_sums"] * normalize + base[1:])
        a = netsurgeon.analyze(gm)
        adds = [n.name for n in gm.graph.nodes if op_info(n).kind is OpKind.ADD]
        qs[normalize] = [a.q(n) for n in adds]
        if normalize:
            measured = netsurgeon.measure(gm, x, _x(4, 3, 32, 32, seed=1))
            assert all(0.05 < measured[n].q < 2.0 for n in adds)
    assert qs[True] == pytest.approx([1.0] * 8, rel=1e-6)
    assert qs[False][-1] > 8 * qs[False][0] / 2  # grows by about 1.2 per block


class _NestedThree(nn.Module):
    """A normalized sum of three written as normalize_sums writes it: ``(w·a + w·b) + w·c``, w² = 1/3."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = 3 ** -0.5
        return self.o(torch.tanh((w * self.a(x) + w * self.b(x)) + w * self.c(x)))


def test_a_subnetwork_reaching_a_nested_sum_through_one_term_takes_the_others_alike():
    """CoaT: a lone branch reaches the outer sum through ``w·c`` only. The missing operand is the inner
    sum, whose nominal share of q is 2/3 (not its weight 1²): the activation after it sees q = 1, not 4/3."""
    from netsurgeon.analysis.targets import IdealGraph, Subnetwork

    graph = IdealGraph(netsurgeon.topology(_NestedThree()))
    for sub in (Subnetwork("c alone", ("c",), ("o",)), graph.subnetworks()[0]):
        values = graph.propagate(sub, lambda _n, v: v + 1.0, 0.0)
        assert values == {"o": pytest.approx(1.0)}
