"""The ``remove_skips`` pass: residual shortcuts removed, concatenations and branch merges kept."""
from __future__ import annotations

import timm
import torch
import torch.nn as nn

import netsurgeon

from structure_pass_models import _branch, _record, _Three, _x


class _Mixed(nn.Module):
    """A residual block, a concatenation and a two-branch merge."""

    def __init__(self):
        super().__init__()
        self.f, self.g, self.h = _branch(), _branch(), _branch(8)

    def forward(self, x):
        y = x + self.f(x)
        z = torch.relu(self.f(y)) + torch.relu(self.g(y))
        return self.h(torch.cat([z, y], 1))


def test_remove_skips_on_resnet18_leaves_no_residual_block():
    m = timm.create_model("resnet18").eval()
    x = _x(1, 3, 64, 64)
    gm = netsurgeon.transform(m, ["remove_skips"])
    assert netsurgeon.topology(gm).residual_blocks() == []
    assert not any("downsample" in name for name, _ in gm.named_modules())  # projection shortcuts deleted
    with torch.no_grad():
        assert not torch.allclose(gm.eval()(x), m(x), atol=1e-3)
    changes = _record(gm, "remove_skips").changes
    assert len(changes) == 8
    assert sum("projection shortcut" in c.what for c in changes) == 3
    assert sum("identity shortcut" in c.what for c in changes) == 5


def test_remove_skips_keeps_concat_and_branch_merge_and_says_why():
    m, x = _Mixed().eval(), _x(2, 4, 5, 5)
    gm = netsurgeon.transform(m, ["remove_skips"])
    y = m.f(x)
    z = torch.relu(m.f(y)) + torch.relu(m.g(y))
    torch.testing.assert_close(gm(x), m.h(torch.cat([z, y], 1)))
    rec = _record(gm, "remove_skips")
    assert [c.node for c in rec.changes] == ["add"]
    why = {s.node: s.why for s in rec.skipped}
    assert "concatenation" in why["cat"] and "no identity or projection shortcut" in why["add_1"]


def test_remove_skips_on_three_term_sum_keeps_both_branches():
    m, x = _Three().eval(), _x(2, 4, 5, 5)
    torch.testing.assert_close(netsurgeon.transform(m, ["remove_skips"])(x), m.f(x) + m.g(x))


class BroadcastSum(nn.Module):
    """SAM's decomposed relative-position bias: ``rel_h[..., None] + rel_w[..., None, :]``, a sum whose
    operands broadcast to the output; one of them reads like a shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h[:, :, None] + self.fc2(h)[:, None, :]


def test_remove_skips_leaves_a_broadcasting_sum():
    x = torch.randn(2, 6)
    gm = netsurgeon.transform(BroadcastSum(), ["remove_skips"], example_inputs=(x,))
    assert gm(x).shape == (2, 6, 6)
    skipped = {s.node: s.why for s in _record(gm, "remove_skips").skipped}
    assert any("broadcasts" in why and "not a skip connection" in why for why in skipped.values()), skipped
