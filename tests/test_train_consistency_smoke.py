"""Smoke run of benchmarks/train_consistency.py (--quick): parts a, b, c and the resnet18 cost.

Runs every configuration (relu, modulus, vanilla+tat) with every optimizer (sgd, adam, lm)
by name, so it fails, not skips, when the ``modulus``, ``tat`` or ``orthogonal_init`` pass or
``LayerwiseLM`` is missing. Needs the datasets (marker
``needs_data``): without them it is skipped with the reason, or fails when
NETSURGEON_REQUIRE_DATA=1 (tests/conftest.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_benchmark

EXPECTED = {"a": {("relu", "sgd"), ("relu", "adam"), ("relu", "lm")},
            "b": {(c, o) for c in ("relu", "modulus") for o in ("sgd", "adam", "lm")},
            "c": {("vanilla+tat", "sgd"), ("vanilla+tat", "lm")}}


@pytest.mark.timeout(120)
@pytest.mark.needs_data
def test_train_consistency_quick(tmp_path: Path) -> None:
    tc = load_benchmark("train_consistency")
    out = tc.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])

    for name in ("a.png", "b.png", "c.png", "train_consistency.json", "train_consistency.md"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert set(out["rows"]) == set(EXPECTED)
    for part, rows in out["rows"].items():
        assert {(r["configuration"], r["optimizer"]) for r in rows} == EXPECTED[part], part
        for r in rows:
            assert r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), (part, r)

    record = json.loads((tmp_path / "train_consistency.json").read_text())
    assert {"command", "environment", "seeds", "lm_options", "parts", "cost", "goal_check", "partial"} <= set(record)
    assert record["partial"] is False
    for part, expected in EXPECTED.items():
        res = record["parts"][part]
        assert {"settings", "wall_time_s", "rows", "grid", "runs"} <= set(res)
        assert {(c, o) for c, by_o in res["runs"].items() for o in by_o} == expected
        runs = [run for by_o in res["runs"].values() for by_lr in by_o.values() for rs in by_lr.values() for run in rs]
        assert runs and all(math.isfinite(v) for run in runs for v in run["train_loss"]), part
    cost = record["cost"]["variants"]
    assert {"sgd", "adam", "lm (chunk 128)", "lm (no chunks)"} == set(cost)
    assert all(v["amortized_step_s"] > 0 and math.isfinite(v["ratio_amortized"]) for v in cost.values())
    checks = record["goal_check"]
    assert any(c["goal"] and c["check"].startswith("(a)") for c in checks)
    assert any(c["goal"] and c["check"].startswith("(cost)") for c in checks)
    assert all(c["met"] in (True, False) for c in checks)
    md = (tmp_path / "train_consistency.md").read_text()
    assert "Goal check" in md and all(f"| {c} |" in md for c in ("relu", "modulus", "vanilla+tat"))
