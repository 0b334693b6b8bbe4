"""Smoke run of benchmarks/train_transformer.py (--quick) for both tasks, and its Shakespeare loader.

Runs all five configurations (pre-ln, nf+shaped+tat, vanilla+shaped+tat, value-skipinit, vanilla) by
name, so it fails, not skips, when a pass they use (``attention_shaping``, ``tat``, ...) is missing or
refuses the model. The training runs need the datasets: without them a test is skipped with the reason
where it reaches them (conftest.require_data), or fails when NETSURGEON_REQUIRE_DATA=1.
"""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, require_data

from harness.text import CharVocab, char_windows, load_char_splits, load_text
from netsurgeon.errors import DataFormatError, DataNotFoundError, InvalidArgumentError

CONFIGS = ["pre-ln", "nf+shaped+tat", "vanilla+shaped+tat", "value-skipinit", "vanilla"]


def _require_shakespeare() -> Path:
    return require_data(("shakespeare/train.txt.gz", "shakespeare/test.txt.gz"))


@pytest.mark.timeout(120)
@pytest.mark.needs_data
def test_train_transformer_quick(tmp_path: Path) -> None:
    _require_shakespeare()
    tt = load_benchmark("train_transformer")
    assert list(tt.CONFIGS) == CONFIGS
    out = tt.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path), "--configs", *CONFIGS])

    for name in ("lm.png", "vit.png", "train_transformer.json", "train_transformer.md"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert set(out["rows"]) == {"lm", "vit"}
    for task, rows in out["rows"].items():
        assert [r["configuration"] for r in rows] == CONFIGS, (task, rows)
        for r in rows:
            assert r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), (task, r)
            assert all(v is not None and math.isfinite(v) for v in r["_tests"]), (task, r)

    record = json.loads((tmp_path / "train_transformer.json").read_text())
    for task in ("lm", "vit"):
        configs = record["tasks"][task]["configs"]
        assert list(configs) == CONFIGS and not record["tasks"][task]["refused"]
        for config, res in configs.items():
            runs = res["runs"] + [run for rs in res["sweep_runs"].values() for run in rs]
            assert runs and all(math.isfinite(v) for run in runs for v in run["train_loss"]), (task, config)
            names = [p if isinstance(p, str) else p[0] for p in res["passes"]]
            assert ("attention_shaping" in names) == ("shaped" in config or config == "value-skipinit"), names
            if config != "pre-ln":  # the transform ran and reported every pass
                assert [p["name"] for p in res["transform_report"]["passes"]] == names
        assert configs["vanilla"]["total_steps"] == 3 * configs["pre-ln"]["total_steps"]
    md = (tmp_path / "train_transformer.md").read_text()
    for config in CONFIGS:
        assert f"| {config} |" in md, config
    assert "test bits/char" in md and "test acc" in md


@pytest.mark.timeout(120)
@pytest.mark.needs_data
def test_train_transformer_quick_with_kfac_and_its_cache(tmp_path: Path) -> None:
    """--kfac CONFIG: that configuration trains with K-FAC (true Fisher over the LM's per-character
    predictions), the reference keeps Adam; K-FAC runs are cached like Adam's (the optimizer's options are
    in the key), so a second run reads every run back."""
    _require_shakespeare()
    tt = load_benchmark("train_transformer")
    argv = ["--quick", "--task", "lm", "--threads", "1", "--configs", "pre-ln", "vanilla+shaped+tat",
            "--kfac", "vanilla+shaped+tat", "--kfac-lrs", "0.001", "--cache-dir", str(tmp_path / "cache")]
    first = tt.main(argv + ["--out-dir", str(tmp_path / "a")])["rows"]["lm"]
    assert [r["configuration"] for r in first] == ["pre-ln", "vanilla+shaped+tat [K-FAC]"]
    for r in first:
        assert r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), r
    record = json.loads((tmp_path / "a" / "train_transformer.json").read_text())
    runs = record["tasks"]["lm"]["configs"]["vanilla+shaped+tat"]["runs"]
    assert {run["optimizer"] for run in runs} == {"kfac"}
    assert "train with netsurgeon's K-FAC" in (tmp_path / "a" / "train_transformer.md").read_text()
    cached = sorted((tmp_path / "cache").glob("*.json"))
    second = tt.main(argv + ["--out-dir", str(tmp_path / "b")])["rows"]["lm"]
    assert sorted((tmp_path / "cache").glob("*.json")) == cached  # nothing trained again
    assert [r["_losses"] for r in second] == [r["_losses"] for r in first]


def test_bad_options_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    tt = load_benchmark("train_transformer")
    for bad in (["--configs", "post-ln"], ["--task", "mlp"], ["--horizon", "0.5"], ["--width", "30", "--heads", "4"],
                ["--set", "tat"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            tt.main(["--quick", "--out-dir", str(tmp_path), *bad])
    assert not any(tmp_path.iterdir())


def test_pipelines_by_name() -> None:
    tt = load_benchmark("train_transformer")
    assert tt.pipeline("pre-ln", 0) == []
    assert tt.pipeline("nf+shaped+tat", 2) == ["remove_norms", "normalize_sums", "input_norm",
                                               ("orthogonal_init", {"seed": 2}), "attention_shaping", "tat"]
    assert tt.pipeline("value-skipinit", 0, options={"tat": {"tau": 0.1}})[-2:] == [
        ("attention_shaping", {"mode": "value-skipinit"}), ("tat", {"tau": 0.1})]
    assert "attention_shaping" not in str(tt.pipeline("vanilla+shaped+tat", 0, drop=["attention_shaping"]))


# ---------------------------------------------------------------- the Shakespeare loader
def test_vocab_and_windows() -> None:
    v = CharVocab.from_text("hello world\n")
    assert v.chars == "\n dehlorw" and v.size == 10 and v.unknown_id == 9
    ids = v.encode("hold é!")
    assert ids.dtype == torch.int64 and ids.tolist()[-2:] == [9, 9]  # é and ! are not in the vocabulary
    assert v.decode(v.encode("world")) == "world"
    x, y = char_windows(torch.arange(11), 5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and y.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    with pytest.raises(InvalidArgumentError):
        char_windows(torch.arange(3), 5)


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="train.txt.gz"):
        load_text("train", root=tmp_path)
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "train.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(DataFormatError, match="gzip"):
        load_text("train", root=tmp_path)
    with gzip.open(tmp_path / "shakespeare" / "test.txt.gz", "wt", encoding="utf-8") as f:
        f.write("")
    with pytest.raises(DataFormatError, match="empty"):
        load_text("test", root=tmp_path)
    with pytest.raises(InvalidArgumentError, match="split"):
        load_text("val", root=tmp_path)


@pytest.mark.needs_data
def test_shakespeare_splits() -> None:
    root = _require_shakespeare()
    before = sorted(p.name for p in (root / "shakespeare").iterdir())
    (x, y, xt, yt), vocab = load_char_splits(128)
    assert vocab.size == 85 and len(vocab.chars) == 84  # README: 84 distinct characters in the train split
    assert x.shape == (36573, 128) and xt.shape == (2936, 128)  # (4,681,467 - 1) // 128, (375,814 - 1) // 128
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])
    assert int(xt.max()) < vocab.unknown_id  # the test split uses no character outside the train vocabulary
    (xs, _, _, _), _ = load_char_splits(64, train_subset=10, test_subset=5)
    (xs2, _, _, _), _ = load_char_splits(64, train_subset=10, test_subset=5)
    assert xs.shape == (10, 64) and torch.equal(xs, xs2)  # a fixed subset
    assert sorted(p.name for p in (root / "shakespeare").iterdir()) == before  # nothing written there
