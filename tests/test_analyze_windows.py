"""``analyze`` measures nodes whose outputs fold the batch into another axis (issue 16 §3):
windows (Swin), heads, sequence-first ``(L, B, E)`` layouts, and tensors taken from tuples;
an output that mixes the examples of a batch is refused with that reason."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import netsurgeon
from netsurgeon.analysis.measure import kernel_stats
from netsurgeon.errors import UnsupportedNodeError

C, S, W, HEADS = 16, 32, 4, 4  # channels, image side, window side, heads
C_IN = 0.5


class Folded(nn.Module):
    """conv 1x1, then ``cumsum`` over channels (an op without a kernel map, so measured) on the
    features laid out as ``mode`` says, then back to ``[B, C, H, W]``, ReLU and a conv."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv, self.out = nn.Conv2d(3, C, 1), nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, c, h, w = y.shape
        if self.mode == "windows":  # Swin's window partition: [B * windows, W * W, C], example-major
            t = y.permute(0, 2, 3, 1).reshape(b, h // W, W, w // W, W, c).permute(0, 1, 3, 2, 4, 5)
            t = torch.cumsum(t.reshape(-1, W * W, c), dim=-1)
            t = t.reshape(b, h // W, w // W, W, W, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        elif self.mode == "slice_major":  # [L * B, C]: locations outer, examples inner
            t = torch.cumsum(y.flatten(2).permute(2, 0, 1).reshape(-1, c), dim=-1)
            t = t.reshape(h * w, b, c).permute(1, 2, 0).reshape(b, c, h, w)
        elif self.mode == "heads":  # [B * heads, L, C / heads]
            t = y.flatten(2).transpose(1, 2).reshape(b, h * w, HEADS, c // HEADS).permute(0, 2, 1, 3)
            t = torch.cumsum(t.reshape(b * HEADS, h * w, c // HEADS), dim=-1)
            t = t.reshape(b, HEADS, h * w, c // HEADS).permute(0, 1, 3, 2).reshape(b, c, h, w)
        elif self.mode == "sequence_first":  # (L, B, E), as nn.MultiheadAttention's default
            t = torch.cumsum(y.flatten(2).permute(2, 0, 1), dim=-1).permute(1, 2, 0).reshape(b, c, h, w)
        elif self.mode == "mixed":  # windows folded, then a cumulative sum over the folded batch axis
            t = torch.cumsum(y.permute(0, 2, 3, 1).reshape(-1, W * W, c), dim=0).reshape(b, h, w, c)
            t = t.permute(0, 3, 1, 2)
        elif self.mode == "sorted":  # windows folded, then sorted along the folded batch axis
            t = torch.sort(y.permute(0, 2, 3, 1).reshape(-1, W * W, c), dim=0)[0].reshape(b, h, w, c)
            t = t.permute(0, 3, 1, 2)
        elif self.mode == "tuple":  # windows folded, then a tuple-valued op: (mantissa, exponent)
            t = y.permute(0, 2, 3, 1).reshape(-1, W * W, c)
            t = torch.frexp(t)[0].reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            raise ValueError(self.mode)
        return self.out(torch.relu(t))


# how each mode's cumsum output holds example i: the unfolding a test writes by hand
UNFOLD = {
    "windows": lambda t, b: t.reshape(b, -1),
    "slice_major": lambda t, b: t.reshape(-1, b, C).transpose(0, 1).reshape(b, -1),
    "heads": lambda t, b: t.reshape(b, -1),
    "sequence_first": lambda t, b: t.transpose(0, 1).reshape(b, -1),
}
LAYOUT = {
    "windows": "batch folded into axis 0 (64 slices per example, example-major)",
    "slice_major": "batch folded into axis 0 (1024 slices per example, slice-major)",
    "heads": "batch folded into axis 0 (4 slices per example, example-major)",
    "sequence_first": "batch in axis 1",
}


def _model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    return Folded(mode).eval()


def _node_output(gm: fx.GraphModule, name: str, x: torch.Tensor) -> torch.Tensor:
    class Keep(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n.name == name:
                self.kept = out
            return out

    keep = Keep(gm)
    with torch.no_grad():
        keep.run(x)
    return keep.kept


def _analyze(mode: str) -> netsurgeon.Analysis:
    return netsurgeon.analyze(_model(mode), torch.randn(2, 3, S, S), c_in=C_IN, empirical_batch=16)


@pytest.mark.parametrize("mode", list(UNFOLD))
def test_folded_node_is_measured_on_its_per_example_features(mode):
    a = _analyze(mode)
    status, reason = a.status("cumsum")
    assert status == "unsupported" and LAYOUT[mode] in reason
    assert all(np.isfinite(k.q) and np.all(np.isfinite(k.c)) for k in a.kernels.values())
    # the same statistic computed directly: pairs at c_in, the node's output unfolded by hand
    gm = netsurgeon.trace(_model(mode))
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(64, 3, S, S, generator=g), torch.randn(64, 3, S, S, generator=g)
    x2 = C_IN * z1 + (1 - C_IN ** 2) ** 0.5 * z2
    h1, h2 = (UNFOLD[mode](_node_output(gm, "cumsum", x), 64) for x in (z1, x2))
    direct = kernel_stats(h1, h2)
    assert a.q("cumsum") == pytest.approx(direct.q, rel=0.05)
    assert a.c("cumsum") == pytest.approx(direct.c, abs=0.03)


def test_every_layout_of_the_same_features_gives_the_same_measurement():
    """Windows, slice-major rows and (L, B, E) hold the same per-example features in other orders."""
    ref = _analyze("windows")
    for mode in ("slice_major", "sequence_first"):
        a = _analyze(mode)
        assert a.q("cumsum") == pytest.approx(ref.q("cumsum"), rel=1e-5)
        np.testing.assert_allclose(a.kernels["cumsum"].c, ref.kernels["cumsum"].c, atol=1e-5)


def test_output_that_mixes_examples_is_refused_with_that_reason():
    """A cumulative sum over the folded axis (later examples depend on earlier ones) and a sort
    along it (every example depends on every other)."""
    with pytest.raises(UnsupportedNodeError, match=r"cumsum: its output mixes examples of the batch \(its rows "
                                                   r"depend on several inputs\)") as err:
        _analyze("mixed")
    assert list(err.value.nodes) == ["cumsum"]
    with pytest.raises(UnsupportedNodeError, match=r"its output mixes examples of the batch"):
        _analyze("sorted")


def test_tensor_taken_from_a_tuple_output_is_measured():
    a = _analyze("tuple")
    measured = [n for n, k in a.kernels.items() if k.status == "unsupported" and "measured" in k.reason]
    assert measured, "nothing was measured"
    assert any("tuple output of frexp" in a.kernels[n].reason or "element" in a.kernels[n].reason for n in measured)
    assert any(LAYOUT["windows"] in a.kernels[n].reason for n in measured)
    for name in ("relu", "out", "output"):
        assert np.isfinite(a.q(name)) and np.all(np.isfinite(a.kernels[name].c))


def test_small_timm_swin_is_measured_through_its_windows():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, window_size=2, embed_dim=24, depths=(1, 1),
                            num_heads=(2, 2), num_classes=10).eval()
    gm = netsurgeon.trace(model, torch.randn(2, 3, 32, 32))
    a = netsurgeon.analyze(gm, torch.randn(2, 3, 32, 32), c_in=C_IN, empirical_batch=32)
    folded = [n for n, k in a.kernels.items() if "batch folded into axis 0" in k.reason]
    assert len(folded) >= 4  # attention logits, softmax and products of both stages
    assert all(np.isfinite(k.q) and np.all(np.isfinite(k.c)) for k in a.kernels.values())
    # the attention output of the first block against pairs unfolded by hand: windows are example-major
    name = next(n for n in folded if "16 slices per example" in a.kernels[n].reason and n.startswith("matmul_"))
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(64, 3, 32, 32, generator=g), torch.randn(64, 3, 32, 32, generator=g)
    h1, h2 = (_node_output(gm, name, x).reshape(64, -1) for x in (z1, C_IN * z1 + (1 - C_IN ** 2) ** 0.5 * z2))
    direct = kernel_stats(h1, h2)
    assert a.q(name) == pytest.approx(direct.q, rel=0.1)
    assert a.c(name) == pytest.approx(direct.c, abs=0.05)


@pytest.mark.parametrize("mode", ["windows", "slice_major", "sequence_first"])
def test_layout_settled_by_one_run_of_two_examples(mode, monkeypatch):
    """The measured run's first and last examples, run alone, show the layout: the probe's four
    examples are not needed (mixing outputs still go to the probe, test above)."""
    import netsurgeon.analysis.engine as engine

    def no_probe(*args, **kwargs):
        raise AssertionError("the layout probe ran")

    monkeypatch.setattr(engine, "_probe_layouts", no_probe)
    assert LAYOUT[mode] in _analyze(mode).status("cumsum")[1]
