"""The ``input_norm`` pass: a per-location norm on every tensor input, which the analysis maps to q = 1."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.layers import LocationNorm
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


def test_token_models_are_normalized_where_their_signal_starts():
    """Token ids have no scale: the norm goes after the embedding lookup and what is added to it
    (positions, token types, dropout), over the features, with eps relative to their mean square."""
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.typ = nn.Embedding(50, 16), nn.Embedding(2, 16)
            nn.init.normal_(self.tok.weight, std=0.02)  # GPT-2's scale: q = 4e-4
            self.pos = nn.Parameter(torch.randn(1, 8, 16) * 0.02)
            self.drop, self.fc = nn.Dropout(0.1), nn.Linear(16, 16)
            self.register_buffer("types", torch.zeros(1, 8, dtype=torch.long))  # BERT's default token types

        def forward(self, ids):
            x = self.tok(ids) + self.typ(self.types) + self.pos
            return self.fc(self.drop(x))

    model = LM().eval()
    ids = torch.randint(0, 50, (3, 8))
    gm = netsurgeon.transform(model, ["input_norm"], example_inputs=(ids,)).eval()
    norms = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LocationNorm)]
    assert len(norms) == 1 and norms[0].args[0].target == "drop"  # after the sum and its dropout
    captured = {}
    gm.get_submodule(norms[0].target).register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    gm(ids)
    q = captured["x"].pow(2).mean(-1)
    assert torch.allclose(q, torch.ones_like(q), atol=1e-4)  # q = 1 at every token despite the 0.02 scale
    rec = netsurgeon.report(gm).passes[-1]
    assert "after the token embeddings" in rec.changes[0].what and rec.skipped[0].node == "ids"
