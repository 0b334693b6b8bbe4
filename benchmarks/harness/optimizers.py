"""The optimizers the training benchmarks compare, by name: "sgd", "adam", "lm" (LayerwiseLM),
"kfac" (K-FAC), and, from the optional ``heavyball`` package (``pip install -e ".[bench]"``), "soap"
(SOAP, Vyas et al. arXiv:2409.11321: Adam in Shampoo's eigenbasis) and "psgd" (PSGD with Kronecker
preconditioners, Li arXiv:1512.04202), as outside anchors for K-FAC.

``LM_OPTIONS`` are the settings of :class:`netsurgeon.optim.LayerwiseLM` (Ye et al. 2017,
arXiv:1708.00631) in ``benchmarks/train_deep.py`` and ``benchmarks/train_consistency.py``:
damping 0.1 (relative), since the default 0.01 diverged at every lr in the pilots.

``KFAC_OPTIONS`` are those of :class:`netsurgeon.optim.KFAC` (the damping is swept by the benchmarks):
the true Fisher (targets sampled from the model's predictive distribution, as the DKS paper's K-FAC
does), sampled by a forward hook on the model in train mode, so the benchmarks' training loop needs no
change; whole factors (no blocks), inverses refreshed every 10 steps, momentum 0.9.

``HEAVYBALL_OPTIONS``: heavyball's defaults except no weight decay (every other optimizer here runs
without it) and no ``torch.compile`` of the optimizer step (``heavyball.utils.compile_mode = None``,
process-wide: compiling each fresh run's step cost 20-40 s on the CPU, longer than a short run).

Example:
    >>> optimizer_spec("sgd"), optimizer_spec("lm").name, optimizer_spec("kfac", damping=1e-2).name
    ('sgd', 'lm', 'kfac')
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from netsurgeon.optim import KFAC, LayerwiseLM

from .train import ModelOptimizer

__all__ = ["LM_OPTIONS", "KFAC_OPTIONS", "HEAVYBALL", "HEAVYBALL_OPTIONS", "optimizer_spec", "kfac_with_true_fisher"]

LM_OPTIONS: dict[str, Any] = dict(momentum=0.9, damping=0.1, ema=0.95, update_every=10, subsample=1.0,
                                  chunk_size=None)
KFAC_OPTIONS: dict[str, Any] = dict(momentum=0.9, damping_mode="factored", ema=0.95, update_every=10, stats_every=1,
                                    fisher="true", likelihood="categorical", chunk_size=None)


HEAVYBALL = {"soap": "SOAP", "psgd": "PSGDKron"}  # benchmark name -> heavyball class
HEAVYBALL_OPTIONS: dict[str, Any] = dict(weight_decay=0.0)


def _heavyball(name: str) -> ModelOptimizer:
    try:
        import heavyball
    except ImportError as e:  # an optional benchmark dependency
        raise ImportError(f"optimizer {name!r} needs the optional package heavyball: pip install -e \".[bench]\"") from e
    heavyball.utils.compile_mode = None
    cls = getattr(heavyball, HEAVYBALL[name])
    return ModelOptimizer(lambda model, lr: cls(model.parameters(), lr=lr, **HEAVYBALL_OPTIONS), name)


def kfac_with_true_fisher(model: nn.Module, lr: float, **options: Any) -> KFAC:
    """A :class:`~netsurgeon.optim.KFAC` on ``model`` whose true-Fisher statistics are sampled by a forward
    hook on the model: every train-mode forward with gradients enabled calls ``sample_fisher`` on the
    output (evaluation, in eval mode or under ``no_grad``, samples nothing)."""
    opt = KFAC(model, lr=lr, **options)
    if opt.fisher == "true":
        def sample(module: nn.Module, args: Any, out: Any) -> None:
            if module.training and torch.is_grad_enabled():
                opt.sample_fisher(out)
        model.register_forward_hook(sample)
    return opt


def optimizer_spec(name: str, damping: float | None = None) -> str | ModelOptimizer:
    """What :func:`~harness.train.train_run` takes for ``name``: "sgd" and "adam" as they are,
    "lm" as :class:`~netsurgeon.optim.LayerwiseLM` with ``LM_OPTIONS``, "kfac" as
    :class:`~netsurgeon.optim.KFAC` with ``KFAC_OPTIONS`` and ``damping`` (required), "soap" / "psgd" as
    heavyball's optimizers with ``HEAVYBALL_OPTIONS``."""
    if name == "lm":
        return ModelOptimizer(lambda model, lr: LayerwiseLM(model, lr=lr, **LM_OPTIONS), "lm")
    if name in HEAVYBALL:
        return _heavyball(name)
    if name == "kfac":
        if damping is None:
            raise ValueError("optimizer_spec('kfac') needs a damping")
        options = dict(KFAC_OPTIONS, damping=damping)
        return ModelOptimizer(lambda model, lr: kfac_with_true_fisher(model, lr, **options), "kfac", options)
    return name
