"""LayerwiseLM option checks: every option's range, the project's error class, and a clear
error (not torch's LinAlgError) when ``damping=0`` meets a singular input covariance."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from netsurgeon.errors import InvalidArgumentError, NetsurgeonError
from netsurgeon.optim import LayerwiseLM


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _steps(net: nn.Module, opt: LayerwiseLM, rows: int, n: int = 2) -> None:
    x = torch.randn(rows, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("option, value, allowed", [
    ("lr", -1, "[0, inf)"),
    ("lr", math.nan, "[0, inf)"),
    ("lr", math.inf, "[0, inf)"),
    ("lr", "x", "[0, inf)"),
    ("momentum", 1.5, "[0, 1)"),
    ("momentum", 1.0, "[0, 1)"),
    ("momentum", -0.1, "[0, 1)"),
    ("damping", -1.0, "[0, inf)"),
    ("ema", 2.0, "[0, 1)"),
    ("ema", -0.5, "[0, 1)"),
    ("update_every", 0, "integer in [1, inf)"),
    ("update_every", 2.5, "integer in [1, inf)"),
    ("subsample", 0, "(0, 1]"),
    ("subsample", 1.5, "(0, 1]"),
    ("chunk_size", 0, "integer in [1, inf)"),
    ("chunk_size", True, "integer in [1, inf)"),
    ("weight_decay", -1e-4, "[0, inf)"),
    ("seed", 1.5, "an integer"),
])
def test_bad_options_name_the_option_its_value_and_its_range(option, value, allowed):
    with pytest.raises(InvalidArgumentError) as info:
        LayerwiseLM(_net(), **{option: value})
    msg = str(info.value)
    assert f"{option}={value!r}" in msg and allowed in msg, msg
    assert isinstance(info.value, NetsurgeonError) and isinstance(info.value, ValueError)


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(InvalidArgumentError, match="model must be an nn.Module"):
        LayerwiseLM([nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("kw", [dict(lr=0.0, momentum=0.0, ema=0.0, damping=0.0, weight_decay=0.0),
                                dict(momentum=0.99, ema=0.999, subsample=1.0, chunk_size=1, update_every=1)])
def test_boundary_values_are_accepted(kw):
    net = _net()
    _steps(net, LayerwiseLM(net, **kw), rows=64)
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_zero_damping_with_too_few_rows_is_a_clear_error(chunk_size):
    net = _net()
    opt = LayerwiseLM(net, damping=0.0, chunk_size=chunk_size)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(InvalidArgumentError) as info:
        _steps(net, opt, rows=4)  # 4 rows, 8 and 16 input units: A has rank 4
    msg = str(info.value)
    assert "singular" in msg and "damping=0.0" in msg and "damping > 0" in msg and "layer '" in msg, msg
    assert not isinstance(info.value, torch.linalg.LinAlgError)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # no parameter moved, none of them
    assert not any("momentum_buffer" in st for st in opt.state.values()) and not opt._batch


def test_zero_damping_with_enough_rows_still_works():
    net = _net()
    _steps(net, LayerwiseLM(net, damping=0.0, lr=1e-3), rows=256)
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("chunk", [None, 4])
def test_state_dict_into_a_fresh_optimizer_takes_the_same_next_step(chunk):
    """Loading in memory must not alias the source's statistics (torch's Adam does: both
    optimizers would then update one shared tensor in place)."""
    import copy

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), torch.randn(64, 8)
    opt = LayerwiseLM(model, lr=0.05, chunk_size=chunk)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    twin = copy.deepcopy(model)
    opt2 = LayerwiseLM(twin, lr=0.05, chunk_size=chunk)
    opt2.load_state_dict(opt.state_dict())
    for o, m in ((opt, model), (opt2, twin)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
