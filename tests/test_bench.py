"""harness (benchmarks/harness): training runs, divergence, lr sweeps, and the result writers.

The Fashion-MNIST test (marker ``needs_data``) reads the datasets: without them it is
skipped with the reason, or fails when NETSURGEON_REQUIRE_DATA=1 (tests/conftest.py).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

from harness import (ModelOptimizer, RunResult, lr_sweep, plot_accuracy, plot_curves, run_record, save_json, smooth,
                     steps_to_loss, train_run, write_table_md)
from harness.data import load_dataset
from netsurgeon.errors import InvalidArgumentError
from netsurgeon.optim import LayerwiseLM


def mlp(seed: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


def toy_data(n: int = 512, d: int = 10, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Linearly separable 2-class data (train, test)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, d, generator=g)
    y = (x @ torch.randn(d, generator=g) > 0).long()
    return x[:n], y[:n], x[n:], y[n:]


def linear(seed: int) -> nn.Module:
    return nn.Linear(10, 2)


@pytest.mark.needs_data
def test_mlp_on_fashion_mnist_learns_and_is_reproducible():
    x, y = load_dataset("fashion_mnist", "train")
    xt, yt = load_dataset("fashion_mnist", "test")
    data = (x[:512], y[:512], xt[:1000], yt[:1000])
    rng = torch.get_rng_state()
    kw = dict(optimizer="sgd", lr=0.05, steps=30, batch_size=64, seed=0, eval_every=10)
    run = train_run(mlp, data, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert not run.diverged and run.steps_done == 30 and len(run.smoothed_loss) == 30
    first, last = sum(run.train_loss[:5]) / 5, sum(run.train_loss[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert run.eval_steps == [10, 20, 30] and len(run.test_acc) == len(run.test_loss) == 3
    assert run.final_test_acc > 0.5  # chance is 0.1
    assert len(run.step_time_s) == 30 and run.median_step_time_s > 0 and run.wall_time_s >= sum(run.step_time_s)
    assert run.num_params == 784 * 64 + 64 + 64 * 10 + 10 and run.optimizer == "sgd"
    assert train_run(mlp, data, **kw).train_loss == run.train_loss  # same seed, same run
    assert train_run(mlp, data, **{**kw, "seed": 1}).train_loss != run.train_loss


def test_huge_lr_is_marked_diverged_and_stops_early():
    run = train_run(linear, toy_data(), optimizer="sgd", lr=1e6, steps=50, batch_size=32, seed=0, eval_every=10)
    assert run.diverged and run.diverged_at is not None and run.diverged_at < 50
    assert run.steps_done == run.diverged_at == len(run.step_time_s)
    assert run.final_train_loss == float("inf") and run.final_test_acc is None


def test_custom_optimizer_adam_and_mse_loss():
    def plain_sgd(params, lr):
        return torch.optim.SGD(params, lr=lr)

    data = toy_data()
    assert train_run(linear, data, optimizer=plain_sgd, lr=0.1, steps=5, batch_size=32, seed=0,
                     eval_every=None).optimizer == "plain_sgd"
    assert not train_run(linear, data, optimizer="adam", lr=1e-2, steps=5, batch_size=32, seed=0, eval_every=0).diverged
    x, _, xt, _ = data
    reg = (x, x.sum(1, keepdim=True), xt, xt.sum(1, keepdim=True))
    run = train_run(lambda s: nn.Linear(10, 1), reg, optimizer="sgd", lr=0.02, steps=40, batch_size=64, seed=0,
                    eval_every=20, loss="mse")
    assert run.test_acc == [None, None] and run.test_loss[-1] < run.test_loss[0]
    with pytest.raises(InvalidArgumentError, match="optimizer='lbfgs'"):
        train_run(linear, data, optimizer="lbfgs", lr=0.1, steps=5, batch_size=32, seed=0, eval_every=None)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        train_run(linear, data, optimizer="sgd", lr=0.1, steps=5, batch_size=10_000, seed=0, eval_every=None)


def test_model_optimizer_gets_the_model():
    seen = []

    def factory(model, lr):
        seen.append(model)
        return torch.optim.SGD(model.parameters(), lr=lr)

    run = train_run(linear, toy_data(), optimizer=ModelOptimizer(factory, "mine"), lr=0.1, steps=3, batch_size=32,
                    seed=0, eval_every=None)
    assert run.optimizer == "mine" and len(seen) == 1 and isinstance(seen[0], nn.Linear)
    lm = ModelOptimizer(lambda model, lr: LayerwiseLM(model, lr=lr), "layerwise_lm")  # registers hooks on the model
    sweep = lr_sweep(linear, toy_data(), optimizer=lm, lrs=[0.01, 0.1], seeds=[0, 1], steps=40, batch_size=32,
                     eval_every=None)
    assert sweep.optimizer == "layerwise_lm" and sweep.best_lr is not None
    for r in sweep.best_runs:
        assert not r.diverged and sum(r.train_loss[-5:]) < 0.7 * sum(r.train_loss[:5])


def test_lr_sweep_picks_the_better_lr_and_excludes_diverged():
    sweep = lr_sweep(linear, toy_data(), optimizer="sgd", lrs=[1e-4, 0.1, 1e6], seeds=[0, 1], steps=40,
                     batch_size=32, eval_every=20)
    assert sweep.best_lr == 0.1 and not sweep.best_at_edge
    assert sweep.scores[1e6] is None and all(r.diverged for r in sweep.runs[1e6])
    assert sweep.scores[0.1] < sweep.scores[1e-4]
    assert [r.seed for r in sweep.best_runs] == [0, 1]
    rows = sweep.rows()
    assert [r["diverged"] for r in rows] == [0, 0, 2] and rows[1]["best"] and rows[2]["final_train_loss"] is None
    by_acc = lr_sweep(linear, toy_data(), optimizer="sgd", lrs=[1e-4, 0.1], seeds=[0], steps=40, batch_size=32,
                      eval_every=20, select_by="final_test_acc")
    assert by_acc.best_lr == 0.1 and by_acc.best_at_edge
    with pytest.raises(InvalidArgumentError, match="select_by"):
        lr_sweep(linear, toy_data(), optimizer="sgd", lrs=[0.1], seeds=[0], steps=2, batch_size=8,
                 eval_every=None, select_by="test_loss")


def test_steps_to_loss_and_smoothing():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no warm-up dip
    run = RunResult("sgd", 0.1, 0, 8, 4, smoothed_loss=[3.0, 2.0, 1.0, 0.5])
    assert steps_to_loss(run, 2.0) == 2 and steps_to_loss(run, 0.5) == 4 and steps_to_loss(run, 0.1) is None
    real = train_run(linear, toy_data(), optimizer="sgd", lr=0.1, steps=40, batch_size=32, seed=0, eval_every=None)
    target = real.smoothed_loss[-1]
    assert steps_to_loss(real, target) <= 40 and steps_to_loss(real, 0.0) is None


def test_write_table_md():
    md = write_table_md([{"lr": 0.1, "loss": 0.123456, "acc": None, "name": "a|b", "best": True}, {"lr": 1}],
                        ["lr", "loss", "acc", "name", "best"])
    assert md.splitlines() == ["| lr | loss | acc | name | best |", "|---|---|---|---|---|",
                               "| 0.1 | 0.1235 | – | a\\|b | yes |", "| 1 |  |  |  |  |"]


def test_plot_curves_writes_a_png(tmp_path):
    ok = [RunResult("sgd", 0.1, s, 8, 5, smoothed_loss=[2.0, 1.5, 1.0, 0.8, 0.7 + s / 10]) for s in range(3)]
    bad = [RunResult("sgd", 9.0, 0, 8, 5, smoothed_loss=[2.0, 50.0, float("nan")], diverged=True, diverged_at=3)]
    path = plot_curves({"sgd lr=0.1": ok, "sgd lr=9": bad}, tmp_path / "curves.png", "toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_accuracy_and_run_record(tmp_path):
    runs = [RunResult("sgd", 0.1, s, 8, 4, train_loss=[2.0, 1.234567891, 1.0, 0.9], eval_steps=[2, 4],
                      test_acc=[0.2, 0.3 + s / 100], test_loss=[2.0, 1.8], step_time_s=[0.1] * 4) for s in range(2)]
    bad = [RunResult("sgd", 9.0, 0, 8, 4, train_loss=[2.0, float("nan")], diverged=True, diverged_at=2)]
    path = plot_accuracy({"sgd lr=0.1": runs, "sgd lr=9": bad}, tmp_path / "acc.png", "toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    rec = run_record(runs[1])
    assert rec["train_loss"][1] == 1.2346 and rec["final_test_acc"] == 0.31 and rec["eval_steps"] == [2, 4]
    assert json.loads(json.dumps(rec))["train_loss"] == rec["train_loss"]  # JSON-ready


def test_save_json_is_atomic_and_strict(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "results.json"
    run = RunResult("sgd", 9.0, 0, 8, 5, train_loss=[1.0, float("nan")], diverged=True)
    save_json({"run": run, "t": torch.tensor([1.5]), "p": tmp_path}, path)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["run"]["train_loss"] == [1.0, None] and data["run"]["final_train_loss"] is None
    assert data["t"] == [1.5] and data["p"] == str(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    before = path.read_text()
    with pytest.raises(TypeError):
        save_json({"x": object()}, path)  # fails before anything is written

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_json({"new": 1}, path)
    assert path.read_text() == before and os.listdir(path.parent) == ["results.json"]  # no temp file left
    monkeypatch.undo()
    save_json({"new": 1}, path)
    assert json.loads(path.read_text()) == {"new": 1} and os.listdir(path.parent) == ["results.json"]


def test_run_cache_reads_back_the_same_run_and_keys_on_model_data_and_settings(tmp_path, monkeypatch):
    import harness.train as ht

    data = toy_data()
    kw = dict(optimizer="adam", lr=1e-2, steps=20, batch_size=32, seed=0, eval_every=10, cache=tmp_path)
    first = train_run(linear, data, **kw)
    assert len(list(tmp_path.glob("*.json"))) == 1
    calls = []
    real = ht._train
    monkeypatch.setattr(ht, "_train", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = train_run(linear, data, **kw)
    assert calls == [] and again == first  # read back, not trained
    train_run(linear, data, **{**kw, "lr": 2e-2})  # another setting: another run

    def shifted(seed: int) -> nn.Module:  # same class and seed, other weights: another run
        m = nn.Linear(10, 2)
        with torch.no_grad():
            m.bias.add_(1.0)
        return m

    train_run(shifted, data, **kw)
    other = (data[0] + 1.0, *data[1:])  # other data: another run
    train_run(linear, other, **kw)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.json"))) == 4
    with pytest.raises(InvalidArgumentError, match="cache= needs"):
        train_run(linear, data, **{**kw, "optimizer": lambda p, lr: torch.optim.SGD(p, lr)})


def test_steps_to_reference_reads_the_target_off_the_reference_curve():
    from harness import steps_to_reference

    def run(losses: list[float], diverged: bool = False) -> RunResult:
        return RunResult("sgd", 0.1, 0, 8, len(losses), train_loss=losses, smoothed_loss=losses, diverged=diverged)

    ref = [run([4.0, 3.0, 2.0, 1.0]), run([4.0, 3.0, 2.0, 3.0])]  # mean curve 4, 3, 2, 2: target 2 at step 4
    target, ref_steps, reached = steps_to_reference(ref, 4, {"fast": [run([3.0, 1.5, 1.0, 1.0])],
                                                             "slow": [run([5.0, 4.0, 3.0, 2.5])]})
    assert (target, ref_steps, reached) == (2.0, 3, {"fast": 2, "slow": None})
    assert steps_to_reference([run([1.0], diverged=True)], 1, {}) is None
