"""DKS preparation passes: normalize_sums, remove_skips, maxpool_to_avgpool, input_norm, orthogonal_init."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import StdConv2d, create_pool2d
from timm.layers import Linear as TimmLinear

import netsurgeon
from netsurgeon import PassOptionError
from netsurgeon.graph import op_info
from netsurgeon.layers import ExclusiveAvgPool2dSame, LocationNorm
from netsurgeon.ops import OpKind
from netsurgeon.passes import OrthogonalInit, coerce_option, get_pass
from netsurgeon.report import Preservation

from conftest import count_batch_norms

WS, WR = math.sqrt(0.8), math.sqrt(0.2)


def _record(gm, name):
    return next(p for p in netsurgeon.report(gm).passes if p.name == name)


def _branch(c: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, c, 1))


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- registration and options
def test_passes_registered_with_options_and_cli_coercion():
    assert {"normalize_sums", "remove_skips", "maxpool_to_avgpool", "input_norm", "orthogonal_init"} <= set(
        netsurgeon.list_passes())
    assert get_pass("normalize_sums")().options() == {"shortcut_weight2": 0.8}
    assert get_pass("input_norm")().options() == {"dim": 1, "eps": 1e-6}
    assert get_pass("orthogonal_init")().options() == {"gain": 1.0, "seed": None, "conv": "delta"}
    assert get_pass("remove_skips")().options() == {"reset_layer_scale": True}
    assert get_pass("maxpool_to_avgpool")().options() == {}
    assert coerce_option(get_pass("remove_skips"), "reset_layer_scale", "false") is False
    assert coerce_option(OrthogonalInit, "seed", "none") is None
    assert coerce_option(OrthogonalInit, "seed", "7") == 7
    assert all(get_pass(n).preserves is Preservation.NONE for n in ("normalize_sums", "orthogonal_init"))


def test_bad_options_name_the_parameter_and_range():
    with pytest.raises(PassOptionError, match=r"normalize_sums.shortcut_weight2 must lie in \(0, 1\); got 1.0"):
        netsurgeon.transform(_Scaled(), [("normalize_sums", {"shortcut_weight2": 1.0})])
    with pytest.raises(PassOptionError, match="Did you mean 'shortcut_weight2'"):
        netsurgeon.transform(_Scaled(), [("normalize_sums", {"shortcut_weight": 0.5})])
    with pytest.raises(PassOptionError, match="orthogonal_init.gain must be positive"):
        OrthogonalInit(gain=0.0)


# ---------------------------------------------------------------- normalize_sums
class _Scaled(nn.Module):
    """``x + 0.5 f(x)``: the constant 0.5 is replaced, not multiplied."""

    def __init__(self):
        super().__init__()
        self.f = _branch()

    def forward(self, x):
        return x + 0.5 * self.f(x)


class _Sub(_Scaled):
    def forward(self, x):
        return x - self.f(x)


class _Three(nn.Module):
    """A residual sum of three terms written as a chain of two adds."""

    def __init__(self):
        super().__init__()
        self.f, self.g = _branch(), _branch()

    def forward(self, x):
        return x + self.f(x) + self.g(x)


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
    gm = netsurgeon.transform(m, ["normalize_sums"])
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


# ---------------------------------------------------------------- remove_skips
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


# ---------------------------------------------------------------- maxpool_to_avgpool
def test_maxpool_to_avgpool_on_resnet18_equals_eager_avg_pooling():
    m = timm.create_model("resnet18").eval()
    gm = netsurgeon.transform(m, ["maxpool_to_avgpool"]).eval()
    assert not any("MaxPool" in type(mod).__name__ for mod in gm.modules())
    ref = copy.deepcopy(m)
    ref.maxpool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
    x = _x(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x))
    (change,) = _record(gm, "maxpool_to_avgpool").changes
    assert change.node == "maxpool" and "count_include_pad=False" in change.why


@pytest.mark.parametrize("pool", ["max", "avgmax", "fastmax", "fastavgmax"])
def test_maxpool_to_avgpool_global_pool_variants(pool):
    m = timm.create_model("resnet10t", global_pool=pool).eval()
    gm = netsurgeon.transform(m, ["maxpool_to_avgpool"]).eval()
    netsurgeon.topology(gm)
    assert not any(op_info(n).attrs.get("pool_type") in ("max", "adaptive_max", "max_reduce") for n in gm.graph.nodes)
    ref = timm.create_model("resnet10t", global_pool="avg").eval()
    ref.load_state_dict(m.state_dict())
    ref.maxpool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
    x = _x(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x))


class _Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.same = create_pool2d("max", 3, 2, padding="same")  # timm MaxPool2dSame
        self.dilated = nn.MaxPool2d(3, 1, dilation=2)

    def forward(self, x):
        return F.max_pool2d(x, 3, 2, 1, ceil_mode=True), self.same(x), self.dilated(x)


def test_maxpool_to_avgpool_functional_same_padding_and_dilated_skip():
    m, x = _Pools(), _x(2, 3, 9, 9)
    assert type(m.same).__name__ == "MaxPool2dSame"
    gm = netsurgeon.transform(m, ["maxpool_to_avgpool"])
    a, b, c = gm(x)
    torch.testing.assert_close(a, F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False))
    torch.testing.assert_close(b, F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))  # SAME pads 1 each side here
    torch.testing.assert_close(c, m.dilated(x))
    assert isinstance(gm.same, ExclusiveAvgPool2dSame)
    rec = _record(gm, "maxpool_to_avgpool")
    assert {ch.node for ch in rec.changes} == {"max_pool2d", "same"}
    (skip,) = rec.skipped
    assert skip.node == "dilated" and "dilation" in skip.why


# ---------------------------------------------------------------- input_norm
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


# ---------------------------------------------------------------- orthogonal_init
def _q(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean())


def _assert_scaled_eye(gram: torch.Tensor, scale: float) -> None:
    """``gram == scale · I`` up to float32 rounding of the weights."""
    torch.testing.assert_close(gram, scale * torch.eye(len(gram), dtype=gram.dtype), rtol=0, atol=1e-5 * scale)


def _centre(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 2 else w[(slice(None), slice(None)) + tuple(k // 2 for k in w.shape[2:])]


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(10, 40), (4096, 10)), (nn.Linear(40, 10), (4096, 40)),
    (nn.Conv2d(10, 40, 3, padding=1), (64, 10, 8, 8)), (nn.Conv2d(40, 10, 3, padding=1), (64, 40, 8, 8)),
    (nn.Conv1d(10, 40, 5, padding=2), (64, 10, 16)),
], ids=["linear10to40", "linear40to10", "conv10to40", "conv40to10", "conv1d10to40"])
def test_orthogonal_init_keeps_q_for_non_square_layers(layer, shape):
    """PyTorch layout [out, in, ...]: expanding layers need gain sqrt(out/in) (DeepMind's
    PyTorch helper gets 0.25 for 10 -> 40); contracting ones have orthonormal rows."""
    gm = netsurgeon.transform(nn.Sequential(layer), [("orthogonal_init", {"seed": 0})])
    w = gm.get_submodule("0").weight.detach().double()
    out, inp = w.shape[:2]
    m = _centre(w)
    off_centre = w.clone()
    _centre(off_centre).zero_()
    assert float(off_centre.abs().max()) == 0.0  # delta-orthogonal: only the centre tap is non-zero
    if out > inp:
        _assert_scaled_eye(m.T @ m, out / inp)
    else:
        _assert_scaled_eye(m @ m.T, 1.0)
    assert float(gm.get_submodule("0").bias.detach().abs().max()) == 0.0
    x = _x(*shape)
    with torch.no_grad():
        ratio = _q(gm(x)) / _q(x)
    assert ratio == pytest.approx(1.0, rel=1e-5 if out > inp else 0.05)


def test_orthogonal_init_grouped_depthwise_patchify_and_gain():
    m = nn.Sequential(nn.Conv2d(8, 16, 3, groups=4), nn.Conv2d(16, 16, 3, groups=16),
                      nn.Conv2d(16, 4, 2, stride=2), nn.Linear(6, 6))
    gm = netsurgeon.transform(m, [("orthogonal_init", {"seed": 1, "gain": 2.0})])
    grouped = _centre(gm.get_submodule("0").weight.detach().double())  # [16, 2]: 4 groups of [4, 2]
    for g in range(4):
        b = grouped[4 * g:4 * g + 4]
        _assert_scaled_eye(b.T @ b, 4.0 * 2.0)  # gain² · out/in
    depthwise = _centre(gm.get_submodule("1").weight.detach()).flatten()
    torch.testing.assert_close(depthwise.abs(), torch.full((16,), 2.0))
    patch = gm.get_submodule("2").weight.detach().double().reshape(4, 64)  # kernel 2 = stride: disjoint patches
    _assert_scaled_eye(patch @ patch.T, 4.0)
    lin = gm.get_submodule("3").weight.detach().double()
    _assert_scaled_eye(lin @ lin.T, 4.0)
    assert "patch-orthogonal" in _record(gm, "orthogonal_init").changes[2].what


def test_orthogonal_init_full_window_convs():
    """conv="full": an orthogonal [out/groups, in/groups · prod(kernel)] matrix over the whole
    window (grouped too), q kept in expectation; the analysis calls such convs approximate."""
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=4),
                      nn.Conv2d(16, 200, 3, padding=1))
    gm = netsurgeon.transform(m, [("orthogonal_init", {"seed": 0, "conv": "full"})])
    w0 = gm.get_submodule("0").weight.detach().double().reshape(16, 72)
    _assert_scaled_eye(w0 @ w0.T, 1.0)
    assert float(gm.get_submodule("0").weight.detach()[:, :, 0, 0].abs().max()) > 0  # off-centre taps set
    w1 = gm.get_submodule("1").weight.detach().double().reshape(4, 4, 36)  # 4 groups of [4, 4·9]
    for g in range(4):
        _assert_scaled_eye(w1[g] @ w1[g].T, 1.0)
    w2 = gm.get_submodule("2").weight.detach().double().reshape(200, 144)  # expanding: gain² = 200/144
    _assert_scaled_eye(w2.T @ w2, 200 / 144)
    assert all("full-orthogonal" in c.what for c in _record(gm, "orthogonal_init").changes)
    x = _x(64, 8, 8, 8)
    with torch.no_grad():
        ratio = _q(gm.get_submodule("0")(x)[..., 1:-1, 1:-1]) / _q(x)  # interior: no zero padding in the window
    assert ratio == pytest.approx(1.0, rel=0.05)
    status, reason = netsurgeon.analyze(gm).status("_0")
    assert status == "approximate" and "spatial mixing" in reason


def test_orthogonal_init_skips_by_name_what_it_cannot_init():
    m = nn.Sequential(nn.Conv2d(4, 4, 2), StdConv2d(4, 4, 3), nn.ConvTranspose2d(4, 4, 3), TimmLinear(4, 8))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    gm = netsurgeon.transform(m, ["orthogonal_init"])
    rec = _record(gm, "orthogonal_init")
    why = {s.node: s.why for s in rec.skipped}
    assert "even sides" in why["_0"] and "standardizes its weight" in why["_1"] and "transposed" in why["_2"]
    for key in ("0.weight", "1.weight", "2.weight"):
        assert torch.equal(gm.state_dict()[key], before[key])
    w = gm.state_dict()["3.weight"].double()  # timm's Linear traces to F.linear on a parameter
    _assert_scaled_eye(w.T @ w, 2.0)
    assert any("functional linear" in c.what for c in rec.changes)
    assert rec.notes == ["initialized 1 layer(s), skipped 3; seed None"]


def test_orthogonal_init_seed_is_reproducible_and_caller_model_untouched():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 8))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sd = [netsurgeon.transform(m, [("orthogonal_init", {"seed": s})]).state_dict() for s in (0, 0, 1)]
    assert all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    assert not torch.equal(sd[0]["0.weight"], sd[2]["0.weight"])
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------- pipelines
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
