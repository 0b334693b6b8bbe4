"""Kernel rules of the remaining common ops (issue 16 §2): layer scales and learned shifts, padding,
resampling, F.normalize, (un)folding and shuffles, drop-path, norm+activation composites, tuple
outputs. Each rule's q and c agree with measurement on Gaussian input pairs, with the status it
claims; the DKS targets no longer refuse real models for these ops."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import timm.layers as tl
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import netsurgeon
from netsurgeon.analysis import analyze, measure
from netsurgeon.analysis.ideal_rules import NO_RULE_REMEDY
from netsurgeon.analysis.targets import IdealGraph
from netsurgeon.graph import Topology
from netsurgeon.kernels import LocalMaps, get_activation
from netsurgeon.kernels.transforms import transformed
from netsurgeon.ops import OpKind

C_IN = 0.5


def _pair(shape: tuple[int, ...], c: float = C_IN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, z = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return x, c * x + (1 - c * c) ** 0.5 * z


def _analysis(model: nn.Module, shape: tuple[int, ...]) -> tuple[netsurgeon.analysis.Analysis, dict]:
    """The analysis (from two example inputs) and the measurement on ``shape[0]`` Gaussian pairs."""
    model.eval()
    x, x2 = _pair(shape)
    return analyze(model, x[:2], c_in=C_IN), measure(model, x, x2).nodes


def _agrees(a, m, nodes, rel_q=0.04, abs_c=0.02) -> None:
    for n in nodes:
        assert a.q(n) == pytest.approx(m[n].q, rel=rel_q), n
        assert a.c(n) == pytest.approx(m[n].c, abs=abs_c), n


def _delta_conv(channels: int) -> nn.Conv2d:
    """A 3x3 conv with an orthogonal centre tap only (as orthogonal_init makes them), no padding."""
    conv = nn.Conv2d(channels, channels, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = torch.linalg.qr(torch.randn(channels, channels))[0]
    return conv


# ---------------------------------------------------------------- constant scales and shifts
class _Scales(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.rand(width) + 0.5)
        self.beta = nn.Parameter(torch.randn(width) * 0.5)
        self.gain = nn.Parameter(torch.tensor(1.7))
        self.ls = tl.LayerScale(width, init_values=0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.fc(x)
        return (h * self.gamma, self.gamma * h, h.mul(self.gamma), h + self.beta, self.beta + h, h - self.beta,
                torch.addcmul(self.beta, self.gamma, h), h * self.gamma.to(torch.float32)[None, :], h / self.gamma,
                h * self.gain, self.ls(h), h.clone().mul_(self.gamma))


def test_layer_scales_and_learned_shifts_follow_their_mean_squares():
    a, m = _analysis(_Scales(), (512, 64))
    affine = a.topology.nodes_of(OpKind.AFFINE)
    assert len(affine) == 12
    _agrees(a, m, affine)
    fc = a.q("fc")
    assert a.q("mul_4") == pytest.approx(1.7 ** 2 * fc, rel=1e-6) and a.status("mul_4") == ("exact", "")
    assert a.q("mul_5") == pytest.approx(0.09 * fc, rel=1e-6)  # timm LayerScale, traced through: h * gamma
    beta2 = float(_Scales().beta.detach().double().pow(2).mean())
    assert a.q("add") == pytest.approx(fc + beta2, rel=1e-6)
    assert a.status("mul")[1] == "per-channel scale: channels assumed alike"
    assert a.status("add")[1] == "constant shift: signal assumed uncorrelated with it"
    assert IdealGraph(a.topology).problems == []


class _Scales2d(nn.Module):
    """Layer scales on NCHW features (view, reshape, unsqueeze, indexing, in place) and a
    broadcast class token, as timm writes them."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.token = nn.Parameter(torch.randn(1, 1, c) * 0.3)
        self.ls = tl.LayerScale2d(c, init_values=0.5, inplace=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.conv(x)
        tokens = h.flatten(2).transpose(1, 2)
        return (h * self.gamma.view(1, -1, 1, 1), h * self.gamma.reshape(1, -1, 1, 1),
                h * self.gamma.unsqueeze(-1).unsqueeze(-1), h * self.gamma[None, :, None, None],
                self.ls(h.clone()), tokens + self.token.expand(x.shape[0], -1, -1))


def test_layer_scales_on_channels_first_features_and_token_shifts():
    a, m = _analysis(_Scales2d(), (64, 32, 8, 8))
    affine = a.topology.nodes_of(OpKind.AFFINE)
    assert len(affine) == 6
    _agrees(a, m, affine)
    assert a.status(affine[4])[0] == "exact"  # LayerScale2d(0.5): one value for every channel
    assert IdealGraph(a.topology).problems == []


# ---------------------------------------------------------------- padding
class _Pads(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.delta = nn.Conv2d(c, c, 1), _delta_conv(c)
        self.reflect, self.none, self.const = nn.ReflectionPad2d(1), nn.ZeroPad2d(0), nn.ConstantPad2d(1, 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.conv(x)
        return (self.delta(F.pad(h, (1, 1, 1, 1))), self.delta(self.reflect(h)),
                F.pad(h, (2, 2, 2, 2), mode="replicate"), self.none(h), self.const(h))


def test_padding_keeps_q_and_c_of_the_signal_locations():
    a, m = _analysis(_Pads(), (64, 16, 12, 12))
    _agrees(a, m, ["delta", "delta_1", "reflect", "pad_1", "none"])
    assert a.status("pad")[0] == "approximate" and "padded zeros not counted" in a.status("pad")[1]
    assert m["pad"].q == pytest.approx(a.q("pad") * (12 * 12) / (14 * 14), rel=0.02)  # the zeros, on the flat tensor
    assert a.status("none") == ("exact", "")
    assert a.status("const")[0] == "unsupported"  # a non-zero constant: measured
    problems = dict(IdealGraph(Topology(a.topology.gm)).problems)
    assert list(problems) == ["const"] and "constant 0.5" in problems["const"]


# ---------------------------------------------------------------- resampling
class _Resample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.up = nn.Conv2d(16, 32, 1), nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.conv(x)
        r = torch.relu(h)
        return (self.up(h), F.interpolate(h, size=(24, 24)), F.interpolate(h, size=(17, 17)),
                F.interpolate(r, scale_factor=2, mode="bilinear"), F.interpolate(r, size=(7, 7), mode="area"),
                F.interpolate(r, scale_factor=2, mode="bicubic", align_corners=True))


def test_interpolation_copies_or_weighs_independent_locations():
    a, m = _analysis(_Resample(), (64, 16, 12, 12))
    assert a.status("up") == a.status("interpolate") == ("exact", "")
    assert a.q("up") == a.q("conv")
    _agrees(a, m, ["up", "interpolate", "interpolate_1"], rel_q=0.01, abs_c=0.01)
    for n in ("interpolate_2", "interpolate_3", "interpolate_4"):  # relative to the ReLU's own agreement
        assert a.q(n) / a.q("relu") == pytest.approx(m[n].q / m["relu"].q, rel=0.03), n
        assert a.c(n) - a.c("relu") == pytest.approx(m[n].c - m["relu"].c, abs=0.02), n
        assert "distinct locations taken as independent inputs" in a.status(n)[1]
    assert IdealGraph(a.topology).problems == []


# ---------------------------------------------------------------- F.normalize
class _Normalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(16, 32, 1), nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.conv(x)
        return F.normalize(h, dim=1), F.normalize(self.fc(x[:, :, 0, 0]), dim=-1), F.normalize(h, p=1.0, dim=1)


def test_normalize_gives_q_one_over_n_and_keeps_c():
    a, m = _analysis(_Normalize(), (64, 16, 8, 8))
    assert a.q("normalize") == pytest.approx(1 / 32, rel=1e-12) and a.q("normalize_1") == pytest.approx(1 / 48)
    assert a.status("normalize_1") == ("exact", "")  # the vector is the whole example
    assert "locations assumed alike" in a.status("normalize")[1]
    _agrees(a, m, ["normalize", "normalize_1"], rel_q=1e-5)
    assert a.status("normalize_2")[0] == "unsupported"
    reasons = dict(IdealGraph(a.topology).problems)
    assert list(reasons) == ["normalize_2"] and "p = 1.0" in reasons["normalize_2"]


# ---------------------------------------------------------------- unfold, fold, shuffles
class _Patches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.unfold = nn.Conv2d(16, 16, 1), nn.Unfold(2, stride=2)
        self.cols = nn.Conv1d(8, 8 * 9, 1)  # independent entries for an overlapping fold
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.conv(x)
        cols = self.cols(x[:, :8].flatten(2))  # [B, 8·9, 144]: the patches of a 12x12 map
        return (F.fold(self.unfold(h), (12, 12), 2, stride=2), F.unfold(h, 3, padding=1),
                F.fold(cols, (12, 12), 3, padding=1), F.pixel_shuffle(h, 2), F.pixel_unshuffle(h, 2),
                F.channel_shuffle(h, 4), self.shuffle(h))


def test_unfold_fold_and_shuffles():
    a, m = _analysis(_Patches(), (64, 16, 12, 12))
    exact = ["unfold", "fold", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "shuffle"]
    assert all(a.status(n) == ("exact", "") for n in exact)
    _agrees(a, m, exact + ["fold_1"], rel_q=0.03)
    assert a.q("fold_1") == pytest.approx(a.q("cols") * (10 * 10 * 9 + 4 * 10 * 6 + 4 * 4) / 144, rel=1e-9)
    assert a.status("unfold_1")[0] == "approximate"


# ---------------------------------------------------------------- drop-path
def test_stochastic_depth_is_an_identity_and_shapes():
    from torchvision.ops import StochasticDepth

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.sd, self.dp = StochasticDepth(0.2, "row"), tl.DropPath(0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.sd(self.conv2(torch.tanh(self.conv1(x)))) + self.dp(self.conv1(x))

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), Block())
    topo = netsurgeon.topology(net)
    assert {str(topo.info(n).kind) for n in topo.graph if "sd" in n or "dp" in n} == {"identity"}
    x = torch.randn(1, 3, 16, 16)
    gm = netsurgeon.transform(net, passes=["normalize_sums", "input_norm", ("orthogonal_init", {"seed": 0}), "dks"],
                              example_inputs=x)
    assert sum(type(m).__name__ == "ShapedActivation" for m in gm.modules()) == 2


# ---------------------------------------------------------------- norm+activation composites
class _Composites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.frn = nn.Conv2d(16, 64, 1, bias=False), tl.FilterResponseNormAct2d(64, act_layer=nn.GELU)
        self.conv2, self.gn = nn.Conv2d(64, 64, 1, bias=False), tl.GroupNormAct(64, 8, act_layer=nn.SiLU)
        self.conv3, self.ln = nn.Conv2d(64, 64, 1, bias=False), tl.LayerNormAct2d(64, act_layer=nn.Tanh)
        self.conv4 = nn.Conv2d(64, 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv4(self.ln(self.conv3(self.gn(self.conv2(self.frn(self.conv1(x)))))))


def test_norm_act_composites_are_analysed_and_reshaped():
    a, m = _analysis(_Composites(), (32, 16, 16, 16))
    _agrees(a, m, ["frn", "gn", "ln"], rel_q=0.05, abs_c=0.03)
    assert "instance norm: channels assumed alike" in a.status("frn")[1]
    x = torch.randn(1, 16, 16, 16)
    for final in ("dks", "tat"):
        gm = netsurgeon.transform(_Composites(), passes=["input_norm", ("orthogonal_init", {"seed": 0}), final],
                                  example_inputs=x)
        assert [n for n, mod in gm.named_modules() if type(mod).__name__ == "ShapedActivation"] == \
            ["frn.act", "gn.act", "ln.act"]
    topo = Topology(gm, x)
    maps = {n: LocalMaps(transformed(get_activation(s.name), *s.transform))
            for n in ("gn", "ln", "frn") for s in [topo.info(n).norm.activation]}
    assert all(mp.c_slope_1() == pytest.approx(1.0, abs=1e-6) for mp in maps.values())  # tat: C'(1) = 1
    assert IdealGraph(topo).max_curvature_count()[0] == pytest.approx(3.0)  # three activations in a chain


def test_instance_norms_follow_the_per_channel_rule():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.InstanceNorm2d(32, affine=True), nn.Tanh(),
                        nn.Conv2d(32, 32, 1, bias=False), tl.FilterResponseNormTlu2d(32))
    a, m = _analysis(net, (32, 16, 16, 16))
    _agrees(a, m, ["_1", "_2"], rel_q=0.02)
    assert a.status("_1")[1] == "instance norm: channels assumed alike; centering neglected"
    assert a.status("_4")[0] == "unsupported"  # the threshold max(x, τ): measured
    assert dict(IdealGraph(a.topology).problems) == {"_4": "filter response norm's threshold max(x, τ): no kernel map"}


@pytest.mark.parametrize("norm", [lambda: tl.EvoNorm2dS0(16, group_size=4), lambda: tl.EvoNorm2dB0(16)])
def test_evonorm_is_measured_and_refused_by_name(norm):
    net = nn.Sequential(nn.Conv2d(3, 16, 1), norm(), nn.Conv2d(16, 8, 1))
    x = torch.randn(4, 3, 8, 8)
    a = analyze(net, x)
    assert a.status("_1")[0] == "unsupported" and "EvoNorm" in a.status("_1")[1]
    with pytest.raises(netsurgeon.PassError, match="EvoNorm: its nonlinearity is built into the normalization"):
        netsurgeon.transform(net, passes=["dks"], example_inputs=x)


# ---------------------------------------------------------------- tuple outputs
class _Tuples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 32)
        self.lstm, self.gru = nn.LSTM(32, 32, batch_first=True), nn.GRU(32, 32, batch_first=True)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.fc(x)
        out, (hidden, cell) = self.lstm(h)
        g, _ = self.gru(out)
        values, indices = g.max(dim=1)
        a, _ = self.attn(h, h, h)
        return values, hidden, torch.topk(g, 3, dim=1).values, a


def test_tuple_outputs_are_measured_where_their_elements_are_taken():
    a, m = _analysis(_Tuples(), (8, 10, 16))
    topo = a.topology
    tuples = [n for n in topo.graph if topo.info(n).attrs.get("tuple_output")]
    assert tuples == ["lstm", "getitem_1", "gru", "max_1", "topk"]  # nn.MultiheadAttention is written out
    items = [n for n in topo.graph if topo.info(n).attrs.get("op_key") == "op:tuple_item"]
    assert items == ["getitem", "getitem_2", "getitem_4", "getitem_6", "getattr_1"]
    for n in items:
        assert a.status(n)[0] == "unsupported" and "element of a tuple output" in a.status(n)[1]
        if n != "getitem_2":  # the LSTM's hidden state is [layers, batch, features]: measure() skips it
            assert a.q(n) == pytest.approx(m[n].q, rel=0.3), n  # measured by the engine (a few pairs)
    assert str(topo.info("getitem_7").kind) == "meta"  # the indices of x.max(dim) carry no signal
    reasons = dict(IdealGraph(topo, products="neutral").problems)
    assert set(reasons) == {"lstm", "gru", "max_1", "topk", "softmax"}  # unshaped attention's softmax: no rule


# ---------------------------------------------------------------- real models
BANNED = ("affine op with no constant scale", "pad", "interpolate", "upsample", "normalize", "StochasticDepth",
          "norm+activation composite", "no kernel rule for op kind")
REAL = {  # model -> the refusals that remain (other issues: softmax, batch norm before strip_bn)
    "resmlp_12_224": set(), "cait_xxs24_224": {f"other softmax: no kernel rule ({NO_RULE_REMEDY})"},
    "edgenext_xx_small": {f"other softmax: no kernel rule ({NO_RULE_REMEDY})"},
    "hrnet_w18_small": {"batch norm: run strip_bn first (fold or remove)"},
    "tv:efficientnet_b0": {"batch norm: run strip_bn first (fold or remove)"},
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_models_are_no_longer_refused_for_these_ops(name):
    if name.startswith("tv:"):
        model = getattr(torchvision.models, name[3:])()
    else:
        try:
            model = timm.create_model(name, img_size=64)
        except TypeError:
            model = timm.create_model(name)
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        topo = Topology(netsurgeon.trace(model.eval(), x), x)
    reasons = {r for _, r in IdealGraph(topo, products="neutral").problems}
    assert reasons == REAL[name]
    assert not any(b in r for r in reasons for b in BANNED)


@pytest.mark.parametrize("name, middle", [("resmlp_12_224", "remove_skips"),
                                          ("test_efficientnet_gn", "normalize_sums")])
def test_real_models_pass_the_tat_pipeline(name, middle):
    model = timm.create_model(name, img_size=64) if name.startswith("resmlp") else timm.create_model(name)
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = netsurgeon.transform(model, passes=[("strip_bn", {"mode": "remove"}), middle, "maxpool_to_avgpool",
                                                 "input_norm", ("orthogonal_init", {"seed": 0}), "tat"],
                                  example_inputs=x)
    assert torch.isfinite(gm(x)).all()
    assert sum(type(m).__name__ == "ShapedActivation" for m in gm.modules()) > 0


def test_per_example_norm_of_a_zero_input_keeps_only_its_shift():
    """A zero signal into a LayerNorm (a branch zeroed at init) gave a ZeroDivisionError (csatv2)."""
    class Zeroed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm, self.out = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
            nn.init.constant_(self.norm.bias, 0.5)

        def forward(self, x):
            return self.out(self.norm(self.fc(x)))

    a = analyze(Zeroed(), torch.randn(4, 8))
    assert a.q("norm") == pytest.approx(0.25) and np.isfinite(a.q("out"))
