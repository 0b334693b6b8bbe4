"""The optimizers the training benchmarks compare, by name: "sgd", "adam" and "lm" (LayerwiseLM).

``LM_OPTIONS`` are the settings of :class:`netsurgeon.optim.LayerwiseLM` (Ye et al. 2017,
arXiv:1708.00631) in ``benchmarks/train_deep.py`` and ``benchmarks/train_consistency.py``:
damping 0.1 (relative), since the default 0.01 diverged at every lr in the pilots.

Example:
    >>> optimizer_spec("sgd"), optimizer_spec("lm").name
    ('sgd', 'lm')
"""
from __future__ import annotations

from typing import Any

from netsurgeon.optim import LayerwiseLM

from .train import ModelOptimizer

__all__ = ["LM_OPTIONS", "optimizer_spec"]

LM_OPTIONS: dict[str, Any] = dict(momentum=0.9, damping=0.1, ema=0.95, update_every=10, subsample=1.0,
                                  chunk_size=None)


def optimizer_spec(name: str) -> str | ModelOptimizer:
    """What :func:`~harness.train.train_run` takes for ``name``: "sgd" and "adam" as they are,
    "lm" as :class:`~netsurgeon.optim.LayerwiseLM` with ``LM_OPTIONS``."""
    if name == "lm":
        return ModelOptimizer(lambda model, lr: LayerwiseLM(model, lr=lr, **LM_OPTIONS), "lm")
    return name
