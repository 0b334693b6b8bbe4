"""Issue 16: after each completed DKS/TAT pipeline the conditions hold by measurement.

The models and the measurement are in ``benchmarks/harness/measured_models.py`` (a dozen families,
every shaped layer of width ≥ 256); ``benchmarks/measured_conditions.py`` writes the table of
docs/dks.md ("Conditions by measurement"). For each model, 16 seeds (model init, orthogonal_init and
input pairs) and, over them, the per-seed difference ``d = measured - predicted``:

* (a) q at the input and the output of every shaped activation: the prediction is 1 (the DKS
  condition; asserted on the analysis) and the measured mean is within 3 SE of it (plus
  ``Q_FLOOR``: the analysis neglects the norms' eps, 1e-6..1e-5);
* (b) the network C map at input cosines 0, 0.5, 0.9 against ``analyze(gm).cmap``: at the output
  of a flat network, at the body (per location, before the head's global pooling) of a network
  with locations, where it is also checked against the pass's own ``IdealGraph`` prediction. The
  pass's target is asserted on the prediction: C(0) = η (TReLU), C(0) = 0 (dks).

A row outside 3 SE is measured again on 16 more seeds and fails only if still outside over all 32:
with ~150 distinct quantities and the SE estimated from 16 seeds (a chance excursion beyond 3 SE has
probability 0.9% per quantity), a literal row-by-row criterion would fail by chance most of the time.

The dozen is ``slow``; three of them (an MLP under dks, a pre-activation ResNet under tat with
TReLU, a ConvNeXt with layer scale) run in the default suite. The known gaps, where the analysis'
rules do not describe the network (docs/dks.md), are strict xfails: each fails the measurement.
"""
from __future__ import annotations

import pytest
import torch

from harness.measured_models import C_FLOOR, COSINES, KNOWN_GAPS, MODELS, Q_FLOOR, check, pair_inputs

SEEDS = 16
FAST = ("mlp_tanh", "resnet_v2", "convnext_ls")


def _describe(name: str, rows) -> str:
    return "\n".join(f"  {name} {r.what}: predicted {r.predicted:.5f}, measured {r.measured:.5f} "
                     f"(mean d {r.diff:+.5f} ± {r.se:.5f}, z = {r.z:.1f})" for r in rows)


def _check(name: str) -> None:
    spec = MODELS.get(name) or KNOWN_GAPS[name]
    verdict = check(spec, SEEDS)
    res = verdict.first
    # by analysis: every shaped activation sees q = 1 and keeps it
    off = [r for r in res.q_rows() if abs(r.predicted - 1.0) > 1e-3]
    assert not off, "predicted q is not 1 at shaped nodes:\n" + _describe(name, off)
    # by analysis: the pass's target for the network C map (η for TReLU, 0 for dks)
    final, opts = spec.final
    c0 = [r for r in res.c_rows() if r.what.endswith("C(0)")]
    if final == "dks":
        assert all(abs(r.predicted) < 1e-3 for r in c0), _describe(name, c0)
    elif "eta" in opts:
        assert all(abs(r.predicted - opts["eta"]) < 1e-3 for r in c0), _describe(name, c0)
    # by measurement: q and the C map within 3 standard errors of the prediction (a row outside is
    # confirmed over twice the seeds, see harness.measured_models.check)
    assert not verdict.failures, (
        f"{len(verdict.failures)} condition(s) off by more than 3 SE over {2 * SEEDS} seeds (Q_FLOOR {Q_FLOOR:g}, "
        f"C_FLOOR {C_FLOOR:g}):\n" + _describe(name, verdict.failures)
        + f"\nover the first {SEEDS} seeds:\n" + _describe(name, verdict.flagged))


@pytest.mark.parametrize("name", FAST)
def test_conditions_hold_by_measurement_fast(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_conditions_hold_by_measurement(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                                                           reason=s.gap)) for n, s in
                                  KNOWN_GAPS.items()])
def test_known_gaps_fail_by_measurement(name):
    _check(name)


def test_the_dozen_is_wide_and_varied():
    assert len(MODELS) >= 12 and all(s.gap for s in KNOWN_GAPS.values())
    assert len({s.family for s in MODELS.values()}) >= 10
    assert {s.final[0] for s in MODELS.values()} == {"dks", "tat"}
    assert {s.middle[0] for s in MODELS.values()} == {"normalize_sums", "remove_skips"}
    assert set(FAST) <= set(MODELS)


@pytest.mark.parametrize("shape", [(256,), (8, 2, 2), (128, 8, 8)])
def test_pair_inputs_have_exact_cosines(shape):
    g = torch.Generator().manual_seed(0)
    ch = shape[0]
    for c in COSINES:
        x, x2 = (t.double().reshape(3, ch, -1) for t in pair_inputs(shape, c, 3, g))  # [pairs, channels, locations]
        # every location of both inputs: norm sqrt(channels); the pair's locations l and m: cosine c if l = m, else 0
        assert torch.allclose((x * x).sum(1), torch.full(x.shape[::2], float(ch), dtype=torch.float64), rtol=1e-5)
        assert torch.allclose((x2 * x2).sum(1), torch.full(x.shape[::2], float(ch), dtype=torch.float64), rtol=1e-5)
        eye = torch.eye(x.shape[2], dtype=torch.float64).expand(3, -1, -1)
        assert torch.allclose(torch.einsum("ncl,ncm->nlm", x, x2) / ch, c * eye, atol=1e-5)
        assert torch.allclose(torch.einsum("ncl,ncm->nlm", x, x) / ch, eye, atol=1e-5)
    with pytest.raises(ValueError, match="channels >= 2 x locations"):
        pair_inputs((3, 4, 4), 0.5, 1, g)
