"""Smoke run of benchmarks/train_deep.py (--quick) for both network families.

Runs all four configurations (reference, vanilla, vanilla+dks, vanilla+tat) by name, so it
fails, not skips, when the ``dks`` or ``tat`` pass is missing. Needs the datasets: without
them it fails with the DataNotFoundError message unless NETSURGEON_SKIP_DATA=1 is set.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_benchmark, require_data


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_deep.py"


def _load_script():
    return load_benchmark("train_deep")


@pytest.mark.timeout(120)
def test_train_deep_quick(tmp_path: Path) -> None:
    require_data()
    td = _load_script()
    out = td.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])

    for name in ("mlp_sgd.png", "mlp_adam.png", "conv_sgd.png", "conv_adam.png", "train_deep.json", "train_deep.md"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert set(out["rows"]) == {"mlp", "conv"}
    for family, rows in out["rows"].items():
        for opt in ("sgd", "adam"):
            configs = [r["configuration"] for r in rows if r["optimizer"] == opt]
            assert configs == ["reference", "vanilla", "vanilla+dks", "vanilla+tat"], (family, opt, configs)
        for r in rows:
            assert r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), (family, r)

    record = json.loads((tmp_path / "train_deep.json").read_text())
    for family in ("mlp", "conv"):
        for opt, configs in record["families"][family]["configs"].items():
            for config, res in configs.items():
                runs = [run for rs in res["runs"].values() for run in rs]
                assert runs and all(math.isfinite(v) for run in runs for v in run["train_loss"]), (family, opt, config)
    md = (tmp_path / "train_deep.md").read_text()
    for config in ("reference", "vanilla", "vanilla+dks", "vanilla+tat"):
        assert f"| {config} |" in md
