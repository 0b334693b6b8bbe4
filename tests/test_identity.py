"""identity_residual and identity_reparam (issue 6 §1–§2)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.fx as fx

import netsurgeon
from netsurgeon.errors import PassError
from netsurgeon.graph import Topology

FAMILIES = {  # model -> input size
    "resnet18": 64, "resnet50": 64, "resnetv2_50": 64, "regnetx_002": 64, "efficientnet_b0": 64,
    "mobilenetv3_small_100": 64, "convnext_atto": 64, "vit_small_patch16_224": 224,
}


class _Values(fx.Interpreter):
    """Every node's output, copied (timm blocks add and activate in place)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.copies: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.copies[n.name] = out.clone()
        return out

    def values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.run(x)
        return self.copies


def _blocks_are_identity(gm: fx.GraphModule, x: torch.Tensor) -> None:
    topo = Topology(gm)
    blocks = [b for b in topo.blocks if b.kind == "residual"]
    assert blocks
    vals = _Values(gm.eval()).values(x)
    for b in blocks:
        shortcut = vals[b.operands[0]]
        torch.testing.assert_close(vals[b.merge], shortcut, rtol=0, atol=0, msg=f"block {b.merge}")
    # the network equals the network with every branch cut
    cut = copy.deepcopy(gm)
    nodes = {n.name: n for n in cut.graph.nodes}
    for b in blocks:
        nodes[b.merge].replace_all_uses_with(nodes[b.operands[0]])
    cut.graph.eliminate_dead_code()
    cut.recompile()
    with torch.no_grad():
        torch.testing.assert_close(cut.eval()(x), gm(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["zero_last", "skipinit", "rezero", "fixup"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_residual_block_is_the_identity_at_init(name, mode):
    size = FAMILIES[name]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    passes = [("identity_residual", {"mode": mode, "seed": 0})]
    if mode == "fixup":
        passes.insert(0, ("strip_bn", {"mode": "remove"}))
    gm = netsurgeon.transform(timm.create_model(name), passes=passes, example_inputs=x[:1])
    rec = netsurgeon.report(gm).passes[-1]
    assert rec.changes and not rec.skipped, [(s.node, s.why) for s in rec.skipped]
    _blocks_are_identity(gm, x)


def test_fixup_details_and_refusal():
    with pytest.raises(PassError, match=r"(?s)batch norm.*strip_bn.*bn1"):
        netsurgeon.transform(timm.create_model("resnet18"), passes=[("identity_residual", {"mode": "fixup"})])
    gm = netsurgeon.transform(timm.create_model("resnet18"), passes=[
        ("strip_bn", {"mode": "remove"}), ("identity_residual", {"mode": "fixup", "seed": 0})])
    assert float(gm.fc.weight.detach().abs().sum()) == 0.0  # classifier zero
    assert float(gm.get_submodule("layer1.0.conv2").weight.detach().abs().sum()) == 0.0  # last branch layer zero
    w = gm.get_submodule("layer1.0.conv1").weight.detach()
    he = (2.0 / (w.shape[1] * 9)) ** 0.5 * 8 ** (-1.0 / 2)  # L = 8 blocks, m = 2: L^(-1/(2m-2)) = 8^(-1/2)
    assert float(w.std()) == pytest.approx(he, rel=0.05)
    names = dict(gm.named_parameters())
    assert sum(k.endswith(".scale") for k in names) == 8
    # per block: before conv1, act1, conv2 and after the multiplier (the reference's bias1a, 1b, 2a, 2b),
    # plus one before the classifier
    assert sum(k.endswith(".bias") and "ns_fixup_bias" in k for k in names) == 8 * 4 + 1
    assert "ns_fixup_bias_classifier.bias" in names
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert order.index("ns_fixup_bias_classifier") == order.index("fc") - 1


def test_hardt_ma_init_and_fixed_projection():
    gm = netsurgeon.transform(timm.create_model("resnet18"), passes=[
        ("strip_bn", {"mode": "remove"}), ("identity_residual", {"mode": "hardt_ma", "seed": 0})])
    w = gm.get_submodule("layer1.0.conv1").weight.detach()
    assert float(w.std()) == pytest.approx(1.0 / (9 * 64), rel=0.05)
    assert "fc.weight" not in dict(gm.named_parameters()) and "fc.weight" in gm.state_dict()  # a buffer
    out = gm(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert gm.get_submodule("layer1.0.conv1").weight.grad is not None


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "convnext_atto", "efficientnet_b0", "regnetx_002"])
def test_identity_reparam_convert_preserves_and_zero_is_identity(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    gm = netsurgeon.transform(model, passes=[("identity_reparam", {"init": "convert"})])
    rec = netsurgeon.report(gm).passes[0]
    assert rec.changes and all(s.why for s in rec.skipped)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model(x), rtol=1e-4, atol=1e-5)
    assert any(k.endswith("parametrizations.weight.original") for k in gm.state_dict())


def test_identity_reparam_zero_layers_are_identity():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1, groups=4),
                              torch.nn.Conv2d(4, 8, 1), torch.nn.Flatten(), torch.nn.Linear(8 * 25, 8 * 25))
    gm = netsurgeon.transform(net, passes=[("identity_reparam", {"init": "zero"})])
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(gm.get_submodule("1")(gm.get_submodule("0")(x)), x)
    skipped = {s.node for s in netsurgeon.report(gm).passes[0].skipped}
    assert skipped == {"_2"}  # 4 -> 8 channels is not shape-preserving
    lin = gm.get_submodule("4")
    torch.testing.assert_close(lin(x.new_ones(1, 200)), x.new_ones(1, 200))
    v = dict(gm.named_parameters())["0.parametrizations.weight.original"]
    assert float(v.detach().abs().sum()) == 0.0  # state_dict holds V = 0


def test_identity_reparam_cli_round_trip(tmp_path):
    from netsurgeon.cli import main

    out = tmp_path / "r18"
    assert main(["convert", "resnet18", "--passes", "identity_reparam", "--input-shape", "1,3,64,64",
                 "--out", str(out), "--quiet"]) == 0
    loaded = netsurgeon.load(out).eval()
    assert any(k.endswith("parametrizations.weight.original") for k in loaded.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert torch.isfinite(loaded(x)).all()
