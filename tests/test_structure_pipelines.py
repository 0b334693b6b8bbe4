"""Every DKS preparation pass in one pipeline, on resnet18 and other timm models."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.layers import LocationNorm
from netsurgeon.report import Preservation

from conftest import count_batch_norms
from structure_pass_models import _record, _x


_PIPELINES = {
    "remove_skips": ["strip_bn", "remove_skips", "maxpool_to_avgpool", "input_norm", "orthogonal_init"],
    "normalize_sums": ["strip_bn", "normalize_sums", "maxpool_to_avgpool", "input_norm", "orthogonal_init"],
}


@pytest.mark.parametrize("pipeline", list(_PIPELINES))
def test_resnet18_round_trip_through_all_passes(pipeline):
    passes = _PIPELINES[pipeline]
    x = _x(1, 3, 64, 64)
    gm = netsurgeon.transform(timm.create_model("resnet18"), passes, example_inputs=x)
    rep = netsurgeon.report(gm)
    assert [p.name for p in rep.passes] == passes and rep.preservation is Preservation.NONE
    assert count_batch_norms(gm) == 0 and isinstance(gm.get_submodule("input_norm"), LocationNorm)
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in gm.modules())
    blocks = netsurgeon.topology(gm).residual_blocks()
    assert len(blocks) == (8 if pipeline == "normalize_sums" else 0)
    gm.train()
    y_train = gm(x)
    y_train.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters())
    gm.eval()
    with torch.no_grad():
        y_eval = gm(x)
        torch.testing.assert_close(y_train.detach(), y_eval)  # nothing left that depends on the mode
        other = netsurgeon.transform(timm.create_model("resnet18"), passes, example_inputs=x).eval()
        assert not torch.allclose(other(x), y_eval)  # seed None: a different draw
        other.load_state_dict(gm.state_dict())
        assert torch.equal(other(x), y_eval)


@pytest.mark.parametrize("name, kwargs, leaf", [
    ("resnetv2_50", {}, ()), ("regnetx_002", {}, ()), ("convnext_atto", {}, ()),
    # mlp_ratio shrinks the 4096x4096 head conv whose QR alone takes ~7 s on one thread
    ("vgg11_bn", {"mlp_ratio": 0.125}, ("pre_logits",)),
])
def test_zoo_models_pass_through_every_pass(name, kwargs, leaf):
    x = _x(1, 3, 64, 64)
    passes = [("strip_bn", {"mode": "remove"}), "normalize_sums", "remove_skips", "maxpool_to_avgpool", "input_norm",
              ("orthogonal_init", {"seed": 0})]
    gm = netsurgeon.transform(timm.create_model(name, **kwargs), passes, example_inputs=x, leaf_modules=leaf)
    with torch.no_grad():
        assert torch.isfinite(gm.eval()(x)).all()
    for rec in netsurgeon.report(gm).passes:
        assert rec.changes or rec.skipped or rec.notes, rec.name  # never silent
        assert all(s.node and s.why for s in rec.skipped)
    assert netsurgeon.topology(gm).residual_blocks() == []
    assert len(_record(gm, "orthogonal_init").changes) > 10
