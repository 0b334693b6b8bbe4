"""The broad zoo (issue 16): every step on real architectures chosen by a rule.

The selection and the steps live in ``benchmarks/harness/broad_zoo.py``; the full table is
``docs/coverage.md`` (``python benchmarks/zoo_coverage.py``). Here: the selection is what its rule
gives and is broad, a fast subset runs in the default suite, and every model runs under
``-m slow``, where a crash (an exception that is not a ``NetsurgeonError``) fails.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import netsurgeon
from harness.broad_zoo import (HUGGING_FACE, SELECTION_FILE, STEPS, TORCHVISION, ZooModel, all_models,
                               load_selection, run_model, select_timm)

ROOT = Path(__file__).resolve().parent.parent
# the four smallest timm models of the selection and one Hugging Face model: every step, every run
FAST = [m for m in sorted(load_selection(), key=lambda m: m.params)[:4]] + [ZooModel("hf", "gpt2", size=16)]


def _needs(m: ZooModel) -> None:
    if m.source == "hf":
        pytest.importorskip("transformers", reason="Hugging Face models need the 'hf' extra (transformers)")


def test_selection_is_broad():
    models = all_models()
    timm_models = [m for m in models if m.source == "timm"]
    assert len(timm_models) >= 100
    assert len({m.name for m in timm_models}) == len(timm_models)
    assert {m.name for m in models if m.source == "torchvision"} == set(TORCHVISION)
    assert {m.name for m in models if m.source == "hf"} == set(HUGGING_FACE)


@pytest.mark.slow
def test_selection_is_what_the_rule_gives():
    import timm

    saved = json.loads(SELECTION_FILE.read_text())
    if saved["timm"] != timm.__version__:
        pytest.skip(f"selection saved with timm {saved['timm']}, installed {timm.__version__}: rerun "
                    f"python benchmarks/zoo_coverage.py --select")
    assert [m.name for m in select_timm()] == [m["name"] for m in saved["models"]]


def _check(m: ZooModel) -> dict:
    r = run_model(m)
    crashes = {s: f"{v.status}: {v.cause}" for s, v in r.steps.items() if v.status in ("crash", "wrong")}
    assert not crashes, f"{m}: {crashes}"
    assert set(r.steps) == set(STEPS)
    return r


@pytest.mark.parametrize("m", FAST, ids=str)
def test_fast_subset(m: ZooModel):
    _needs(m)
    r = _check(m)
    assert r.steps["trace"].status == "ok", r.steps["trace"].cause
    assert r.steps["analyze"].status == "ok", r.steps["analyze"].cause
    if not r.has_attention:
        pipelines = [r.steps[s] for s in ("pipeline_remove_skips", "pipeline_normalize_sums")]
        assert any(p.status == "ok" for p in pipelines), [p.cause for p in pipelines]


@pytest.mark.slow
@pytest.mark.parametrize("m", all_models(), ids=str)
def test_every_model_ok_or_refused_by_name(m: ZooModel):
    _needs(m)
    r = _check(m)
    for s, v in r.steps.items():
        if v.status == "refused":
            assert len(v.cause) > len(type(v).__name__) + 10, f"{m} {s}: refusal without a cause"


def test_coverage_doc_is_the_scripts_output():
    """docs/coverage.md is written from results.json by the script, with every model in a row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import zoo_coverage as cov

    results = json.loads(cov.OUT_JSON.read_text())
    doc = cov.OUT_MD.read_text()
    for m in all_models():
        assert f"| {m} |" in doc, m
    for row, (n, d) in cov.summary(results, all_models()).items():
        assert f"| {row} | {cov._pct(n, d)} |" in doc, row


def test_an_exception_escaping_a_pass_counts_as_a_crash_not_a_refusal():
    """A pass wraps whatever escapes it in PassError (a NetsurgeonError); the harness looks inside."""
    from harness.broad_zoo import _run_step

    class _Boom(netsurgeon.Pass):
        name = "_boom_for_test"

        def run(self, gm, record, example_inputs):
            raise ZeroDivisionError("float division by zero")

    def step(model, x):
        netsurgeon.transform(model, [_Boom()], example_inputs=x)

    got = _run_step(step, torch.nn.Linear(2, 2), torch.randn(1, 2))
    assert got.status == "crash" and "ZeroDivisionError" in got.cause

    def refusing(model, x):
        netsurgeon.transform(model, [("input_norm", {"dim": 7})], example_inputs=x)
    assert _run_step(refusing, torch.nn.Linear(2, 2), torch.randn(1, 2)).status == "refused"


def test_an_attention_site_the_pass_did_not_shape_is_a_wrong_result(monkeypatch):
    """``verify_attention`` checks that every attention site left in the graph was reported as skipped
    (cross-attention): a site the pass did not see, beside shaped ones, is a wrong result, not an ``ok``."""
    import torch.nn as nn
    import torch.nn.functional as F
    import netsurgeon.passes.attention as attention
    from harness.broad_zoo import VerificationError, verify_attention

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 48), nn.Linear(16, 48)

        def forward(self, x):
            for qkv in (self.a, self.b):
                q, k, v = qkv(x).chunk(3, dim=-1)
                x = F.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
            return x

    x = torch.randn(2, 6, 16)
    verify_attention(netsurgeon.transform(Two(), ["attention_shaping"], example_inputs=(x,)).eval(), x)
    find = attention.find_attention
    monkeypatch.setattr(attention, "find_attention", lambda gm: (lambda s, p, l: (s[:1], p, l))(*find(gm)))
    gm = netsurgeon.transform(Two(), ["attention_shaping"], example_inputs=(x,))
    monkeypatch.undo()
    with pytest.raises(VerificationError, match="was not shaped"):
        verify_attention(gm.eval(), x)
