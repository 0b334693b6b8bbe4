"""A small training harness for the benchmark scripts: one run, a learning-rate sweep, reporting.

Lives beside the scripts (``benchmarks/harness``), not in the ``netsurgeon`` package: it uses
netsurgeon, netsurgeon never uses it. The scripts import it as ``harness`` (their folder is on
``sys.path`` when run as ``python benchmarks/<script>.py``; the tests put it there through
``pythonpath`` in ``pyproject.toml``). Modules: :mod:`.train` (runs and sweeps), :mod:`.report`
(tables, plots, JSON), :mod:`.cli` (options, machine record), :mod:`.data` (the offline
datasets), :mod:`.sweeps` (one configuration's sweep and rows), :mod:`.models` (the small
ResNets), :mod:`.stats` (mean ± sd), :mod:`.optimizers` (optimizers by name).

Not a framework: :func:`train_run` trains one model with one optimizer and records
everything a benchmark table needs (loss per step, a smoothed loss, test accuracy,
time per step, divergence); :func:`lr_sweep` repeats it over learning rates and seeds
and picks the best learning rate; the writers produce Markdown, PNG and JSON.

Honesty rules the harness follows: every run is seeded (model init and minibatch
order) without touching the caller's global RNG state, diverged runs are marked and
excluded from learning-rate selection rather than dropped, and selection uses training
loss by default (selecting on test accuracy is possible but leaks the test set).

Example:
    >>> import torch, torch.nn as nn
    >>> x, y = torch.randn(256, 8), torch.randint(0, 2, (256,))
    >>> run = train_run(lambda seed: nn.Linear(8, 2), (x, y, x, y), optimizer="sgd", lr=0.1,
    ...                 steps=20, batch_size=32, seed=0, eval_every=10)
    >>> len(run.train_loss), run.eval_steps, run.diverged
    (20, [10, 20], False)
"""
from __future__ import annotations

from .cli import (add_output_args, add_sweep_args, command_line, environment, finish_sweep_args, log, new_parser,
                  output_paths, torch_threads)
from .report import (lr_grid_text, machine_text, plot_accuracy, plot_curves, publish, run_record, save_json,
                     save_text, subset_text, write_table_md)
from .train import (DIVERGENCE_FACTOR, timed_steps, ModelOptimizer, RunResult, SweepResult, lr_sweep, mean_curve, smooth,
                    steps_to_loss, steps_to_reference, train_run)

__all__ = ["RunResult", "SweepResult", "ModelOptimizer", "train_run", "lr_sweep", "steps_to_loss", "steps_to_reference", "smooth",
           "mean_curve", "write_table_md", "plot_curves", "plot_accuracy", "run_record", "save_json", "save_text", "publish",
           "machine_text", "subset_text", "lr_grid_text", "environment", "torch_threads", "log", "new_parser",
           "add_output_args", "output_paths", "command_line", "add_sweep_args", "finish_sweep_args",
           "DIVERGENCE_FACTOR"]
