"""Bad values users hand over (issue 14): non-bool flags, pass options that cannot apply, NaN/inf
weights and inputs, shape errors printed once, and refusals that name a few nodes, not all."""
from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.cli import main
from netsurgeon.errors import (ExampleInputError, InvalidArgumentError, PassError, PassOptionError, TraceError,
                               UnsupportedNodeError)
from netsurgeon.passes import get_pass

SHAPE = (1, 3, 32, 32)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t")


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netsurgeon: error: "), err
    return lines[0]


# ---------------------------------------------------------------- A: flags must be bools
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, np.bool_(True)])
def test_transform_inplace_must_be_a_bool_and_the_model_is_left_alone(value):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match=rf"transform: inplace must be True or False; got "
                                                   rf"{re.escape(repr(value))}"):
        netsurgeon.transform(m, ["strip_bn"], inplace=value)
    assert isinstance(m[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_analyze_local_measure_must_be_a_bool():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    with pytest.raises(InvalidArgumentError, match=r"analyze: local_measure must be True or False; got 'yes'"):
        netsurgeon.analyze(mlp, local_measure="yes")


# ---------------------------------------------------------------- B: options that cannot apply
def test_input_norm_dim_beyond_the_example_input_is_an_option_error():
    m = _resnet()
    with pytest.raises(PassOptionError) as err:
        netsurgeon.transform(m, [("input_norm", {"dim": 7})], example_inputs=(torch.randn(SHAPE),))
    msg = str(err.value)
    assert "input_norm.dim=7" in msg and "(1, 3, 32, 32)" in msg and "[-4, 3]" in msg and "\n" not in msg
    gm = netsurgeon.transform(m, [("input_norm", {"dim": -4})], example_inputs=(torch.randn(SHAPE),))
    assert gm.get_submodule("input_norm").dim == -4  # the edges of the range still apply


def test_input_norm_dim_is_checked_against_the_default_input_shape_without_examples():
    with pytest.raises(PassOptionError, match=r"input_norm.dim=4 .* default input shape \(1, 3, \d+, \d+\)"):
        netsurgeon.transform(_resnet(), [("input_norm", {"dim": 4})])


def test_cli_input_norm_dim_beyond_the_input_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "x"
    rc = main(["convert", "resnet10t", "--passes", "input_norm", "--set", "input_norm.dim=7", "--input-shape",
               "1,3,32,32", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 2 and not out.exists()
    line = _one_error_line(captured.err)
    assert "input_norm.dim=7" in line and "(1, 3, 32, 32)" in line


def test_tat_notes_an_option_it_cannot_use():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    gm = netsurgeon.transform(net, [("tat", {"eta": 0.3, "tau": 0.5})])
    notes = netsurgeon.report(gm).passes[-1].notes
    assert any(n.startswith("tau = 0.5 unused") for n in notes), notes


# ---------------------------------------------------------------- C: NaN/inf named, not "control flow"
def test_nan_and_inf_weights_are_named_by_state_dict_name():
    m = _resnet()
    with torch.no_grad():
        m.conv1[0].weight[0, 0, 0, 0] = float("nan")
        m.fc.bias[:3] = float("inf")
        m.bn1.running_var[2] = float("nan")
    with pytest.raises(InvalidArgumentError) as err:
        netsurgeon.transform(m, ["strip_bn"], example_inputs=(torch.randn(SHAPE),))
    msg = str(err.value)
    assert "control flow" not in msg and "\n" not in msg
    assert "3 parameter/buffer tensor(s)" in msg
    for part in ("conv1.0.weight (1 NaN)", "fc.bias (3 inf)", "bn1.running_var (1 NaN)"):
        assert part in msg


def test_many_non_finite_weights_are_shortened():
    m = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
    with torch.no_grad():
        for layer in m:
            layer.weight.fill_(float("nan"))
    with pytest.raises(InvalidArgumentError, match=r"8 parameter/buffer tensor\(s\): 0.weight \(16 NaN\), .*"
                                                   r"4.weight \(16 NaN\) and 3 more;"):
        netsurgeon.trace(m, torch.randn(2, 4))


def test_nan_example_input_is_an_example_input_error():
    x = torch.randn(SHAPE)
    x[0, 0, :2, :2] = float("nan")
    x[0, 1, 0, 0] = float("-inf")
    with pytest.raises(ExampleInputError, match=r"input 0 of shape \(1, 3, 32, 32\) \(4 NaN, 1 inf\)"):
        netsurgeon.transform(_resnet(), ["strip_bn"], example_inputs=(x,))


class _Masked(nn.Module):
    """Attention-style: a -inf mask buffer is a legitimate non-finite value."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("mask", torch.triu(torch.full((4, 4), float("-inf")), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.lin(x) + self.mask, dim=-1)


class _Overflow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x) * 1e30
        return h * h * (torch.rand_like(h) - 0.5)  # +-inf, with a random sign in each run


def test_inf_mask_buffers_and_nan_outputs_at_the_same_places_trace_fine():
    x, m = torch.randn(2, 4, 4), _Masked()
    torch.testing.assert_close(netsurgeon.trace(m, x)(x), m(x))

    class InfMinusInf(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(x * 1e3) - torch.exp(x * 1e3)  # NaN where x > 0.09: in both runs alike

    netsurgeon.trace(InfMinusInf(), torch.randn(8))


def test_outputs_that_overflow_differently_are_not_called_control_flow():
    torch.manual_seed(0)
    with pytest.raises(ExampleInputError, match=r"gives NaN or inf on the example inputs .* overflows"):
        netsurgeon.trace(_Overflow(), torch.randn(16, 4))


# ---------------------------------------------------------------- D: one line, no torch traceback
def test_inspect_with_a_bad_shape_prints_only_the_error_line(capfd):
    assert main(["inspect", "resnet10t", "--input-shape", "1,3,32", "--quiet"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and "Traceback" not in err
    assert "cannot run on the example inputs ((1, 3, 32) float32)" in _one_error_line(err)


def test_shape_propagation_inside_a_pass_prints_nothing(capfd):
    gm = netsurgeon.trace(_resnet())
    with pytest.raises(PassError, match=r"cannot run on the example inputs \(\(1, 3, 32\) float32\)"):
        get_pass("strip_bn")()(gm, (torch.randn(1, 3, 32),))
    assert capfd.readouterr() == ("", "")


# ---------------------------------------------------------------- E: few nodes in the message, all in .nodes
def _names_in(msg: str, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", msg)]


def test_refusal_names_a_few_nodes_and_keeps_all_of_them():
    with pytest.raises(PassError) as err:
        netsurgeon.transform(_resnet(), ["tat", "strip_bn"], example_inputs=(torch.randn(SHAPE),))
    exc, msg = err.value, str(err.value)
    cause = exc.__cause__
    assert isinstance(cause, UnsupportedNodeError)
    assert "\n" not in msg and "tat cannot handle 15 node(s)" in msg
    assert len(exc.nodes) == 15 and exc.nodes == cause.nodes and exc.details == cause.details
    assert len(_names_in(msg, exc.nodes)) <= 5 and "and 10 more" in msg
    assert "maxpool" in exc.nodes and "run maxpool_to_avgpool first" in msg  # every distinct reason shown
    assert len(exc.details) == 15 and all(d.startswith(f"{n}: ") for n, d in zip(exc.nodes, exc.details))


def test_cli_refusal_is_one_line(tmp_path, capsys):
    assert main(["convert", "resnet10t", "--passes", "tat,strip_bn", "--input-shape", "1,3,32,32", "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "and 10 more" in line


def test_batch_norm_refusal_of_fixup_lists_a_few():
    with pytest.raises(PassError) as err:
        netsurgeon.transform(_resnet(), [("identity_residual", {"mode": "fixup"})])
    assert len(err.value.nodes) == 14 and "bn1" in err.value.nodes
    assert len(_names_in(str(err.value), err.value.nodes)) == 5 and "and 9 more" in str(err.value)


def test_analysis_without_maps_lists_a_few():
    class Gates(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(7))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for lin in self.ls:
                h = lin(x)
                x = h * torch.sigmoid(h)
            return x

    with pytest.raises(UnsupportedNodeError, match=r"7 node\(s\) have no kernel map: mul, .* and 2 more") as err:
        netsurgeon.analyze(Gates())
    assert len(err.value.nodes) == 7


def test_problem_list_caps_names_and_keeps_every_reason_up_to_the_limit():
    from netsurgeon._validate import problem_list, short_list

    problems = [(f"bn{i}", "batch norm") for i in range(10)] + [("pool", "max pooling")]
    assert problem_list(problems, limit=5) == "bn0, bn1, bn2, bn3 and 6 more: batch norm; pool: max pooling"
    many = [(f"n{i}", f"reason {i}") for i in range(7)]
    assert problem_list(many, limit=3) == ("n0: reason 0; n1: reason 1; n2: reason 2; and 4 more node(s) for 4 "
                                           "other reason(s)")
    assert short_list(["a", "b"], limit=5) == "a, b"
