"""Summaries over seeds for the benchmark tables: finite values, mean ± sd, sample sd."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["finite", "loss_at", "mean_sd", "sd"]


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are neither None nor nan/inf (diverged runs, missing accuracies), as floats.

    Example:
        >>> finite([1, None, float("inf"), 2.5])
        [1.0, 2.5]
    """
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def sd(values: Sequence[float]) -> float:
    """Sample standard deviation (``ddof=1``) of ``values``; 0 for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_sd(values: Sequence[float | None], fmt: str) -> str:
    """``"mean ± sd"`` of the :func:`finite` values with format ``fmt`` (just the mean for one
    value, "–" for none).

    Example:
        >>> mean_sd([1.0, 2.0, None], ".2f"), mean_sd([3.0], ".1f"), mean_sd([float("nan")], ".1f")
        ('1.50 ± 0.71', '3.0', '–')
    """
    vals = finite(values)
    if not vals:
        return "–"
    return f"{np.mean(vals):{fmt}}" + (f" ± {np.std(vals, ddof=1):{fmt}}" if len(vals) > 1 else "")


def loss_at(run, step: int) -> float:
    """Mean minibatch training loss of a ``harness.train.RunResult`` over the last 5% (at least 1) of
    its first ``step`` steps; inf if it diverged by then."""
    if run.diverged and run.diverged_at is not None and run.diverged_at <= step:
        return math.inf
    k = max(1, math.ceil(0.05 * step))
    return float(np.mean(run.train_loss[step - k:step]))
