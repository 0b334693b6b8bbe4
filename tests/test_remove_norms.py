"""``remove_norms`` (issue 17 §2): per-example norms deleted for normalization-free networks, the
way ``strip_bn(mode="remove")`` deletes batch norms."""
from __future__ import annotations

import pytest
import timm
import timm.layers as tl
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from netsurgeon.errors import PassOptionError
from netsurgeon.graph import Topology
from netsurgeon.ops import OpKind


def _norms(gm: torch.fx.GraphModule) -> list[str]:
    topo = Topology(gm)
    return [n for n in topo.nodes_of(OpKind.NORM)]


def _changes(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    rec = next(p for p in netsurgeon.report(gm).passes if p.name == "remove_norms")
    return [(c.node, c.what) for c in rec.changes]


class _PreLN(nn.Module):
    """Pre-LN residual MLP blocks ``x + fc2(gelu(fc1(ln(x))))`` and a final LayerNorm."""

    def __init__(self, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.lns = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for ln, fc1, fc2 in zip(self.lns, self.fc1, self.fc2):
            x = x + fc2(F.gelu(fc1(ln(x))))
        return self.norm(x)


def test_pre_ln_stack_loses_every_layer_norm():
    model = _PreLN().eval()
    x = torch.randn(2, 5, 32)
    assert len(_norms(netsurgeon.trace(model, x))) == 3
    gm = netsurgeon.transform(model, ["remove_norms"], example_inputs=x)
    assert _norms(gm) == [] and len(_changes(gm)) == 3
    h = x
    for i in range(2):  # the same network without its norms
        h = h + model.fc2[i](F.gelu(model.fc1[i](h)))
    torch.testing.assert_close(gm(x), h)
    assert not any("ln" in k or "norm" in k for k in gm.state_dict())  # gains and biases went with them
    assert any("norm" in k for k in model.state_dict())  # the input model is untouched


def test_vit_keeps_its_attention_and_mlp_and_runs():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = netsurgeon.transform(model, ["remove_norms"], example_inputs=x)
    assert _norms(gm) == [] and len(_changes(gm)) == 2 * 2 + 1
    assert gm(x).shape == model(x).shape


class _Mixed(nn.Module):
    """A functional layer norm, an RMSNorm, a GroupNorm and a LayerNorm+GELU composite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.lna = tl.LayerNormAct2d(8, act_layer=nn.GELU)
        self.fc = nn.Linear(8, 8)
        self.rms = nn.RMSNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lna(self.gn(self.conv(x))).mean((2, 3))
        h = F.layer_norm(self.fc(h), (8,))
        return self.rms(h)


def test_families_choose_what_goes_and_composites_keep_their_activation():
    x = torch.randn(2, 3, 8, 8)
    gm = netsurgeon.transform(_Mixed(), ["remove_norms"], example_inputs=x)
    assert [n for n in _norms(gm)] == ["gn"]  # GroupNorm stays unless asked for
    changed = dict(_changes(gm))
    assert set(changed) == {"lna", "layer_norm", "rms"}
    assert "kept lna.act" in changed["lna"]
    assert isinstance(gm.get_submodule("lna.act"), nn.GELU)
    rec = next(p for p in netsurgeon.report(gm).passes if p.name == "remove_norms")
    assert [s.node for s in rec.skipped] == ["gn"]
    h = F.gelu(gm.get_submodule("gn")(gm.get_submodule("conv")(x))).mean((2, 3))
    torch.testing.assert_close(gm(x), gm.get_submodule("fc")(h))  # nothing normalized after gn
    everything = netsurgeon.transform(_Mixed(), [("remove_norms", {"families": ["layer", "rms", "group"]})],
                                      example_inputs=x)
    assert _norms(everything) == []


@pytest.mark.parametrize("families", [(), ("batch",), "layer", ("layer", 3)])
def test_bad_families_are_refused(families):
    with pytest.raises(PassOptionError, match=r"remove_norms.families must be a non-empty tuple of"):
        netsurgeon.transform(nn.Linear(2, 2), [("remove_norms", {"families": families})])


def test_a_model_without_such_norms_is_noted():
    gm = netsurgeon.transform(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), ["remove_norms"],
                              example_inputs=torch.randn(3, 4))
    rec = next(p for p in netsurgeon.report(gm).passes if p.name == "remove_norms")
    assert not rec.changes and not rec.skipped and "no layer or rms norm" in " ".join(rec.notes)
