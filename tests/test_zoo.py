"""Tracing, train/eval fidelity and strip_bn on 50+ timm architectures."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon import TraceError

from conftest import count_batch_norms, randomize_norm_stats, rel_diff
from harness.broad_zoo import max_rel, train_eval_outputs
from zoo import ZOO, Case


def _build(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norm_stats(timm.create_model(case.name, pretrained=False, **case.kwargs))


def _x(case: Case, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, case.size, case.size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_zoo_is_large_and_diverse():
    assert len(ZOO) >= 40
    families = {"resnet", "resnetv2", "densenet", "efficientnet", "mobilenetv3", "regnet", "convnext", "vit",
                "deit", "mixer", "nf_", "repvgg", "dla", "csp", "inception", "vgg", "wide_resnet", "resnet26d"}
    names = " ".join(c.name for c in ZOO)
    assert all(f in names for f in families), [f for f in families if f not in names]


@pytest.mark.parametrize("case", ZOO, ids=str)
def test_trace_matches_eager_in_train_and_eval(case: Case):
    model = _build(case)
    gm = netsurgeon.trace(model, leaf_modules=case.leaf_modules)
    x = _x(case)
    outs = {}
    for mode, (ref, got) in train_eval_outputs(model, gm, x).items():
        assert max_rel(ref, got) <= 1e-6, f"{case.name} train={mode}"
        outs[mode] = got
    if count_batch_norms(model):  # the modes must really differ, or this test could not fail
        assert not torch.allclose(outs[True], outs[False], atol=1e-3)
    topo = netsurgeon.topology(gm)
    assert topo.kind_counts()["conv"] + topo.kind_counts()["linear"] > 0


@pytest.mark.parametrize("case", ZOO, ids=str)
def test_strip_bn_fold_exact_and_remove(case: Case):
    model = _build(case).eval()
    before = count_batch_norms(model)
    x = _x(case)
    folded = netsurgeon.transform(model, [("strip_bn", {"mode": "fold"})], example_inputs=(x,),
                                  leaf_modules=case.leaf_modules).eval()
    assert count_batch_norms(model) == before  # input not mutated
    rep = netsurgeon.report(folded).passes[0]
    hidden = [s for s in rep.skipped if "opaque" in s.why]
    assert count_batch_norms(folded) == len(hidden), [s.node for s in rep.skipped]
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) <= 1e-5
    m64 = copy.deepcopy(model).double()
    f64 = netsurgeon.transform(m64, ["strip_bn"], example_inputs=(x.double(),), leaf_modules=case.leaf_modules).eval()
    with torch.no_grad():
        assert rel_diff(m64(x.double()), f64(x.double())) <= 1e-10
    removed = netsurgeon.transform(model, [("strip_bn", {"mode": "remove"})], leaf_modules=case.leaf_modules)
    assert count_batch_norms(removed) == len(hidden)
    changed = len(netsurgeon.report(removed).passes[0].changes)
    assert changed == before - len(hidden) or (before and changed > 0)
    with torch.no_grad():
        assert torch.isfinite(removed.eval()(x)).all()


class _ShapeHead(torch.nn.Module):
    """Branches on the input's size, like timm's vgg ConvMlp."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < 3:
            x = torch.nn.functional.adaptive_avg_pool2d(x, 3)
        return self.fc(x)


class _ShapeNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = torch.nn.Conv2d(3, 4, 1), _ShapeHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


def test_untraceable_model_names_module_line_and_remedy():
    with pytest.raises(TraceError) as err:
        netsurgeon.trace(_ShapeNet())
    msg = str(err.value)
    assert "'head'" in msg and "_ShapeHead" in msg
    assert "test_zoo.py" in msg and "x.shape[-2] < 3" in msg  # the offending line
    assert "pass example_inputs" in msg and "leaf_modules=['head']" in msg  # the remedies


def test_control_flow_on_shapes_is_decided_on_example_inputs():
    model = _ShapeNet().eval()
    for size, branch in ((2, True), (8, False)):
        x = torch.randn(2, 3, size, size)
        gm = netsurgeon.transform(model, [], example_inputs=x)
        specialized = gm.meta["netsurgeon"]["trace"].specialized
        assert len(specialized) == 1 and specialized[0].endswith(f"-> {branch}") and "x.shape[-2] < 3" in specialized[0]
        assert "control flow decided" in str(netsurgeon.report(gm))
        torch.testing.assert_close(gm(x), model(x))
    # timm's vgg traces without leaves now: the branch is decided on its default input size
    vgg = timm.create_model("vgg11_bn", pretrained=False, mlp_ratio=0.125).eval()
    gm = netsurgeon.trace(vgg)
    assert any("input_kernel_size" in d for d in gm.meta["netsurgeon"]["trace"].specialized)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(gm(x), vgg(x))

def test_deciding_control_flow_leaves_the_model_untouched():
    """The train-mode trace runs the graph so far on the example inputs: no statistics may change."""
    vgg = timm.create_model("vgg11_bn", pretrained=False, mlp_ratio=0.125)
    before = {k: v.clone() for k, v in vgg.state_dict().items()}
    netsurgeon.trace(vgg, torch.randn(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in vgg.state_dict().items())


class _NumpyHead(nn.Module):
    def forward(self, x):  # numpy on traced values: fails under fx, not control flow
        return x + torch.from_numpy(x.detach().numpy().copy())


class _WithNumpyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 1), _NumpyHead()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def test_a_submodule_that_fails_to_trace_becomes_a_named_leaf():
    model = _WithNumpyHead().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = netsurgeon.transform(model, [], example_inputs=x)
    leaves = gm.meta["netsurgeon"]["trace"].untraceable_leaves
    assert len(leaves) == 1 and leaves[0].startswith("head (_NumpyHead): ")
    assert "kept as leaves because tracing failed inside them" in str(netsurgeon.report(gm))
    torch.testing.assert_close(gm(x), model(x))
