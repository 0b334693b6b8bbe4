"""Small user errors get the project's error classes with a message naming what was wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.errors import InvalidArgumentError, ModelSpecError, TraceError, UnknownNodeError
from netsurgeon.models import create_model


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def test_analysis_inputs_and_node_names_are_checked():
    a = netsurgeon.analyze(_mlp())
    with pytest.raises(UnknownNodeError, match="no analysis for node 'nope'; analysed nodes: input"):
        a.cmap("nope")
    for kw in ({"q_in": 0.0}, {"q_in": -1.0}, {"q_in": float("inf")}, {"c_in": 1.5}):
        with pytest.raises(InvalidArgumentError, match="q_in > 0"):
            netsurgeon.analyze(_mlp(), **kw)


def test_factory_with_bad_arguments_is_a_model_spec_error():
    with pytest.raises(ModelSpecError, match=r"'torch.nn:Linear' failed with the arguments \{'bogus': 1\}"):
        create_model("torch.nn:Linear", bogus=1)


class _Flag(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, double=False):
        y = self.lin(x)
        return 2 * y if double else y


def test_concrete_args_reach_the_tracer_through_transform():
    m = _Flag()
    with pytest.raises(TraceError, match=r"concrete_args=\{\.\.\.\} \(netsurgeon.trace or transform\)"):
        netsurgeon.transform(m, [])
    gm = netsurgeon.transform(m, [], concrete_args={"double": True})
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x, True), m(x, True))


def test_a_pickled_module_says_why_its_report_is_gone():
    import io

    from netsurgeon.errors import MissingAnalysisError

    gm = netsurgeon.transform(_mlp(), ["orthogonal_init"])
    assert netsurgeon.report(gm).passes
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with pytest.raises(MissingAnalysisError, match="torch.save/torch.load.*netsurgeon.load"):
        netsurgeon.report(loaded)


def test_public_helpers_raise_the_projects_errors():
    from netsurgeon.errors import NetsurgeonError
    from netsurgeon.kernels import get_activation
    from netsurgeon.layers import FarkasLayer

    x = torch.randn(4, 8)
    calls = [lambda: netsurgeon.measure(_mlp(), x, x[:2]),
             lambda: netsurgeon.topology(_mlp()).info("nope"),
             lambda: netsurgeon.measure(_mlp(), x, x.flip(0))["nope"],
             lambda: get_activation("nope"),
             lambda: get_activation(3),
             lambda: FarkasLayer(nn.Linear(4, 4), agg="max")]
    for call in calls:
        with pytest.raises(NetsurgeonError):
            call()
