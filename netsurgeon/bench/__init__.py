"""A small training harness for benchmarks: one run, a learning-rate sweep, reporting.

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

from .cli import add_sweep_args, environment, finish_sweep_args, torch_threads
from .report import plot_accuracy, plot_curves, run_record, save_json, write_table_md
from .train import (DIVERGENCE_FACTOR, ModelOptimizer, RunResult, SweepResult, lr_sweep, smooth, steps_to_loss,
                    train_run)

__all__ = ["RunResult", "SweepResult", "ModelOptimizer", "train_run", "lr_sweep", "steps_to_loss", "smooth",
           "write_table_md", "plot_curves", "plot_accuracy", "run_record", "save_json", "environment",
           "torch_threads", "add_sweep_args", "finish_sweep_args", "DIVERGENCE_FACTOR"]
