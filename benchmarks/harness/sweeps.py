"""One configuration of a learning-rate-sweep benchmark: its budget, its runs and its table cells.

The protocol shared by ``benchmarks/train_identity.py`` and ``benchmarks/train_farkas.py``:
the lr grid is swept on the first ``select_seeds`` seeds (:func:`~harness.train.lr_sweep`,
lowest final training loss among lrs without a diverged run), then the remaining seeds run
at the selected lr (:func:`sweep_config`).

Example:
    >>> import torch, torch.nn as nn
    >>> x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    >>> budget = SweepBudget(steps=4, batch_size=16, lrs=(0.01, 0.1), eval_every=2, train_subset=None,
    ...                      test_subset=None)
    >>> res = sweep_config("linear", lambda seed: nn.Linear(8, 2), (x, y, x, y), budget, seeds=[0, 1],
    ...                    select_seeds=1)
    >>> len(res.runs), sorted(res.sweep_runs)
    (2, [0.01, 0.1])
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .report import run_record
from .train import OptimizerSpec, RunResult, lr_sweep, train_run

__all__ = ["SweepBudget", "ConfigResult", "sweep_config", "sweep_rows", "selected_curves", "lr_cell", "seeds_cell"]


@dataclass(frozen=True)
class SweepBudget:
    """Data and step budget of a sweep; scripts subclass it to add their own fields."""

    steps: int
    batch_size: int
    lrs: tuple[float, ...]
    eval_every: int
    train_subset: int | None   # None: the whole training split
    test_subset: int | None    # None: the whole test split


@dataclass
class ConfigResult:
    """The lr sweep and the runs at the selected lr of one configuration."""

    config: str
    scores: dict[float, float | None]          # mean final train loss per lr on the select seeds
    best_lr: float | None
    sweep_runs: dict[float, list[RunResult]]
    runs: list[RunResult] = field(default_factory=list)  # every seed at best_lr
    wall_time_s: float = 0.0

    @property
    def best_at_edge(self) -> bool:
        """True when the selected lr is the smallest or largest of a grid of 2 or more."""
        return len(self.scores) > 1 and self.best_lr in (min(self.scores), max(self.scores))

    def record(self, select_seeds: int, **extra: Any) -> dict[str, Any]:
        """The JSON record: selection, ``extra`` entries, every sweep run and the further seeds' runs."""
        return {"best_lr": self.best_lr, "scores": self.scores, "wall_time_s": self.wall_time_s, **extra,
                "sweep_runs": {repr(lr): [run_record(x) for x in rs] for lr, rs in self.sweep_runs.items()},
                "extra_seed_runs": [run_record(x) for x in self.runs[select_seeds:]]}


def sweep_config(config: str, model_fn: Callable[[int], nn.Module], data: tuple[torch.Tensor, ...],
                 budget: SweepBudget, seeds: Sequence[int], select_seeds: int, optimizer: OptimizerSpec = "sgd"
                 ) -> ConfigResult:
    """Sweep ``budget.lrs`` with ``optimizer`` (default SGD) on the first ``select_seeds`` seeds, then run the
    others at the best lr.

    Args:
        config: the configuration's name.
        model_fn: ``seed -> model``, called by :func:`~harness.train.train_run` under the seeded RNG.
        data: ``(x_train, y_train, x_test, y_test)``.
        budget: steps, batch size, lr grid and evaluation interval.
        seeds: every seed of the configuration.
        select_seeds: how many of the first ``seeds`` the sweep uses.
        optimizer: what :func:`~harness.train.train_run` takes (``harness.optimizers.optimizer_spec``).

    Returns:
        The :class:`ConfigResult`; its ``runs`` are empty when every lr diverged.
    """
    start = time.perf_counter()
    kw = {"optimizer": optimizer, "steps": budget.steps, "batch_size": budget.batch_size, "eval_every": budget.eval_every}
    sweep = lr_sweep(model_fn, data, lrs=budget.lrs, seeds=list(seeds[:select_seeds]), **kw)
    runs = list(sweep.best_runs)
    if sweep.best_lr is not None:
        runs += [train_run(model_fn, data, lr=sweep.best_lr, seed=s, **kw) for s in seeds[select_seeds:]]
    return ConfigResult(config, sweep.scores, sweep.best_lr, sweep.runs, runs, time.perf_counter() - start)


def lr_cell(best_lr: float | None, at_edge: bool) -> str:
    """The table cell of a selected lr: ``"0.03"``, ``"0.1 (edge)"`` or ``"all diverged"``."""
    return "all diverged" if best_lr is None else f"{best_lr:g}" + (" (edge)" if at_edge else "")


def seeds_cell(runs: Sequence[RunResult]) -> str:
    """The table cell counting ``runs`` and their diverged ones: ``"3"`` or ``"3 (1 diverged)"``."""
    diverged = sum(r.diverged for r in runs)
    return f"{len(runs)}" + (f" ({diverged} diverged)" if diverged else "")


def sweep_rows(results: dict[str, ConfigResult], diverged_at: bool = False) -> list[dict[str, Any]]:
    """Final train loss / test accuracy per lr on the select seeds (mean), one row per configuration;
    with ``diverged_at`` a diverged lr's cell also names the first step at which a seed diverged."""
    rows = []
    for config, res in results.items():
        row: dict[str, Any] = {"configuration": config}
        for lr, runs in res.sweep_runs.items():
            ok = [r for r in runs if not r.diverged]
            if len(ok) == len(runs):
                row[f"lr {lr:g}"] = (f"{np.mean([r.final_train_loss for r in ok]):.3f} / "
                                     f"{np.mean([r.final_test_acc for r in ok]):.3f}")
                continue
            at = f", at step {min(r.diverged_at for r in runs if r.diverged)}" if diverged_at else ""
            row[f"lr {lr:g}"] = f"diverged ({len(runs) - len(ok)}/{len(runs)}{at})"
        rows.append(row)
    return rows


def selected_curves(results: dict[str, Any]) -> dict[str, list[RunResult]]:
    """``"config, lr X" -> runs`` at the selected lr, for :func:`~harness.report.plot_curves`; a
    result is anything with ``best_lr`` and ``runs`` (configurations where every lr diverged are left out)."""
    return {f"{c}, lr {r.best_lr:g}": r.runs for c, r in results.items() if r.best_lr is not None}
