"""Per-node kernel propagation (issue 3 §2-§3, partial): exact rules and agreement with measurement."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.analysis import analyze, measure
from netsurgeon.errors import UnsupportedNodeError


def _relu_c(c):
    c = np.asarray(c, dtype=float)
    return (np.sqrt(1 - c * c) + (math.pi - np.arccos(c)) * c) / math.pi


def _chain(act, width=64, depth=3, gain=2.0, bias=0.0, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.orthogonal_(lin.weight, gain=gain ** 0.5)
        nn.init.normal_(lin.bias, 0, bias) if bias else nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    return nn.Sequential(*layers)


def test_relu_chain_follows_closed_form_c_map_and_unit_slope():
    a = analyze(_chain(nn.ReLU, depth=2))
    c = np.linspace(-1, 1, 11)
    np.testing.assert_allclose(a.cmap("_1")(c), _relu_c(c), atol=2e-3)  # grid interpolation error only
    np.testing.assert_allclose(a.cmap("_3")(c), _relu_c(_relu_c(c)), atol=3e-3)
    assert a.q("_3") == pytest.approx(1.0, rel=1e-6)  # orthogonal (float32), gain 2: q preserved
    assert a.c_slope_1("_3") == pytest.approx(1.0, rel=1e-6)  # C'(1) of ReLU is 1 at every layer
    assert a.status("_3") == ("exact", "")


def test_q_uses_actual_parameters_and_bias():
    m = _chain(nn.Tanh, depth=1, gain=1.0, bias=0.3)
    a = analyze(m, q_in=2.0)
    lin = m[0]
    sw = lin.weight.shape[1] * float((lin.weight.detach().double() ** 2).mean())
    sb = float((lin.bias.detach().double() ** 2).mean())
    assert a.q("_0") == pytest.approx(sw * 2.0 + sb, rel=1e-12)


def test_weighted_residual_sum_and_cumulative_slope():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = _chain(nn.ReLU, depth=1)

        def forward(self, x):
            return 0.8 ** 0.5 * x + 0.2 ** 0.5 * self.f(x)

    a = analyze(Res())
    out = [n for n in a.kernels if a.topology.graph.nodes[n]["kind"].value == "add"][0]
    assert a.q(out) == pytest.approx(1.0, rel=1e-6)
    c = np.linspace(-1, 1, 21)
    np.testing.assert_allclose(a.cmap(out)(c), 0.8 * c + 0.2 * _relu_c(c), atol=2e-3)
    assert a.c_slope_1(out) == pytest.approx(1.0, rel=1e-6)


def test_unsupported_node_needs_inputs_then_is_measured():
    class Swish(nn.Module):  # x * sigmoid(x) written out: dependent operands, no product rule
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)

        def forward(self, x):
            h = self.a(x)
            return h * torch.sigmoid(h)

    with pytest.raises(UnsupportedNodeError, match="mul"):
        analyze(Swish())
    a = analyze(Swish(), torch.randn(4, 32))
    status, reason = a.status("mul")
    assert status == "unsupported" and "measured" in reason and "product of dependent signals" in reason
    assert np.isfinite(a.q("mul")) and a.q("mul") > 0


def test_product_of_independent_signals_follows_the_rule_and_measurement():
    """A gated unit a(x) * sigmoid(b(x)) at width 512: q = q_a q_b and c = c_a c_b (docs/theory.md §3.6),
    with no example inputs needed, and within the sampling error of a measurement."""
    torch.manual_seed(0)

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(512, 512), nn.Linear(512, 512)

        def forward(self, x):
            return self.a(x) * torch.sigmoid(self.b(x))

    model = Gate()
    a = analyze(model, c_in=0.5)
    status, reason = a.status("mul")
    assert status == "approximate" and "operands assumed independent" in reason
    assert a.q("mul") == pytest.approx(a.q("a") * a.q("sigmoid"), rel=1e-12)
    assert a.c("mul") == pytest.approx(a.c("a") * a.c("sigmoid"), rel=1e-12)
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(256, 512, generator=g), torch.randn(256, 512, generator=g)
    m = netsurgeon.measure(model, z1, 0.5 * z1 + 0.75 ** 0.5 * z2)
    assert a.q("mul") == pytest.approx(m["mul"].q, rel=0.05)
    assert a.c("mul") == pytest.approx(m["mul"].c, abs=0.02)


def test_table_str_and_html():
    a = analyze(_chain(nn.GELU, depth=2))
    t = a.table()
    assert len(t) == 6 and "C_prime_1" in str(t) and "<table>" in t._repr_html_()


@pytest.mark.parametrize("act, q_tol", [(nn.Tanh, 0.03), (nn.GELU, 0.06), (nn.ReLU, 0.12)])
def test_prediction_matches_measurement_20_layer_mlp_width_512(act, q_tol):
    """Averaged over 4 network seeds, 64 input pairs at c = 0.5. The c tolerance is the
    issue's 0.02; q meets the issue's 3% for tanh only (see docs/analysis.md)."""
    pq, mq, pc, mc = [], [], [], []
    for seed in range(4):
        m = _chain(act, width=512, depth=20, gain=2.0 if act is nn.ReLU else 1.0, bias=0.1, seed=seed)
        a = analyze(m, c_in=0.5)
        g = torch.Generator().manual_seed(100 + seed)
        z1, z2 = torch.randn(64, 512, generator=g), torch.randn(64, 512, generator=g)
        meas = measure(m, z1, 0.5 * z1 + 0.75 ** 0.5 * z2)
        names = [n for n in a.kernels if n in meas.nodes]
        pq.append([a.q(n) for n in names]), mq.append([meas[n].q for n in names])
        pc.append([a.c(n) for n in names]), mc.append([meas[n].c for n in names])
    pq, mq, pc, mc = (np.array(v).mean(0) for v in (pq, mq, pc, mc))
    assert np.max(np.abs(pc - mc)) <= 0.02
    assert np.max(np.abs(pq - mq) / mq) <= q_tol


def test_prediction_matches_measurement_20_layer_delta_orthogonal_convnet_width_512():
    """20 conv layers (3x3, delta-orthogonal, 512 channels) + tanh, 4 seeds: q within 3%,
    c within 0.02 at every node; the conv nodes are tagged exact (centre tap only)."""
    channels, pq, mq, pc, mc = 512, [], [], [], []
    for seed in range(4):
        torch.manual_seed(seed)
        layers = []
        for _ in range(20):
            conv = nn.Conv2d(channels, channels, 3, padding=1)
            centre = torch.empty(channels, channels)
            nn.init.orthogonal_(centre)
            with torch.no_grad():
                conv.weight.zero_()
                conv.weight[:, :, 1, 1] = centre
                conv.bias.normal_(0, 0.1)
            layers += [conv, nn.Tanh()]
        m = nn.Sequential(*layers)
        a = analyze(m, c_in=0.5)
        g = torch.Generator().manual_seed(100 + seed)
        z1, z2 = torch.randn(16, channels, 4, 4, generator=g), torch.randn(16, channels, 4, 4, generator=g)
        meas = measure(m, z1, 0.5 * z1 + 0.75 ** 0.5 * z2)
        names = [n for n in a.kernels if n in meas.nodes]
        assert a.status("_38") == ("exact", "")
        pq.append([a.q(n) for n in names]), mq.append([meas[n].q for n in names])
        pc.append([a.c(n) for n in names]), mc.append([meas[n].c for n in names])
    pq, mq, pc, mc = (np.array(v).mean(0) for v in (pq, mq, pc, mc))
    assert np.max(np.abs(pc - mc)) <= 0.02
    assert np.max(np.abs(pq - mq) / mq) <= 0.03


def test_plots_and_inspect_cmap(tmp_path):
    a = analyze(_chain(nn.Tanh, depth=6, gain=1.0))
    fig = a.plot_cmaps()
    assert len(fig.axes[0].lines) == 1 + 6  # identity + 5 depths + output
    assert a.plot_q().axes[0].lines[0].get_ydata().size == len(a.kernels)
    png = tmp_path / "c.png"
    from netsurgeon.cli import main

    assert main(["inspect", "resnet10t", "--cmap", str(png), "--input-shape", "1,3,32,32", "--quiet"]) == 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["tanh", "gelu", "elu", "relu6", "silu", "leaky_relu"])
def test_price_slope_at_one_matches_local_maps(name):
    from netsurgeon.analysis.activation_maps import maps_for
    from netsurgeon.ops import ActivationSpec

    m = maps_for(ActivationSpec(name))
    assert m.kernel_slope_at_one(1.0) == pytest.approx(m.local.c_slope_1() * m.local.q1, rel=1e-9)
    # at another q: dK/dk equals the numerical derivative of the kernel map below k = q
    q, eps = 2.5, 1e-6
    num = (m.local.kernel_map(q, q, q) - m.local.kernel_map(q, q, q * (1 - eps))) / (q * eps)  # accurate rule
    assert m.kernel_slope_at_one(q) == pytest.approx(num, rel=2e-3)


def test_local_measurement_of_max_pool_agrees_with_running_the_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1), nn.Conv2d(64, 64, 3, padding=1), nn.Tanh())
    net.eval()
    x = torch.randn(1, 3, 128, 128)
    local = netsurgeon.analyze(net, x)
    whole = netsurgeon.analyze(net, x, local_measure=False)
    status, reason = local.status("_3")
    assert status == "unsupported" and "Gaussian inputs drawn at the predicted kernel" in reason
    assert "Gaussian inputs drawn" not in whole.status("_3")[1]
    for node in ("_3", "_5"):
        assert local.q(node) == pytest.approx(whole.q(node), rel=0.03)
        c = np.linspace(-1, 1, 11)
        np.testing.assert_allclose(local.cmap(node)(c), whole.cmap(node)(c), atol=0.03)
    # no example inputs needed: the conv gives the field's shape
    alone = netsurgeon.analyze(net)
    assert alone.q("_3") == pytest.approx(local.q("_3"), rel=0.03)


def test_reasons_do_not_repeat_through_sums():
    """Each residual sum joins its operands' reasons; they are deduplicated item by item."""
    from netsurgeon.analysis.propagate import _reasons

    r = "a; b"
    for _ in range(60):  # would double 60 times if joined naively
        r = _reasons(r, r, "c")
    assert r == "a; b; c"


class _SkipRelu(nn.Module):
    """``lin(x) + relu(lin(x))``: two terms with no independent weight between them."""

    def __init__(self):
        super().__init__()
        self.lin = _chain(nn.Identity, width=512, depth=1, gain=1.0)[0]

    def forward(self, x):
        h = self.lin(x)
        return h + torch.relu(h)


class _Shared(nn.Module):
    """``f(x) + f(relu(x))``: one weight on both sides, so the terms stay correlated."""

    def __init__(self):
        super().__init__()
        self.f = _chain(nn.Identity, width=512, depth=1, gain=1.0)[0]

    def forward(self, x):
        return self.f(x) + self.f(torch.relu(x))


class _Twice(nn.Module):
    def forward(self, x):
        return x + x


@pytest.mark.parametrize("model, why", [(_SkipRelu, "no independent Linear/Conv weight"),
                                        (_Shared, "the same weights on both: module:f"),
                                        (_Twice, "appears more than once")])
def test_sums_of_correlated_terms_are_measured_not_summed(model, why):
    torch.manual_seed(0)
    m = model()
    x = torch.randn(256, 512)
    a = analyze(m, example_inputs=x, c_in=0.3, empirical_batch=64)
    status, reason = a.status("add")
    assert status == "unsupported" and "correlated" in reason and why in reason and "measured" in reason
    # the measured-based prediction matches a measurement on fresh inputs (the uncorrelated rule would not)
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(256, 512, generator=g), torch.randn(256, 512, generator=g)
    meas = measure(m, z1, 0.3 * z1 + (1 - 0.09) ** 0.5 * z2)
    assert a.q("add") == pytest.approx(meas["add"].q, rel=0.03)
    assert a.c("add") == pytest.approx(meas["add"].c, abs=0.02)
    if model is _SkipRelu:  # E(h + relu h)^2 = 1 + 1 + 1/2 at q(h) = 1, against 1 + 1/2 if uncorrelated
        assert a.q("add") == pytest.approx(2.5, rel=0.03)


def test_residual_blocks_are_not_flagged_and_dks_refuses_correlated_sums():
    import timm
    from netsurgeon.analysis.sums import correlated_sums
    from netsurgeon.analysis.targets import IdealGraph

    for name in ("resnet18", "resnet50", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"):
        assert correlated_sums(netsurgeon.topology(timm.create_model(name))) == {}, name
    pool = correlated_sums(netsurgeon.topology(timm.create_model("poolformer_s12")))
    assert "sub" in pool  # PoolFormer's token mixer pool(x) - x
    problems = dict(IdealGraph(netsurgeon.topology(_SkipRelu())).problems)
    assert "correlated" in problems["add"]


def test_relu_gain_noise_floor_that_bounds_the_measurement_check():
    """The reason the ReLU q check cannot reach 3% at a few seeds (docs/analysis.md): for a
    Haar-orthogonal layer the realized gain ||relu(Wx)||^2 / ||Wx||^2 has mean 1/2 and relative
    variance 3/n, independent of the prediction, so after L layers the per-seed spread of
    measured/predicted q is about sqrt(3L/n)."""
    n, trials = 256, 300
    g = torch.Generator().manual_seed(0)
    w = torch.linalg.qr(torch.randn(trials, n, n, generator=g, dtype=torch.float64))[0]
    z = w @ torch.randn(trials, n, 1, generator=g, dtype=torch.float64)
    r = (torch.relu(z) ** 2).sum((1, 2)) / (z ** 2).sum((1, 2))
    assert float(r.mean()) == pytest.approx(0.5, abs=4 * float(r.std()) / trials ** 0.5)
    rel_var = float(r.var() / r.mean() ** 2)
    assert rel_var == pytest.approx(3 / n, rel=0.25)  # SE of a variance from 300 draws: ~8%
