"""Smoke run of benchmarks/train_identity.py (--quick): the six configurations (the batch-norm
reference, the BN-free network at default init and after identity_residual zero_last, skipinit,
fixup and hardt_ma) train with finite losses and land in the table, and the identity modes make
every residual block the identity at init. Needs the CIFAR-10 subset (marker ``needs_data``): without it
the test is skipped with the reason, or fails when NETSURGEON_REQUIRE_DATA=1.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_benchmark

from netsurgeon.layers.identity import FixedLinear, ScalarGate

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_identity.py"
CONFIGS = ["bn", "nobn", "nobn+zero_last", "nobn+skipinit", "nobn+fixup", "nobn+hardt_ma"]


def _load_script():
    return load_benchmark("train_identity")


@pytest.mark.timeout(120)
@pytest.mark.needs_data
def test_train_identity_quick(tmp_path: Path) -> None:
    ti = _load_script()
    out = ti.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])

    for name in ("train_loss.png", "test_acc.png", "train_identity.json", "train_identity.md"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert [r["configuration"] for r in out["rows"]] == CONFIGS
    for r in out["rows"]:
        assert r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), r
    md = (tmp_path / "train_identity.md").read_text()
    assert "Partial" not in md
    table = md.split("| configuration | BN |", 1)[1].split("\n\n", 1)[0]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == CONFIGS

    # identity at init: exact for zero_last, skipinit and fixup, nearly for hardt_ma, not at all by default
    shares = out["shares"]
    assert shares["nobn+zero_last"] == shares["nobn+skipinit"] == shares["nobn+fixup"] == 0.0, shares
    assert 0.0 < shares["nobn+hardt_ma"] < 0.05, shares
    assert shares["nobn"] > 0.05 and shares["bn"] > 0.05, shares
    for config in CONFIGS[2:]:
        rec = out["records"][config]
        assert not rec["skipped"] and len(rec["changed"]) >= 6, (config, rec)
    assert sum(isinstance(m, ScalarGate) for m in ti.build_model("nobn+skipinit").modules()) == 6
    assert any(isinstance(m, FixedLinear) for m in ti.build_model("nobn+hardt_ma").modules())

    record = json.loads((tmp_path / "train_identity.json").read_text())
    assert list(record["configs"]) == CONFIGS and record["partial"] is False
    for config, res in record["configs"].items():
        runs = [run for rs in res["sweep_runs"].values() for run in rs]
        assert runs and all(math.isfinite(v) for run in runs for v in run["train_loss"]), config


@pytest.mark.timeout(120)
@pytest.mark.needs_data
def test_train_identity_quick_with_kfac(tmp_path: Path) -> None:
    """--optimizer kfac: the sweep trains with netsurgeon's K-FAC (the table says so, the runs are K-FAC's)."""
    ti = _load_script()
    out = ti.main(["--quick", "--optimizer", "kfac", "--configs", "bn", "nobn+fixup", "--threads", "1",
                   "--out-dir", str(tmp_path)])
    assert [r["configuration"] for r in out["rows"]] == ["bn", "nobn+fixup"]
    for r in out["rows"]:
        assert r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), r
    assert "steps of K-FAC (damping 0.01" in (tmp_path / "train_identity.md").read_text()
    record = json.loads((tmp_path / "train_identity.json").read_text())
    runs = [run for res in record["configs"].values() for rs in res["sweep_runs"].values() for run in rs]
    assert runs and {run["optimizer"] for run in runs} == {"kfac"}
