"""Smoke run of benchmarks/train_deep.py (--quick) for both network families.

Runs all four configurations (reference, vanilla, vanilla+dks, vanilla+tat) by name, so it
fails, not skips, when the ``dks`` or ``tat`` pass is missing. The training runs
need the datasets: without them a test is skipped with the reason where it reaches them
(conftest.require_data), or fails when NETSURGEON_REQUIRE_DATA=1.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.nn as nn
from conftest import load_benchmark, require_data


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_deep.py"


def _load_script():
    return load_benchmark("train_deep")


@pytest.mark.timeout(120)
@pytest.mark.needs_data
def test_train_deep_quick(tmp_path: Path) -> None:
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


def test_shaping_options_reach_the_passes_and_are_validated(tmp_path: Path) -> None:
    """--zeta / --eta set the dks / tat options (checked on the built network's shaping);
    --optimizers restricts the run; out-of-range values are refused before any training."""
    import netsurgeon

    td = _load_script()
    for zeta in (1.5, 3.0):
        gm = td.make_model_fn("mlp", "vanilla+dks", td.Shaping(zeta=zeta))(0)
        a = netsurgeon.analyze(gm)
        out = [n for n in a.kernels][-1]
        assert a.c_slope_1(out) == pytest.approx(zeta, rel=1e-4)
    for eta in (0.9, 0.7):
        gm = td.make_model_fn("mlp", "vanilla+tat", td.Shaping(eta=eta))(0)
        a = netsurgeon.analyze(gm)
        assert float(a.cmap([n for n in a.kernels][-1])(0.0)) == pytest.approx(eta, abs=2e-3)
    for bad in (["--zeta", "1"], ["--eta", "1.2"], ["--optimizers", "lbfgs"]):
        with pytest.raises(SystemExit):
            td.main(["--quick", "--out-dir", str(tmp_path), *bad])
    assert not any(tmp_path.iterdir())  # refused before writing anything

    require_data()
    out = td.main(["--quick", "--only", "conv", "--optimizers", "sgd", "--zeta", "2", "--configs", "reference",
                   "vanilla+dks", "--threads", "1", "--out-dir", str(tmp_path)])
    assert {r["optimizer"] for r in out["rows"]["conv"]} == {"sgd"}
    record = json.loads((tmp_path / "train_deep.json").read_text())
    assert record["zeta"] == 2 and "dks zeta 2, tat eta 0.9, delta orthogonal convs" in out["markdown"]
    full = td.make_model_fn("conv", "vanilla+dks", td.Shaping(conv_init="full"))(0)
    stem = [m for m in full.modules() if isinstance(m, nn.Conv2d)][0].weight.detach()
    assert float(stem[:, :, 0, 0].abs().max()) > 0  # the whole window, not the centre tap only


def test_conv_widths_option_builds_that_network_and_is_recorded(tmp_path: Path) -> None:
    """--conv-widths sets the CNN's stage widths for every configuration (the reference's
    projection shortcuts included); bad widths are refused before anything is written."""
    td = _load_script()
    for config in ("reference", "vanilla", "vanilla+dks"):
        net = td.make_model_fn("conv", config, td.Shaping(), conv_widths=(8, 12, 20))(0)
        outs = sorted({m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)})
        assert outs == [8, 12, 20], (config, outs)
        assert [m for m in net.modules() if isinstance(m, nn.Linear)][-1].in_features == 20
    with pytest.raises(ValueError, match="conv_widths"):
        td.build_network("conv", "relu", residual=False, conv_widths=(8, 16))
    for bad in (["--conv-widths", "8", "0", "16"], ["--conv-widths", "8", "16"]):
        with pytest.raises(SystemExit):
            td.main(["--quick", "--out-dir", str(tmp_path), *bad])
    assert not any(tmp_path.iterdir())

    require_data()
    out = td.main(["--quick", "--only", "conv", "--optimizers", "adam", "--configs", "reference", "vanilla+dks",
                   "--conv-widths", "8", "12", "20", "--threads", "1", "--out-dir", str(tmp_path)])
    assert "21-conv CNN, widths 8/12/20" in out["markdown"]
    record = json.loads((tmp_path / "train_deep.json").read_text())
    assert record["conv_widths"] == [8, 12, 20]
    for config in ("reference", "vanilla+dks"):  # the trained networks are the narrow ones
        want = sum(p.numel() for p in td.make_model_fn("conv", config, conv_widths=(8, 12, 20))(0).parameters())
        default = sum(p.numel() for p in td.make_model_fn("conv", config)(0).parameters())
        runs = [r for rs in record["families"]["conv"]["configs"]["adam"][config]["runs"].values() for r in rs]
        assert runs and all(r["num_params"] == want != default for r in runs), config


def test_lm_optimizer_option_trains_with_layerwise_lm(tmp_path: Path) -> None:
    """--optimizers lm runs the configurations with netsurgeon's LayerwiseLM (LM_OPTIONS);
    sgd/adam stay the default and are passed to harness.train_run by name."""
    from harness import ModelOptimizer
    from netsurgeon.optim import LayerwiseLM

    td = _load_script()
    assert td.optimizer_spec("sgd") == "sgd" and td.optimizer_spec("adam") == "adam"
    spec = td.optimizer_spec("lm")
    assert isinstance(spec, ModelOptimizer)
    opt = spec(nn.Sequential(nn.Linear(4, 3)), 0.01)
    assert isinstance(opt, LayerwiseLM) and opt.defaults["lr"] == 0.01
    for key in ("damping", "ema", "momentum"):
        assert opt.defaults[key] == td.LM_OPTIONS[key], key
    assert opt.update_every == td.LM_OPTIONS["update_every"]
    assert td.OPTIMIZERS == ("sgd", "adam")

    require_data()
    out = td.main(["--quick", "--only", "conv", "--optimizers", "lm", "--configs", "reference", "vanilla+dks",
                   "--threads", "1", "--out-dir", str(tmp_path)])
    rows = out["rows"]["conv"]
    assert [(r["optimizer"], r["configuration"]) for r in rows] == [("lm", "reference"), ("lm", "vanilla+dks")]
    assert all(math.isfinite(v) for r in rows for v in r["_losses"])
    assert "LayerwiseLM [0.003]" in out["markdown"] and (tmp_path / "conv_lm.png").is_file()
    record = json.loads((tmp_path / "train_deep.json").read_text())
    assert set(record["families"]["conv"]["configs"]) == {"lm"}


@pytest.mark.timeout(120)
@pytest.mark.needs_data
def test_train_deep_quick_with_kfac(tmp_path: Path) -> None:
    """--optimizers kfac: the damping grid is crossed with the lr grid and the selected damping is shown;
    with two optimizers every row is also measured against the best reference."""
    td = _load_script()
    out = td.main(["--quick", "--only", "conv", "--configs", "reference", "vanilla+tat", "--optimizers", "sgd", "kfac",
                   "--lrs-kfac", "0.001", "--dampings-kfac", "0.1", "1.0", "--threads", "1", "--out-dir", str(tmp_path)])
    rows = out["rows"]["conv"]
    kfac = [r for r in rows if r["optimizer"] == "kfac"]
    assert [r["configuration"] for r in kfac] == ["reference", "vanilla+tat"]
    for r in kfac:
        assert ", λ " in r["lr"] and r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), r
    best_cols = [c for c in rows[0] if c.startswith("steps to best ref.")]
    assert len(best_cols) == 1 and all(r[best_cols[0]] for r in rows)
    assert all(r["_versus_best"]["reference_optimizer"] in ("sgd", "kfac") for r in rows)
    record = json.loads((tmp_path / "train_deep.json").read_text())
    res = record["families"]["conv"]["configs"]["kfac"]["vanilla+tat"]
    assert set(res["damping_scores_at_S"]) == {"0.1", "1.0"} and res["damping"] in (0.1, 1.0)
    assert len(res["other_damping_runs"]) == 1  # the damping not selected keeps its runs too
    assert "best reference: the reference with" in (tmp_path / "train_deep.md").read_text()


@pytest.mark.timeout(180)
@pytest.mark.needs_data
def test_train_deep_quick_with_heavyball(tmp_path: Path) -> None:
    """--optimizers soap psgd: heavyball's SOAP and PSGDKron (the 'bench' extra, in 'dev') train the
    reference and a shaped network."""
    pytest.importorskip("heavyball", reason="the optional 'bench' extra (heavyball) is not installed")
    td = _load_script()
    out = td.main(["--quick", "--only", "mlp", "--configs", "reference", "vanilla+tat", "--optimizers", "soap", "psgd",
                   "--threads", "1", "--out-dir", str(tmp_path)])
    rows = out["rows"]["mlp"]
    assert [(r["optimizer"], r["configuration"]) for r in rows] == [
        ("soap", "reference"), ("soap", "vanilla+tat"), ("psgd", "reference"), ("psgd", "vanilla+tat")]
    for r in rows:
        assert r["_losses"] and all(math.isfinite(v) for v in r["_losses"]), r
