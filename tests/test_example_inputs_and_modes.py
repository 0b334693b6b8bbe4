"""Example inputs the model cannot take give one clear ExampleInputError, and running a model for
a measurement leaves every submodule's own train/eval flag as it was (frozen batch norms)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon import ExampleInputError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize("call", ["transform", "analyze", "measure", "topology"])
def test_wrong_example_inputs_are_named(call):
    bad = torch.randn(2, 4, 8, 8)  # 4 channels into a 3-channel stem
    run = {"transform": lambda: netsurgeon.transform(_net(), ["strip_bn"], example_inputs=bad),
           "analyze": lambda: netsurgeon.analyze(_net(), bad),
           "measure": lambda: netsurgeon.measure(_net(), bad, bad.flip(0)),
           "topology": lambda: netsurgeon.topology(_net(), (bad,))}[call]
    with pytest.raises(ExampleInputError, match=r"cannot run on the example inputs \(\(2, 4, 8, 8\) float32\).*"
                                                r"RuntimeError.*channels"):
        run()


def test_measurements_keep_each_submodules_mode():
    x = torch.randn(4, 3, 8, 8)
    for call in (lambda m: netsurgeon.analyze(m, x), lambda m: netsurgeon.measure(m, x, x.flip(0)),
                 lambda m: netsurgeon.trace(m, example_inputs=x), lambda m: netsurgeon.topology(m, (x,))):
        model = _net().train()
        model[1].eval()  # a frozen batch norm while the rest trains
        call(model)
        assert model.training and not model[1].training and model[4].training
    model = _net().train()
    model[1].eval()
    gm = netsurgeon.transform(model, [], example_inputs=x)
    assert gm.training and not gm.get_submodule("1").training and gm.get_submodule("4").training
    assert not model[1].training and model[4].training
