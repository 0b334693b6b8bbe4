"""The ``orthogonal_init`` pass: (delta-, patch- and full-window) orthogonal weights that keep q."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import Linear as TimmLinear
from timm.layers import StdConv2d

import netsurgeon

from structure_pass_models import _record, _x


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


def test_orthogonal_init_zeroes_layers_that_read_constants_only():
    """A layer fed by constants only (XCiT's Fourier position encoding through a conv) adds an input-independent
    term, a bias of the kernel theory: zeroed, so q is unchanged by the sum; the layers on the signal are not."""
    class FourierPos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.proj = nn.Conv2d(4, 8, 1)

        def forward(self, x):
            b, _, h, w = x.shape
            grid = torch.arange(h * w, dtype=x.dtype).reshape(1, 1, h, w) / (h * w)
            feats = torch.cat([torch.sin(grid), torch.cos(grid), torch.sin(2 * grid), torch.cos(2 * grid)], 1)
            return self.stem(x) + self.proj(feats).expand(b, -1, -1, -1)

    x = torch.randn(2, 3, 5, 5)
    gm = netsurgeon.transform(FourierPos(), [("orthogonal_init", {"seed": 0})], example_inputs=(x,))
    assert torch.count_nonzero(gm.get_submodule("proj").weight) == 0 and torch.count_nonzero(gm.proj.bias) == 0
    assert torch.count_nonzero(gm.get_submodule("stem").weight) > 0
    changes = {c.node: c.what for c in netsurgeon.report(gm).passes[-1].changes}
    assert "reads constants only" in changes["proj"]
