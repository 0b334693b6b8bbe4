"""``benchmarks/kfac_cost.py`` in miniature: resnet18 at 32 px, one block of a 2-step period, two K-FAC
variants (blocks of 64 and of 32 units). Checks the rows and the JSON, not the times."""
from __future__ import annotations

import json

import kfac_cost


def test_kfac_cost_smoke(tmp_path, capsys):
    out = tmp_path / "kfac_cost.json"
    assert kfac_cost.main(["--sizes", "32", "--blocks", "1", "--period", "2", "--chunk-sizes", "64", "32",
                           "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["chunk_size"]) for r in rows] == [(32, 64), (32, 32)]
    for r in rows:
        assert len(r["sgd_steps"]) == len(r["kfac_steps"]) == 2
        assert r["ratio"] == r["kfac_s_per_step"] / r["sgd_s_per_step"] > 0
    assert "| 32 | 16 | 2 | 1 | 64 | factored |" in capsys.readouterr().out
