"""DKS/TAT correctness found next to DeepMind's dks (issue 16 §5): the leaky ReLU's slope is solved
and every DKS condition holds; of several solutions the tame one closest to φ is kept; refusals
name the real cause and a remedy that has not run; farkas names a hard-coded reshape up front."""
from __future__ import annotations

import math
import operator
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from netsurgeon.analysis.targets import IdealGraph
from netsurgeon.errors import PassError, TransformError
from netsurgeon.graph import Topology
from netsurgeon.kernels import LocalMaps, get_activation
from netsurgeon.kernels.transforms import (Transform, _choose, leaky_dks_slope, peak_ratio, solve_dks, solve_dks_leaky,
                                           solve_tat, transformed)
from netsurgeon.layers import FarkasLayer
from netsurgeon.ops import OpKind

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def chain(n: int, act: type[nn.Module] | nn.Module, width: int = 32) -> nn.Sequential:
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(width, width), act() if isinstance(act, type)
                                                         else act)])


def shaped_maps(gm: torch.fx.GraphModule) -> dict[str, tuple[object, LocalMaps]]:
    topo = Topology(gm)
    out = {}
    for name in topo.nodes_of(OpKind.ACTIVATION):
        spec = topo.info(name).activation
        assert spec.transform is not None, f"{name} was not reshaped"
        out[name] = (spec, LocalMaps(transformed(get_activation(spec.name, **dict(spec.params)), *spec.transform)))
    return out


# ---------------------------------------------------------------- 1. leaky ReLU under DKS
@pytest.mark.parametrize("xi", [1.0081422716, 1.0622273684, 1.2, 1.4669, 1.5, 2.0, 2.7])
def test_leaky_relu_dks_meets_every_condition(xi):
    a, t = solve_dks_leaky(xi)
    assert -1.0 < a < 1.0 and t.beta == 0.0 and t.alpha == 1.0
    assert leaky_dks_slope(a) == pytest.approx(xi, rel=1e-12)
    m = LocalMaps(transformed(get_activation("leaky_relu", negative_slope=a), *t))
    assert (m.q1, m.q_slope_1(), m.c_slope_1(), m.c0()) == pytest.approx((1.0, 1.0, xi, 0.0), abs=1e-8)


def test_leaky_relu_dks_matches_deepminds_point():
    """dks' own test: negative_slope 0.8761257, input_shift 0, output_shift -0.0494187, output_scale 1.0651833."""
    a = 0.8761257073473065
    slope, t = solve_dks_leaky(leaky_dks_slope(a))
    assert slope == pytest.approx(a, abs=1e-12)
    assert (t.beta, t.delta, t.gamma) == pytest.approx((0.0, -0.049418692997275034, 1.0651832705682147), abs=1e-9)


def test_leaky_relu_beyond_its_reach_is_refused():
    with pytest.raises(TransformError, match=r"pi/\(pi - 2\)"):
        solve_dks_leaky(3.0)


class _Leaky(nn.Module):
    """Leaky ReLU as a module, a function with and without a slope, and a PReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.ls = nn.ModuleList([nn.Linear(32, 32) for _ in range(8)])
        self.act, self.prelu = nn.LeakyReLU(), nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.ls):
            x = layer(x)
            x = (self.act(x), F.leaky_relu(x, 0.2), self.prelu(x), F.leaky_relu(x))[i % 4]
        return x


def test_dks_pass_solves_the_leaky_slope_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot reach Q'(1) = 1" any more
        gm = netsurgeon.transform(_Leaky(), passes=["orthogonal_init", ("dks", {"zeta": 1.5})])
    xi = gm.meta["netsurgeon"]["dks"]["xi"]
    maps = shaped_maps(gm)
    assert len(maps) == 8
    for name, (spec, m) in maps.items():
        assert spec.name in ("leaky_relu", "prelu") and dict(spec.params)["negative_slope"] != pytest.approx(0.01)
        assert (m.q1, m.q_slope_1(), m.c_slope_1(), m.c0()) == pytest.approx((1.0, 1.0, xi, 0.0), abs=1e-6), name
    slopes = {n: m.c_slope_1() for n, (_, m) in maps.items()}
    assert IdealGraph(Topology(gm)).max_over_subnetworks(lambda n, v: slopes[n] * v, 1.0)[0] == pytest.approx(1.5)
    assert netsurgeon.analyze(gm).c_slope_1("output") == pytest.approx(1.5, rel=1e-4)  # the engine agrees


def test_relu_keeps_its_warning_and_slope():
    with pytest.warns(UserWarning, match=r"(?s)relu:.*prefer the tat pass"):
        gm = netsurgeon.transform(chain(6, nn.ReLU), passes=["dks"])
    assert all(spec.name == "relu" for spec, _ in shaped_maps(gm).values())


# ---------------------------------------------------------------- 2. several solutions
def _check_tame(act_name: str, t: Transform, c_slope: float) -> None:
    act = get_activation(act_name)
    assert peak_ratio(act, t, c_slope) < 2.0
    m = LocalMaps(transformed(act, *t))
    assert (m.q1, m.q_slope_1(), m.c_slope_1()) == pytest.approx((1.0, 1.0, c_slope), abs=1e-7)


def test_choice_rule_prefers_tame_then_closest():
    """The rule of docs/theory.md §4.2 on candidates: a tame solution beats a closer untame one; among
    tame ones the closest to (1, 0, 1, 0) wins; with none tame, the closest."""
    act = get_activation("softplus")  # sup φ' = 1: the ratio is α·γ under TAT
    untame_close = Transform(0.9, 0.1, 4.0, -0.1)  # α·γ = 3.6
    tame_far, tame_near = Transform(0.5, 1.0, 3.0, -1.5), Transform(0.8, 0.5, 2.0, -0.9)
    assert _choose(act, [untame_close, tame_far], 1.0) == tame_far
    assert _choose(act, [tame_far, untame_close, tame_near], 1.0) == tame_near
    assert _choose(act, [untame_close, Transform(0.2, -2.0, 30.0, 0.5)], 1.0) == untame_close


@pytest.mark.parametrize("kappa", [0.1, 0.006])
def test_tat_softplus_keeps_the_tame_branch(kappa):
    """A second branch (β ≈ -1.3, α·γ ≈ 4.4–5) meets the conditions too; dks' filter rejects it."""
    t = solve_tat(get_activation("softplus"), kappa)
    assert t.alpha * t.gamma < 2.0 and t.beta > 0  # dks' softplus TAT solution has input_shift 0.537
    _check_tame("softplus", t, 1.0)
    assert LocalMaps(transformed(get_activation("softplus"), *t)).c_curv_1() == pytest.approx(kappa, abs=1e-7)


@pytest.mark.parametrize("kappa", [0.3, 0.006])
def test_tat_sigmoid_keeps_the_tanh_like_branch(kappa):
    """sigmoid = (1 + tanh(x/2))/2: the branch tanh takes has α·γ four times tanh's, ≈ 5.2–6.5 (α·γ < 2 is
    impossible with φ' ≤ 1/4); the other branch (α·γ ≈ 10.9–13.6) puts the Gaussian on a tail."""
    act = get_activation("sigmoid")
    t = solve_tat(act, kappa)
    assert t.alpha * t.gamma / 4 < 2.0
    _check_tame("sigmoid", t, 1.0)
    tanh = solve_tat(get_activation("tanh"), kappa)  # the same function: α = 2 α_tanh, γ = 2 γ_tanh
    assert (t.alpha, t.gamma, abs(t.beta)) == pytest.approx((2 * tanh.alpha, 2 * tanh.gamma, 2 * abs(tanh.beta)),
                                                            rel=1e-6)


def test_mirror_images_are_resolved_by_the_rule():
    """tanh's two mirror solutions tie; the larger β is kept, whichever the search met first."""
    for xi in (1.01, 1.02, 1.08, 1.1):
        assert solve_dks(get_activation("tanh"), xi).beta > 0


class _ResBlock(nn.Module):
    def __init__(self, act: type[nn.Module], width: int = 32) -> None:
        super().__init__()
        self.l1, self.a, self.l2 = nn.Linear(width, width), act(), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.l2(self.a(self.l1(x)))


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus, nn.Sigmoid])
@pytest.mark.parametrize("final", ["dks", "tat"])
def test_residual_net_gets_tame_solutions(act, final):
    net = nn.Sequential(*[_ResBlock(act) for _ in range(6)], act())
    gm = netsurgeon.transform(net, passes=["normalize_sums", "orthogonal_init", final])
    d = gm.meta["netsurgeon"][final]
    c_slope = d["xi"] if final == "dks" else 1.0
    for spec, m in shaped_maps(gm).values():
        t = Transform(*spec.transform)
        assert peak_ratio(get_activation(spec.name), t, c_slope) < 2.0
        assert t.alpha * t.gamma < (8.0 if act is nn.Sigmoid else 2.0)  # dks' α·γ < 2 (sigmoid: slope ≤ 1/4)
        assert (m.q1, m.q_slope_1(), m.c_slope_1()) == pytest.approx((1.0, 1.0, c_slope), abs=1e-6)


# ---------------------------------------------------------------- 3. refusals name the real cause
def _pipeline(middle) -> list:
    return [("strip_bn", {"mode": "remove"}), *middle, "maxpool_to_avgpool", "input_norm",
            ("orthogonal_init", {"seed": 0}), ("tat", {"unreachable": "refuse"})]


def _outcome(name: str, middle: list) -> str | None:
    """None when the pipeline completes, else the refusal's text."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gm = netsurgeon.transform(timm.create_model(name), passes=_pipeline(middle), example_inputs=X64)
        except PassError as exc:
            return str(exc)
    assert torch.isfinite(gm(X64)).all()
    return None


@pytest.mark.parametrize("name", ["resnest14d", "skresnet18"])
def test_split_attention_sum_is_not_sent_to_maxpool_to_avgpool(name):
    """x.sum(dim=1) over radix groups / stacked paths: a sum of uncorrelated terms (q × n) that
    normalize_sums now weights by 1/sqrt(n); with remove_skips alone the refusal names that sum and
    normalize_sums, which did not run, and that remedy works."""
    msg = _outcome(name, ["normalize_sums"])
    assert msg is not None and "maxpool_to_avgpool first" not in msg and "normalize_sums" not in msg.split("): ")[1]
    assert "eta = 0.9 is unreachable" in msg  # the refusal left is a true one, naming a value that works
    msg = _outcome(name, ["remove_skips"])
    assert msg is not None and "maxpool_to_avgpool first" not in msg
    assert "the sum over dim 1 at sum_2 adds 2 uncorrelated terms" in msg and "run normalize_sums" in msg
    if name == "skresnet18":
        assert _outcome(name, ["remove_skips", "normalize_sums"]) is None


def test_selective_kernel_resnext_completes():
    """The reported case: skresnext50_32x4d's sum over its stacked paths was sent to maxpool_to_avgpool."""
    assert _outcome("skresnext50_32x4d", ["normalize_sums"]) is None


class _Paths(nn.Module):
    """Selective-kernel-like: two paths stacked and summed over the stacking dim."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 16, 1), nn.Tanh()
        self.p1, self.p2, self.out = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(self.stem(x))
        return self.out(torch.stack([self.p1(h), self.p2(h)], dim=1).sum(dim=1))


def test_normalize_sums_weights_a_sum_over_stacked_paths_once():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(PassError, match=r"sum over dim 1 at sum_1 adds 2 uncorrelated terms .*run normalize_sums"):
        netsurgeon.transform(_Paths(), passes=["dks"], example_inputs=x)
    gm = netsurgeon.transform(_Paths(), passes=["normalize_sums", "normalize_sums", "orthogonal_init", "dks"],
                              example_inputs=x)
    factors = [n for n in gm.graph.nodes if n.target is operator.mul and n.args[1] == pytest.approx(2 ** -0.5)]
    assert len(factors) == 1  # the second run found the factor in place
    assert "already weighted" in " ".join(netsurgeon.report(gm).passes[1].notes)
    assert gm.meta["netsurgeon"]["dks"]["xi"] == pytest.approx(math.sqrt(1.5), rel=1e-10)  # two tanh in a chain


def test_csp_concat_no_longer_reports_an_unnormalized_sum():
    """cs3darknet: a lone residual branch's propagation ran past its end into the CSP concat, half of
    whose operands lie outside the branch: q = 0.5 was reported as an un-normalized sum."""
    assert _outcome("cs3darknet_focus_s", ["normalize_sums"]) is None


def test_layer_scale_is_named_with_a_remedy_that_has_not_run():
    """inception_next: the branch's layer scale (1e-6) keeps it out of q, not an un-normalized sum."""
    msg = _outcome("inception_next_atto", [("normalize_sums", {"reset_layer_scale": False})])
    assert msg is not None and "(run normalize_sums)" not in msg
    assert "per-channel scale at mul" in msg and "reset_layer_scale=True" in msg
    assert _outcome("inception_next_atto", ["normalize_sums"]) is None  # the default resets it


def test_unnormalized_sum_is_named_with_its_weights():
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x + self.l(x))

    with pytest.raises(PassError, match=r"the sum add has squared weights adding up to 2, not 1 "
                                        r"\(run normalize_sums\)"):
        netsurgeon.transform(Res(), passes=["dks"])


def test_max_pool_left_by_maxpool_to_avgpool_is_not_sent_back_to_it():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2, dilation=2))
    with pytest.raises(PassError, match=r"maxpool_to_avgpool first"):
        netsurgeon.transform(net, passes=["dks"], example_inputs=torch.randn(1, 3, 16, 16))
    with pytest.raises(PassError) as err:
        netsurgeon.transform(net, passes=["maxpool_to_avgpool", "dks"], example_inputs=torch.randn(1, 3, 16, 16))
    assert "maxpool_to_avgpool first" not in str(err.value) and "dilation" in str(err.value)


# ---------------------------------------------------------------- 4. farkas and a hard-coded reshape
class _ShapeBack(nn.Module):
    """A lambda-layer-like block: reads its input's channel count and reshapes back to it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1)
        self.conv3, self.act3, self.head = nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x))
        b, c, hh, ww = h.shape
        y = self.conv2(h).flatten(2).transpose(1, 2).reshape(b, c, hh, ww)
        return self.head(self.act3(self.conv3(y + h.shape[-1])))


def test_farkas_skips_a_layer_whose_width_a_reshape_reads():
    gm = netsurgeon.transform(_ShapeBack(), ["farkas"], example_inputs=torch.randn(2, 3, 4, 4))
    r = netsurgeon.report(gm).passes[0]
    skipped = {s.node: s.why for s in r.skipped}
    assert "conv1" in skipped and "channel count of act" in skipped["conv1"] and "reshape" in skipped["conv1"]
    assert [c.node for c in r.changes] == ["conv3"]  # x.shape[-1] (a spatial size) is harmless
    assert gm(torch.randn(2, 3, 4, 4)).shape == (2, 4, 4, 4)


def test_farkas_completes_on_lambda_resnet26t():
    x = torch.randn(1, 3, 64, 64)
    gm = netsurgeon.transform(timm.create_model("lambda_resnet26t"), ["farkas"], example_inputs=x)
    r = netsurgeon.report(gm).passes[0]
    named = [s for s in r.skipped if "shape query" in s.why]
    assert {s.node for s in named} == {"stages_2_1_conv1_1x1_conv", "stages_3_0_conv1_1x1_conv",
                                       "stages_3_1_conv1_1x1_conv"}
    assert all("reshape" in s.why for s in named)
    assert len(r.changes) > 0 and any(isinstance(m, FarkasLayer) for m in gm.modules())
    assert gm(x).shape == (1, 1000)


def test_farkas_block_mode_names_the_reshape_before_changing_anything():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.act0 = nn.Conv2d(3, 8, 1), nn.ReLU()
            self.c1, self.act1 = nn.Conv2d(8, 8, 1), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act0(self.stem(x))
            h = self.act1(h + self.c1(h))
            return h.reshape(h.shape[0], h.shape[1], -1).mean(-1)

    with pytest.raises(PassError, match=r"farkas mode='block': .* uses the channel count of act1"):
        netsurgeon.transform(Block(), [("farkas", {"mode": "block"})], example_inputs=torch.randn(2, 3, 4, 4))


def test_leaky_slope_numbers_are_documented():
    """docs/theory.md §4.2: C'(1) of the centred leaky ReLU at a = -1, 0, 1."""
    assert leaky_dks_slope(-1.0) == pytest.approx(math.pi / (math.pi - 2))
    assert leaky_dks_slope(0.0) == pytest.approx(1 / (1 - 1 / math.pi))
    assert leaky_dks_slope(1.0) == 1.0
