"""The pass pipeline: specs, registry errors, reports, immutability, error chaining."""
from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn

import netsurgeon
from netsurgeon import PassError, PassOptionError, UnknownPassError
from netsurgeon.passes import Pass, StripBN, register_pass
from netsurgeon.report import Preservation

from conftest import count_batch_norms, randomize_norm_stats


def _small():
    torch.manual_seed(0)
    return randomize_norm_stats(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                              nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))).eval()


@pytest.mark.parametrize("spec", ["strip_bn", ("strip_bn", {"mode": "fold"}), StripBN(mode="fold")])
def test_three_ways_to_name_a_pass(spec):
    m = _small()
    gm = netsurgeon.transform(m, [spec])
    assert isinstance(gm, fx.GraphModule) and count_batch_norms(gm) == 0
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm.eval()(x), m(x), rtol=1e-5, atol=1e-6)


def test_list_passes_and_unknown_name_suggests_closest():
    assert "strip_bn" in netsurgeon.list_passes()
    with pytest.raises(UnknownPassError) as err:
        netsurgeon.transform(_small(), ["strip_nb"])
    assert "'strip_bn'" in str(err.value) and "Valid passes" in str(err.value)


def test_unknown_option_names_valid_options_and_bad_value_names_range():
    with pytest.raises(PassOptionError, match=r"no option 'mod'.*Did you mean 'mode'.*Valid options: mode"):
        netsurgeon.transform(_small(), [("strip_bn", {"mod": "fold"})])
    with pytest.raises(PassOptionError, match=r"strip_bn.mode must be one of 'fold', 'remove'"):
        StripBN(mode="squash")


def test_input_model_is_never_mutated_unless_inplace():
    m = _small()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modules_before = [type(x) for x in m.modules()]
    netsurgeon.transform(m, ["strip_bn"])
    assert [type(x) for x in m.modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    gm = netsurgeon.transform(m, ["strip_bn"], inplace=True)
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items() if k in before)
    assert count_batch_norms(gm) == 0


def test_report_text_dict_markdown_and_preservation():
    gm = netsurgeon.transform(_small(), ["strip_bn", ("strip_bn", {"mode": "remove"})])
    rep = netsurgeon.report(gm)
    assert [p.name for p in rep.passes] == ["strip_bn", "strip_bn"]
    assert rep.passes[0].preservation is Preservation.EXACT_EVAL
    assert rep.passes[1].note and "no batch norm" in rep.passes[1].notes[0]
    assert rep.preservation is Preservation.NONE  # weakest of the pipeline
    d = rep.to_dict()
    json.dumps(d)
    assert len(d["passes"][0]["changes"]) == 2
    assert "folded into preceding Conv2d" in str(rep)
    md = rep.to_markdown()
    assert md.startswith("# netsurgeon report") and "| node | change | why |" in md


def test_report_on_plain_module_says_what_to_run():
    with pytest.raises(netsurgeon.errors.MissingAnalysisError, match="netsurgeon.transform"):
        netsurgeon.report(fx.symbolic_trace(nn.Linear(2, 2)))


def test_failure_inside_a_pass_names_it_and_the_passes_before():
    @register_pass
    @dataclasses.dataclass
    class _Explode(Pass):
        name = "test_explode"
        summary = "raises"

        def run(self, gm, record, example_inputs):
            raise RuntimeError("boom")

    with pytest.raises(PassError) as err:
        netsurgeon.transform(_small(), ["strip_bn", "test_explode"])
    msg = str(err.value)
    assert "'test_explode' failed" in msg and "passes run before it: strip_bn" in msg and "boom" in msg


def test_dead_code_elimination_keeps_inplace_ops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            y.add_(1.0)  # result unused: plain fx DCE would drop it
            return y

    m = M()
    gm = netsurgeon.transform(m, ["strip_bn"])
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(gm(x), m(x))


def test_functional_dropout_in_root_follows_mode():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return torch.nn.functional.dropout(self.fc(x), p=0.5, training=self.training)

    gm = netsurgeon.trace(M())
    x = torch.randn(4, 16)
    gm.eval()
    torch.testing.assert_close(gm(x), gm.fc(x))
    gm.train()
    assert (gm(x) == 0).any()
    assert gm.meta["netsurgeon"]["trace"].mode_dropouts


def test_mode_dependent_submodule_becomes_leaf_and_is_reported():
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if self.training:
                return self.fc(x)
            return self.fc(x) * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Cache()

        def forward(self, x):
            return self.block(x) + 1

    m = M()
    gm = netsurgeon.transform(m, [])
    assert "block" in gm.meta["netsurgeon"]["trace"].auto_leaves
    assert "block" in " ".join(netsurgeon.report(gm).trace_notes)
    x = torch.randn(2, 4)
    for mode in (True, False):
        m.train(mode), gm.train(mode)
        torch.testing.assert_close(gm(x), m(x))


def test_mode_dependent_root_raises_trace_error():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if self.training else self.fc(x) * 2

    with pytest.raises(netsurgeon.TraceError, match="own forward behaves differently"):
        netsurgeon.trace(M())


def test_unknown_op_reported_by_name_with_hint():
    class M(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    topo = netsurgeon.topology(M())
    assert [u.node for u in topo.unknown] == ["cumsum"]
    assert "register_function" in topo.unknown[0].hint
    assert "unrecognised ops (1)" in topo.summary()


def test_timm_resnet_residual_blocks_and_composites_visible():
    topo = netsurgeon.topology(timm.create_model("resnet50"))
    blocks = topo.residual_blocks()
    assert len(blocks) == 16 and sum(b.shortcut_kind == "projection" for b in blocks) == 4
    assert [len(b.branch_layers[0]) for b in blocks] == [3] * 16
    v2 = netsurgeon.topology(timm.create_model("resnetv2_50"))
    assert v2.norms() == {"batch+relu": 49}  # BatchNormAct2d kept whole, activation visible
    dn = netsurgeon.topology(timm.create_model("densenet121"))
    assert sum(b.kind == "concat" for b in dn.blocks) >= 58


@pytest.mark.parametrize("name, kw, n_blocks, layers_first, proj", [
    ("resnet18", {}, 8, ["layer1_0_conv1", "layer1_0_conv2"], 3),  # basic blocks
    ("resnetv2_50", {}, 16, ["stages_0_blocks_0_conv1", "stages_0_blocks_0_conv2", "stages_0_blocks_0_conv3"], 4),
    ("efficientnet_b0", {}, 9, ["blocks_1_1_conv_pw", "blocks_1_1_conv_dw", "blocks_1_1_se_conv_reduce",
                                "blocks_1_1_se_conv_expand", "blocks_1_1_conv_pwl"], 0),  # MBConv with SE
    ("convnext_atto", {}, 12, ["stages_0_blocks_0_conv_dw", "stages_0_blocks_0_mlp_fc1",
                               "stages_0_blocks_0_mlp_fc2"], 0),
    ("vit_tiny_patch16_224", {"img_size": 64}, 24, ["blocks_0_attn_qkv", "blocks_0_attn_proj"], 0),
])
def test_residual_blocks_per_family(name, kw, n_blocks, layers_first, proj):
    topo = netsurgeon.topology(timm.create_model(name, **kw))
    blocks = topo.residual_blocks()
    assert len(blocks) == n_blocks
    assert blocks[0].branch_layers[0] == layers_first
    assert sum(b.shortcut_kind == "projection" for b in blocks) == proj
    if name.startswith("vit"):  # attention and MLP residuals alternate
        assert blocks[1].branch_layers[0] == ["blocks_0_mlp_fc1", "blocks_0_mlp_fc2"]
        assert blocks[0].shortcut == [] and blocks[1].entry == blocks[0].merge
