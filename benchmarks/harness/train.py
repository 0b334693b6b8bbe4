"""Training runs and learning-rate sweeps: :func:`train_run`, :func:`lr_sweep`, :class:`RunResult`."""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from netsurgeon.errors import InvalidArgumentError

__all__ = ["RunResult", "SweepResult", "ModelOptimizer", "train_run", "lr_sweep", "run_key", "steps_to_loss",
           "steps_to_reference", "smooth", "timed_steps",
           "mean_curve", "DIVERGENCE_FACTOR"]

DIVERGENCE_FACTOR = 1e3
"""A run diverges when its loss is non-finite or exceeds this multiple of the first loss."""


@dataclass(frozen=True)
class ModelOptimizer:
    """An optimizer factory that needs the model, not its parameters: ``factory(model, lr)``.

    For optimizers that register hooks on the layers, such as
    :class:`netsurgeon.optim.LayerwiseLM`. A plain callable passed as ``optimizer`` keeps
    receiving ``(params, lr)``.

    Example:
        >>> from netsurgeon.optim import LayerwiseLM
        >>> lm = ModelOptimizer(lambda model, lr: LayerwiseLM(model, lr=lr), "lm")
        >>> train_run(lambda seed: nn.Linear(8, 2), (torch.randn(64, 8), torch.randint(0, 2, (64,)),
        ...           torch.randn(8, 8), torch.randint(0, 2, (8,))), optimizer=lm, lr=0.1, steps=2,
        ...           batch_size=16, seed=0, eval_every=None).optimizer
        'lm'
    """

    factory: Callable[[nn.Module, float], torch.optim.Optimizer]
    name: str
    options: dict[str, Any] | None = None  # the factory's settings, JSON-able: given, runs with it can be cached

    def __call__(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return self.factory(model, lr)


OptimizerSpec = str | ModelOptimizer | Callable[[Any, float], torch.optim.Optimizer]
LossSpec = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


@dataclass
class RunResult:
    """Everything recorded by one :func:`train_run`. Steps count optimizer updates from 1."""

    optimizer: str
    lr: float
    seed: int
    batch_size: int
    steps: int                                            # requested
    train_loss: list[float] = field(default_factory=list)  # minibatch loss at step 1..steps_done
    smoothed_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float | None] = field(default_factory=list)  # None for non-integer targets
    step_time_s: list[float] = field(default_factory=list)
    diverged: bool = False
    diverged_at: int | None = None
    wall_time_s: float = 0.0
    num_params: int = 0

    @property
    def steps_done(self) -> int:
        """Optimizer steps actually taken (fewer than ``steps`` when diverged)."""
        return len(self.train_loss)

    @property
    def final_train_loss(self) -> float:
        """Mean training loss over the last 5% of the steps (at least one); inf if diverged."""
        if self.diverged or not self.train_loss:
            return math.inf
        k = max(1, math.ceil(0.05 * len(self.train_loss)))
        return float(np.mean(self.train_loss[-k:]))

    @property
    def final_test_acc(self) -> float | None:
        """Test accuracy after the last step; None if diverged or not a classification task."""
        return None if self.diverged or not self.test_acc else self.test_acc[-1]

    @property
    def median_step_time_s(self) -> float:
        """Median wall time of one step (robust to the slow first steps)."""
        return float(np.median(self.step_time_s)) if self.step_time_s else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Fields plus the summary properties, ready for :func:`save_json`."""
        return {**asdict(self), "steps_done": self.steps_done, "final_train_loss": self.final_train_loss,
                "final_test_acc": self.final_test_acc, "median_step_time_s": self.median_step_time_s}


@dataclass
class SweepResult:
    """All runs of :func:`lr_sweep`, the per-lr score and the selected learning rate."""

    optimizer: str
    select_by: str
    runs: dict[float, list[RunResult]]
    scores: dict[float, float | None]  # mean criterion per lr; None when any seed diverged
    best_lr: float | None

    @property
    def best_runs(self) -> list[RunResult]:
        """The runs (one per seed) at the selected learning rate."""
        return [] if self.best_lr is None else self.runs[self.best_lr]

    @property
    def best_at_edge(self) -> bool:
        """True when the best lr is the smallest or largest tried: widen the grid."""
        return self.best_lr is not None and self.best_lr in (min(self.runs), max(self.runs))

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per learning rate, for :func:`write_table_md`."""
        out = []
        for lr, runs in self.runs.items():
            ok = [r for r in runs if not r.diverged]
            accs = [r.final_test_acc for r in ok if r.final_test_acc is not None]
            out.append({"optimizer": self.optimizer, "lr": lr, "seeds": len(runs), "diverged": len(runs) - len(ok),
                        "final_train_loss": float(np.mean([r.final_train_loss for r in ok])) if ok else None,
                        "test_acc": float(np.mean(accs)) if accs else None, "best": lr == self.best_lr})
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data for :func:`save_json` (lr keys become strings)."""
        return {"optimizer": self.optimizer, "select_by": self.select_by, "best_lr": self.best_lr,
                "scores": {repr(k): v for k, v in self.scores.items()},
                "runs": {repr(k): [r.to_dict() for r in v] for k, v in self.runs.items()}}


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, ``m_t / (1 - beta^t)`` (as in Adam)."""
    out, m = [], 0.0
    for t, v in enumerate(values, 1):
        m = beta * m + (1 - beta) * v
        out.append(m / (1 - beta ** t))
    return out


def _make_optimizer(spec: OptimizerSpec, model: nn.Module, lr: float, momentum: float,
                    weight_decay: float) -> tuple[torch.optim.Optimizer, str]:
    if isinstance(spec, ModelOptimizer):
        return spec(model, lr), spec.name
    params = model.parameters()
    if callable(spec):
        return spec(params, lr), getattr(spec, "__name__", type(spec).__name__)
    if spec == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay), "sgd"
    if spec == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay), "adam"
    raise InvalidArgumentError(f"optimizer={spec!r}: expected 'sgd', 'adam', a callable (params, lr) -> Optimizer "
                               "or a ModelOptimizer")


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
              batch_size: int = 1024) -> tuple[float, float | None]:
    """Mean test loss and accuracy (accuracy only for integer targets), in eval mode."""
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        yb = y[i:i + batch_size]
        total += float(loss_fn(out, yb)) * len(yb)
        if not yb.is_floating_point():
            correct += int((out.argmax(1) == yb).sum())
    model.train()
    return total / len(x), (correct / len(x) if not y.is_floating_point() else None)


def train_run(model_fn: Callable[[int], nn.Module],
              data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], *,
              optimizer: OptimizerSpec, lr: float, steps: int, batch_size: int, seed: int,
              eval_every: int | None, device: str | torch.device = "cpu", momentum: float = 0.9,
              weight_decay: float = 0.0, loss: LossSpec = "cross_entropy", smoothing: float = 0.9,
              cache: str | os.PathLike | None = None) -> RunResult:
    """Train ``model_fn(seed)`` for ``steps`` minibatch steps and record the run.

    The model is built and trained under a forked RNG seeded with ``seed`` (torch,
    numpy, random), so runs are reproducible and the caller's RNG state is untouched.
    Minibatches are drawn without replacement from a fresh permutation every epoch
    (a seeded ``torch.Generator``). The run stops early with ``diverged=True`` when the
    loss is nan/inf or exceeds ``DIVERGENCE_FACTOR`` times the first step's loss.

    Args:
        model_fn: builds the model from the seed.
        data: ``(x_train, y_train, x_test, y_test)``.
        optimizer: "sgd" (with ``momentum``), "adam", a callable ``(params, lr)``
            returning an optimizer, or a :class:`ModelOptimizer` (called with the model
            instead of its parameters); for the last two ``momentum`` and ``weight_decay``
            are ignored.
        lr: learning rate.
        steps: optimizer steps, > 0.
        batch_size: examples per step, 1 ≤ batch_size ≤ len(x_train).
        seed: seeds model init and minibatch order.
        eval_every: evaluate on the test set every this many steps (and always after
            the last); None or 0 evaluates only at the end.
        device: where to train. Default: "cpu".
        momentum: SGD momentum. Default: 0.9.
        weight_decay: L2 penalty of the built-in optimizers. Default: 0.0.
        loss: "cross_entropy", "mse" or a callable ``(output, target) -> scalar``.
            Default: "cross_entropy".
        smoothing: EMA factor beta of ``smoothed_loss`` (:func:`smooth`). Default: 0.9.
        cache: a directory of finished runs, content-addressed (:func:`run_key`): a run whose
            key is there is read back instead of trained; a trained run is written there
            (atomically). Only for the built-in optimizers (named by string) or a
            :class:`ModelOptimizer` that states its ``options``, and the built-in losses.
            Default: None (no cache).

    Returns:
        The :class:`RunResult`.
    """
    x_train, y_train, x_test, y_test = (t.to(device) for t in data)
    n = len(x_train)
    if steps < 1 or not 1 <= batch_size <= n:
        raise InvalidArgumentError(f"need steps >= 1 and 1 <= batch_size <= {n} (train size); "
                                   f"got steps={steps}, batch_size={batch_size}")
    loss_fn = _LOSSES.get(loss) if isinstance(loss, str) else loss
    if loss_fn is None:
        raise InvalidArgumentError(f"loss={loss!r}: expected one of {sorted(_LOSSES)} or a callable")
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)  # noqa: E702
            model = model_fn(seed).to(device)
            path = None
            if cache is not None:
                named = isinstance(optimizer, ModelOptimizer) and optimizer.options is not None
                if not ((isinstance(optimizer, str) or named) and isinstance(loss, str)):
                    raise InvalidArgumentError("cache= needs a built-in optimizer (named by string, or a "
                                               "ModelOptimizer with its options) and a built-in loss")
                settings = optimizer if isinstance(optimizer, str) else {"name": optimizer.name,
                                                                         "options": optimizer.options}
                key = run_key(model, (x_train, y_train, x_test, y_test), optimizer=settings, lr=lr, steps=steps,
                              batch_size=batch_size, seed=seed, eval_every=eval_every or steps, momentum=momentum,
                              weight_decay=weight_decay, loss=loss, smoothing=smoothing, device=str(device))
                path = Path(cache) / f"{key}.json"
                if path.is_file():
                    return RunResult(**json.loads(path.read_text()))
            res = _train(model, (x_train, y_train, x_test, y_test), optimizer, lr, steps,
                         batch_size, seed, eval_every or steps, momentum, weight_decay, loss_fn, smoothing)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(asdict(res)))
                os.replace(tmp, path)
            return res
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def run_key(model: nn.Module, data: Sequence[torch.Tensor], **settings: Any) -> str:
    """The content address of a run: SHA-256 of the model as built (its class, its code when it is a
    ``GraphModule``, every parameter and buffer), the data tensors, the settings, and the source of
    this module's training loop. A run is a deterministic function of these (same machine type), so
    two runs with one key are the same run, whatever code built the model."""
    h = hashlib.sha256()
    h.update(type(model).__qualname__.encode())
    for m in model.modules():
        if isinstance(m, torch.fx.GraphModule):
            h.update(m.code.encode())
    for name, t in list(model.state_dict(keep_vars=False).items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for t in data:
        h.update(_tensor_digest(t))
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(_LOOP_SOURCE)
    return h.hexdigest()[:32]


_DIGESTS: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, bytes]] = {}


def _tensor_digest(t: torch.Tensor) -> bytes:
    """SHA-256 of a data tensor, remembered per (storage, offset, shape, strides) with the tensor itself
    kept (so its storage cannot be reused by another): the datasets are hashed once."""
    k = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
    if k not in _DIGESTS:
        _DIGESTS[k] = (t, hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).digest())
    return _DIGESTS[k][1]


def _train(model: nn.Module, data: tuple[torch.Tensor, ...], optimizer: OptimizerSpec, lr: float, steps: int,
           batch_size: int, seed: int, eval_every: int, momentum: float, weight_decay: float,
           loss_fn: Callable, smoothing: float) -> RunResult:
    x_train, y_train, x_test, y_test = data
    opt, name = _make_optimizer(optimizer, model, lr, momentum, weight_decay)
    res = RunResult(name, lr, seed, batch_size, steps, num_params=sum(p.numel() for p in model.parameters()))
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.empty(0, dtype=torch.long), 0
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        if pos + batch_size > len(order):  # new epoch; the incomplete last batch is dropped
            order, pos = torch.randperm(len(x_train), generator=gen).to(x_train.device), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        value = loss.item()  # synchronizes the device, so step times are honest
        if not math.isfinite(value) or (res.train_loss and abs(value) > DIVERGENCE_FACTOR * abs(res.train_loss[0])):
            res.train_loss.append(value)
            res.step_time_s.append(time.perf_counter() - t0)
            res.diverged, res.diverged_at = True, step
            break
        loss.backward()
        opt.step()
        res.train_loss.append(value)
        res.step_time_s.append(time.perf_counter() - t0)
        if step % eval_every == 0 or step == steps:
            test_loss, acc = _evaluate(model, x_test, y_test, loss_fn)
            res.eval_steps.append(step)
            res.test_loss.append(test_loss)
            res.test_acc.append(acc)
    res.smoothed_loss = smooth(res.train_loss, smoothing)
    res.wall_time_s = time.perf_counter() - start
    return res


def lr_sweep(model_fn: Callable[[int], nn.Module], data: tuple[torch.Tensor, ...], *, optimizer: OptimizerSpec,
             lrs: Sequence[float], seeds: Sequence[int], steps: int, select_by: str = "final_train_loss",
             **kw: Any) -> SweepResult:
    """Run :func:`train_run` for every (lr, seed) and select the best learning rate.

    A learning rate is eligible only if none of its seeds diverged; among those the
    best has the lowest mean final training loss (mean over the last 5% of steps,
    then over seeds), or with ``select_by="final_test_acc"`` the highest mean final
    test accuracy (this selects on the test set: report it as such).

    Args:
        model_fn, data, optimizer, steps: as in :func:`train_run`.
        lrs: learning rates to try.
        seeds: seeds per learning rate.
        select_by: "final_train_loss" or "final_test_acc". Default: "final_train_loss".
        **kw: further arguments of :func:`train_run` (batch_size and eval_every are required).

    Returns:
        A :class:`SweepResult`; ``best_lr`` is None when every learning rate diverged.
    """
    if select_by not in ("final_train_loss", "final_test_acc"):
        raise InvalidArgumentError(f"select_by={select_by!r}: expected 'final_train_loss' or 'final_test_acc'")
    if not lrs or not seeds:
        raise InvalidArgumentError(f"need at least one lr and one seed; got lrs={list(lrs)}, seeds={list(seeds)}")
    runs = {float(lr): [train_run(model_fn, data, optimizer=optimizer, lr=lr, steps=steps, seed=s, **kw)
                        for s in seeds] for lr in lrs}
    scores: dict[float, float | None] = {}
    for lr, rs in runs.items():
        values = [getattr(r, select_by) for r in rs]
        scores[lr] = None if any(r.diverged for r in rs) or None in values else float(np.mean(values))
    sign = -1.0 if select_by == "final_test_acc" else 1.0
    eligible = [lr for lr, s in scores.items() if s is not None]
    best = min(eligible, key=lambda lr: sign * scores[lr]) if eligible else None
    return SweepResult(runs[float(lrs[0])][0].optimizer, select_by, runs, scores, best)


def steps_to_loss(run: RunResult, target: float) -> int | None:
    """The first step (counting from 1) at which the smoothed training loss is ≤ target, else None."""
    return next((i for i, v in enumerate(run.smoothed_loss, 1) if v <= target), None)


def mean_curve(runs: Sequence[RunResult]) -> RunResult | None:
    """A RunResult whose ``smoothed_loss`` is the mean over the non-diverged runs' smoothed losses."""
    ok = [r for r in runs if not r.diverged]
    if not ok:
        return None
    n = min(len(r.smoothed_loss) for r in ok)
    mean = np.mean([r.smoothed_loss[:n] for r in ok], axis=0)
    return RunResult(ok[0].optimizer, ok[0].lr, -1, ok[0].batch_size, n, smoothed_loss=[float(v) for v in mean])


def steps_to_reference(reference: Sequence[RunResult], steps: int, others: dict[str, Sequence[RunResult]]
                       ) -> tuple[float, int | None, dict[str, int | None]] | None:
    """The goal check of the training benchmarks: the target is the reference's mean smoothed loss at
    step ``steps``; returns ``(target, the reference's own first step at or below it, {name: the first
    step of each set of runs' mean smoothed curve at or below it})``, or None when the reference has no
    curve (every run diverged)."""
    ref_curve = mean_curve(reference)
    if ref_curve is None:
        return None
    target = ref_curve.smoothed_loss[steps - 1]
    reached = {}
    for name, runs in others.items():
        curve = mean_curve(runs)
        reached[name] = steps_to_loss(curve, target) if curve is not None else None
    return target, steps_to_loss(ref_curve, target), reached


_LOOP_SOURCE = "".join(inspect.getsource(f) for f in (_train, _evaluate, _make_optimizer, smooth)).encode()


def timed_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int
                ) -> list[float]:
    """Wall seconds of each of ``steps`` training steps (zero_grad, forward, cross-entropy, backward, step)
    on one fixed batch: the per-step cost benchmarks (train_consistency's, kfac_cost's)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times
