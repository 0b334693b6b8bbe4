"""Smoke run of benchmarks/train_farkas.py (--quick): the four configurations (with and without
batch norm, with and without Farkas rows) train, report finite losses and land in the table, and
the Farkas models really contain FarkasLayer modules. Needs the CIFAR-10 subset (marker ``needs_data``):
without it the test is skipped with the reason, or fails when NETSURGEON_REQUIRE_DATA=1.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_benchmark

from netsurgeon.layers import FarkasLayer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_farkas.py"
CONFIGS = ["bn", "bn+farkas", "nobn", "nobn+farkas"]


def _load_script():
    return load_benchmark("train_farkas")


@pytest.mark.timeout(120)
@pytest.mark.needs_data
def test_train_farkas_quick(tmp_path: Path) -> None:
    tf = _load_script()
    out = tf.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])

    for name in ("train_loss.png", "test_acc.png", "train_farkas.json", "train_farkas.md"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert [r["configuration"] for r in out["rows"]] == CONFIGS
    for r in out["rows"]:
        assert r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), r
        assert r["Farkas layers"] == (8 if r["configuration"].endswith("+farkas") else 0), r
    md = (tmp_path / "train_farkas.md").read_text()
    results_table = md.split("| configuration | BN |", 1)[1].split("\n\n", 1)[0]
    assert [line.split("|")[1].strip() for line in results_table.splitlines()[2:]] == CONFIGS
    assert {r["network"] for r in out["overhead"]} == {"bn", "nobn", "timm resnet18 bn", "timm resnet18 nobn"}
    assert all(r["farkas / plain"] > 0 for r in out["overhead"])
    assert all(r["Farkas layers"] == 8 for r in out["overhead"] if r["network"].startswith("timm"))

    for config in ("bn+farkas", "nobn+farkas"):
        rec = out["records"][config]
        assert rec["farkas_layers"] == len(rec["changed"]) == 8, rec
        assert all(name.endswith("conv1") for name in rec["changed"]), rec["changed"]
        assert any("residual sum" in why or "add" in why for why in rec["skipped"].values()), rec["skipped"]
        model = tf.build_model(config)
        assert sum(isinstance(m, FarkasLayer) for m in model.modules()) == 8
    for config in ("bn", "nobn"):
        assert not any(isinstance(m, FarkasLayer) for m in tf.build_model(config).modules())

    record = json.loads((tmp_path / "train_farkas.json").read_text())
    assert list(record["configs"]) == CONFIGS
    for config, res in record["configs"].items():
        runs = [run for rs in res["sweep_runs"].values() for run in rs]
        assert runs and all(math.isfinite(v) for run in runs for v in run["train_loss"]), config


@pytest.mark.timeout(120)
@pytest.mark.needs_data
def test_train_farkas_quick_with_kfac(tmp_path: Path) -> None:
    """--optimizer kfac trains every configuration with K-FAC; a bad damping is refused before training."""
    tf = _load_script()
    out = tf.main(["--quick", "--optimizer", "kfac", "--kfac-damping", "0.1", "--threads", "1",
                   "--out-dir", str(tmp_path)])
    for r in out["rows"]:
        assert r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), r
    assert "steps of K-FAC (damping 0.1" in (tmp_path / "train_farkas.md").read_text()
    with pytest.raises(SystemExit):
        tf.main(["--quick", "--optimizer", "kfac", "--kfac-damping", "0", "--out-dir", str(tmp_path / "x")])
