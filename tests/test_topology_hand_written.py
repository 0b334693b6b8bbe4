"""Hand-written regressions for tracing and the topology view: a two-branch add and a basic block,
the lightest residual and non-residual sums, an Inception-like concat with a projection block,
and a DenseNet-like concat with nested residual blocks. Each is built from a
``tests/topology_specs.py`` description and checked like the property tests
(``tests/test_topology_properties.py``), then spot-checked against values written out directly.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import netsurgeon

from topology_checks import check_blocks, check_counts, check_equivalence, check_exports, weight_nodes
from topology_models import _one_thread  # noqa: F401  (module-scoped autouse fixture)
from topology_models import build
from topology_specs import BranchAdd, Concat, Layer, ModelSpec, Residual

C = 6
HAND_WRITTEN = {
    # two parallel conv-bn-act-conv branches summed, then a ResNet basic block (identity shortcut)
    "two_branch_add": ModelSpec(C, (
        BranchAdd((Layer("conv3", C, C, True, "relu"), Layer("conv3", C, C)),
                  (Layer("conv1", C, C, True, "gelu"), Layer("conv1", C, C)), "+", "relu", marker=True),
        Residual((Layer("conv3", C, C, True, "relu"), Layer("conv3", C, C, True)), post_act="relu", marker=True,
                 shortcut_first=False),
    )),
    # the lightest non-residual sum: one activated conv per branch; then the lightest residual block
    "parallel_conv_act": ModelSpec(C, (
        BranchAdd((Layer("conv3", C, C, act="relu"),), (Layer("conv1", C, C, True, "tanh"),), "torch.add"),
        Residual((Layer("conv1", C, C),), marker=True),
        Residual((Layer("linear", C, 4, act="gelu"),), True, False, False, "method.add"),
    )),
    # Inception-like: 1x1 | 1x1 -> 3x3 | max-pool, concatenated; a projection block; a linear head
    "inception_concat": ModelSpec(C, (
        Concat((("layers", (Layer("conv1", C, 4, True, "relu"),)),
                ("layers", (Layer("conv1", C, 4, False, "relu"), Layer("conv3", 4, 5, True, "relu"))),
                ("pool", ()))),
        Residual((Layer("conv3", 15, 8, True, "relu"), Layer("conv3", 8, 8, True)), True, True, True,
                 "torch.add", "relu"),
    ), (5, None)),
    # DenseNet-like concat with the input itself, linear layers, functional activations, and a
    # residual block nested in another one's branch
    "dense_nested": ModelSpec(4, (
        Concat((("identity", ()), ("layers", (Layer("linear", 4, 4, act="F.relu"), Layer("conv3", 4, 4)))),
               marker=True),
        Layer("conv1", 8, C, True, "method.relu"),
        Residual((Layer("linear", C, C, act="torch.tanh"),
                  Residual((Layer("conv3", C, C, True, "relu"),), add_style="method.add", marker=True),
                  Layer("conv1", C, C, True)), marker=True),
    ), (3, "tanh")),
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written(name: str, tmp_path: Path) -> None:
    spec = HAND_WRITTEN[name]
    model, x = build(spec, 0)
    check_equivalence(model, x)
    topo = netsurgeon.topology(model, x)
    check_counts(spec, topo)
    check_blocks(spec, topo)
    check_exports(topo, tmp_path)


def test_hand_written_spot_values() -> None:
    """Values written out directly, independent of the checking helpers."""
    topo = netsurgeon.topology(*build(HAND_WRITTEN["two_branch_add"], 0))
    assert [b.kind for b in topo.blocks] == ["branch_merge", "residual"]
    merge, res = topo.blocks
    assert merge.entry == "body_0_inp"
    assert sorted([weight_nodes(topo, merge.shortcut)] + merge.branch_layers) == [
        ["body_0_left_0_weight", "body_0_left_1_weight"], ["body_0_right_0_weight", "body_0_right_1_weight"]]
    assert res.shortcut_kind == "identity" and res.shortcut == [] and res.entry == "body_1_inp"
    assert res.operands[0] == "body_1_inp"  # shortcut first even though the sum is branch + x
    assert res.branch_layers == [["body_1_branch_0_weight", "body_1_branch_1_weight"]]
    assert topo.kind_counts()["conv"] == 6 and topo.kind_counts()["add"] == 2

    model, x = build(HAND_WRITTEN["inception_concat"], 0)
    topo = netsurgeon.topology(model, x)
    assert [b.kind for b in topo.blocks] == ["concat", "residual"]
    cat, res = topo.blocks
    assert cat.entry == "x" and len(cat.operands) == 3
    assert topo.graph.nodes[cat.merge]["shape"] == (2, 15, 8, 8)
    assert res.shortcut_kind == "projection" and res.shortcut == ["body_1_proj", "body_1_proj_bn"]
    assert res.branch_layers == [["body_1_branch_0_weight", "body_1_branch_1_weight"]]
    assert len(topo.residual_blocks()) == 1

    topo = netsurgeon.topology(*build(HAND_WRITTEN["dense_nested"], 0))
    assert [b.kind for b in topo.blocks] == ["concat", "residual", "residual"]
    cat, inner, outer = topo.blocks
    assert cat.shortcut == [] and cat.operands[0] == "body_0_inp"
    assert inner.entry == "body_2_branch_1_inp" and inner.branch_layers == [["body_2_branch_1_branch_0_weight"]]
    assert outer.entry == "body_2_inp" and outer.shortcut_kind == "identity"
    assert outer.branch_layers == [["body_2_branch_0_weight", "body_2_branch_1_branch_0_weight",
                                    "body_2_branch_2_weight"]]
