"""Pass options: type checks from the hints (PEP 604 unions included), range checks,
command-line coercion, and the ``passes`` argument of ``transform``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import netsurgeon
import netsurgeon.pipeline
from netsurgeon.cli import _parse_passes
from netsurgeon.errors import InvalidArgumentError, PassOptionError
from netsurgeon.passes import coerce_option, get_pass, make_pass


class _Residual(nn.Module):
    """A stem and one residual block, no batch norm (what fixup needs)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def _no_trace(*args, **kwargs):
    raise AssertionError("traced although a pass spec is bad")


@pytest.mark.parametrize("name, option, value, expected", [
    ("orthogonal_init", "gain", "x", "a float (or an int)"),
    ("normalize_sums", "shortcut_weight2", "x", "a float (or an int)"),
    ("tat", "eta", "0.9", "a float (or an int)"),
    ("dks", "zeta", "abc", "a float (or an int)"),
    ("input_norm", "eps", True, "a float (or an int)"),  # a bool is no number
    ("input_norm", "dim", 1.0, "an int"),
    ("remove_skips", "reset_layer_scale", "no", "a bool (True or False)"),  # not truthy
    ("remove_skips", "reset_layer_scale", 1, "a bool (True or False)"),
    ("identity_residual", "seed", "3", "an int or None"),  # int | None
    ("orthogonal_init", "seed", False, "an int or None"),  # Optional[int]
    ("strip_bn", "mode", 1, "one of 'fold', 'remove'"),
])
def test_wrong_type_fails_before_tracing_naming_pass_option_value(monkeypatch, name, option, value, expected):
    monkeypatch.setattr(netsurgeon.pipeline, "trace", _no_trace)
    with pytest.raises(PassOptionError) as err:
        netsurgeon.transform(nn.Identity(), [(name, {option: value})])
    msg = str(err.value)
    assert f"{name}.{option} must be {expected}" in msg and f"got {value!r} of type {type(value).__name__}" in msg


@pytest.mark.parametrize("name, option, value, expected", [
    ("rms_norm", "momentum", 5.0, "lie in [0, 1]"),
    ("rms_norm", "momentum", -0.1, "lie in [0, 1]"),
    ("rms_norm", "momentum", math.nan, "lie in [0, 1]"),
    ("input_norm", "eps", 0.0, "be positive and finite"),
    ("input_norm", "eps", -1.0, "be positive and finite"),
    ("input_norm", "eps", math.inf, "be positive and finite"),
    ("orthogonal_init", "gain", 0, "be positive and finite"),
    ("orthogonal_init", "gain", -1.0, "be positive and finite"),
    ("orthogonal_init", "seed", 2**64, "be None or an int in [-2**63, 2**64)"),
    ("normalize_sums", "shortcut_weight2", 0.0, "lie in (0, 1)"),
    ("normalize_sums", "shortcut_weight2", 1, "lie in (0, 1)"),
    ("identity_residual", "seed", -2**63 - 1, "be None or an int in [-2**63, 2**64)"),
])
def test_out_of_range_fails_before_tracing_naming_pass_option_value(monkeypatch, name, option, value, expected):
    monkeypatch.setattr(netsurgeon.pipeline, "trace", _no_trace)
    with pytest.raises(PassOptionError) as err:
        netsurgeon.transform(nn.Identity(), [(name, {option: value})])
    assert str(err.value) == f"{name}.{option} must {expected}; got {value!r}"


@pytest.mark.parametrize("name, option, value", [
    ("rms_norm", "momentum", 0.0), ("rms_norm", "momentum", 1), ("input_norm", "eps", 1e-3),
    ("input_norm", "dim", -1), ("orthogonal_init", "gain", 2), ("orthogonal_init", "seed", np.int64(5)),
    ("identity_residual", "seed", None), ("identity_residual", "seed", -1), ("identity_residual", "seed", 2**64 - 1),
    ("normalize_sums", "shortcut_weight2", 0.5), ("remove_skips", "reset_layer_scale", False),
    ("tat", "eta", 0.5), ("strip_bn", "mode", "remove"),
])
def test_valid_values_are_kept(name, option, value):
    assert make_pass((name, {option: value})).options()[option] is value


def test_options_set_after_construction_are_checked_by_transform():
    p = get_pass("rms_norm")()
    p.momentum = 5.0
    with pytest.raises(PassOptionError, match=r"rms_norm.momentum must lie in \[0, 1\]; got 5.0"):
        netsurgeon.transform(nn.Identity(), [p])


def test_rms_norm_momentum_one_keeps_a_positive_running_rms():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    gm = netsurgeon.transform(m, [("rms_norm", {"momentum": 1.0})]).train()
    gm(torch.randn(4, 3, 8, 8) * 10)
    gm(torch.randn(4, 3, 8, 8))
    (rms,) = [b for n, b in gm.named_buffers() if n.endswith("running_rms")]
    assert 0 < float(rms) < 5  # the last batch's RMS alone


@pytest.mark.parametrize("cls_name", ["identity_residual", "orthogonal_init"])  # int | None and Optional[int]
def test_coerce_option_converts_optional_ints(cls_name):
    cls = get_pass(cls_name)
    assert type(coerce_option(cls, "seed", "3")) is int and coerce_option(cls, "seed", "3") == 3
    assert coerce_option(cls, "seed", "none") is None and coerce_option(cls, "seed", "NULL") is None
    with pytest.raises(PassOptionError, match=rf"bad value 'abc' for {cls_name}.seed: expected an int or none"):
        coerce_option(cls, "seed", "abc")


def test_coerce_option_bools_floats_and_choices():
    skips, sums, strip = get_pass("remove_skips"), get_pass("normalize_sums"), get_pass("strip_bn")
    assert coerce_option(skips, "reset_layer_scale", "no") is False
    assert coerce_option(skips, "reset_layer_scale", "1") is True
    with pytest.raises(PassOptionError, match=r"bad value 'maybe' for remove_skips.reset_layer_scale: expected true or false"):
        coerce_option(skips, "reset_layer_scale", "maybe")
    assert coerce_option(sums, "shortcut_weight2", "0.5") == 0.5
    with pytest.raises(PassOptionError, match=r"bad value 'x' for normalize_sums.shortcut_weight2: expected a float"):
        coerce_option(sums, "shortcut_weight2", "x")
    assert coerce_option(strip, "mode", "remove") == "remove"
    with pytest.raises(PassOptionError, match=r"bad value 'squash' for strip_bn.mode: expected one of fold, remove"):
        coerce_option(strip, "mode", "squash")


def test_cli_set_seed_reaches_the_pass_as_an_int_or_none():
    sets = ["identity_residual.mode=fixup", "identity_residual.seed=3"]
    specs = _parse_passes("identity_residual", sets)
    assert specs == [("identity_residual", {"mode": "fixup", "seed": 3})] and type(specs[0][1]["seed"]) is int
    m = _Residual()
    runs = [netsurgeon.transform(m, s) for s in (specs, specs, _parse_passes("identity_residual", sets[:1]))]
    assert netsurgeon.report(runs[0]).passes[0].options == {"mode": "fixup", "seed": 3}
    first, again, unseeded = (r.state_dict() for r in runs)
    assert all(torch.equal(v, again[k]) for k, v in first.items())  # seed 3: the same re-initialization
    assert not all(torch.equal(v, unseeded[k]) for k, v in first.items())
    (spec,) = _parse_passes("identity_residual", ["identity_residual.seed=none"])
    assert make_pass(spec).seed is None
    with pytest.raises(PassOptionError, match=r"rms_norm.momentum must lie in \[0, 1\]; got 2.0"):
        make_pass(_parse_passes("rms_norm", ["rms_norm.momentum=2"])[0])


@pytest.mark.parametrize("passes", [None, 5, {"strip_bn": {}}])
def test_transform_rejects_passes_that_are_not_a_list(passes):
    with pytest.raises(InvalidArgumentError) as err:
        netsurgeon.transform(nn.Identity(), passes)
    msg = str(err.value)
    assert msg.startswith("passes must be a list of pass names, (name, {options}) pairs") and f"got {passes!r}" in msg
