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

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InvalidArgumentError

__all__ = ["RunResult", "SweepResult", "ModelOptimizer", "train_run", "lr_sweep", "steps_to_loss", "smooth",
           "write_table_md", "plot_curves", "plot_accuracy", "run_record", "save_json", "environment",
           "torch_threads", "add_sweep_args", "finish_sweep_args", "DIVERGENCE_FACTOR"]

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
              weight_decay: float = 0.0, loss: LossSpec = "cross_entropy", smoothing: float = 0.9) -> RunResult:
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
            return _train(model_fn(seed).to(device), (x_train, y_train, x_test, y_test), optimizer, lr, steps,
                          batch_size, seed, eval_every or steps, momentum, weight_decay, loss_fn, smoothing)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


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


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def write_table_md(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with ``columns`` in order; floats with 4
    significant digits, None as "–", missing keys empty."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) if c in r else "" for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _axes() -> tuple[Any, Any]:
    """A figure on the Agg canvas (no pyplot, no global backend change) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, ax: Any, path: str | os.PathLike, ylabel: str, title: str, legend_size: int | None = None) -> Path:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_curves(results: dict[str, list[RunResult]], path: str | os.PathLike, title: str) -> Path:
    """Plot smoothed training loss vs step (log y), mean over seeds with a min/max band.

    Each label's runs are aligned by step; a diverged run contributes up to its last
    finite value, and the legend counts diverged runs. Uses the Agg canvas directly
    (no pyplot, no global backend change).

    Args:
        results: label -> runs (typically one per seed).
        path: output image file (PNG by extension).
        title: figure title.

    Returns:
        The written path.
    """
    fig, ax = _axes()
    for label, runs in results.items():
        length = max((len(r.smoothed_loss) for r in runs), default=0)
        if not length:
            continue
        curves = np.full((len(runs), length), np.nan)
        for i, r in enumerate(runs):
            curves[i, :len(r.smoothed_loss)] = r.smoothed_loss
        curves[~np.isfinite(curves) | (curves <= 0)] = np.nan
        keep = ~np.isnan(curves).all(0)
        steps = np.arange(1, length + 1)[keep]
        c = curves[:, keep]
        n_div = sum(r.diverged for r in runs)
        line, = ax.plot(steps, np.nanmean(c, 0), label=f"{label} ({len(runs)} seeds"
                        + (f", {n_div} diverged)" if n_div else ")"))
        ax.fill_between(steps, np.nanmin(c, 0), np.nanmax(c, 0), color=line.get_color(), alpha=0.2, lw=0)
    ax.set_yscale("log")
    return _save(fig, ax, path, "training loss (smoothed)", title)


def plot_accuracy(results: dict[str, list[RunResult]], path: str | os.PathLike, title: str) -> Path:
    """Plot test accuracy vs step, mean over the non-diverged runs with a min/max band.

    Args:
        results: label -> runs (typically one per seed).
        path: output image file (PNG by extension).
        title: figure title.

    Returns:
        The written path.
    """
    fig, ax = _axes()
    for label, runs in results.items():
        ok = [r for r in runs if not r.diverged and r.test_acc]
        if not ok:
            continue
        n = min(len(r.test_acc) for r in ok)
        acc = np.array([r.test_acc[:n] for r in ok], dtype=float)
        steps = ok[0].eval_steps[:n]
        line, = ax.plot(steps, acc.mean(0), marker="o", ms=3, label=f"{label} ({len(ok)} seeds)")
        ax.fill_between(steps, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2, lw=0)
    return _save(fig, ax, path, "test accuracy", title, legend_size=8)


def run_record(r: RunResult) -> dict[str, Any]:
    """A run as a compact JSON-ready record: its settings, summary figures, evaluations and the
    per-step training loss rounded to 5 significant digits."""
    return {"lr": r.lr, "seed": r.seed, "steps_done": r.steps_done, "diverged": r.diverged,
            "diverged_at": r.diverged_at, "final_train_loss": r.final_train_loss, "final_test_acc": r.final_test_acc,
            "eval_steps": r.eval_steps, "test_acc": r.test_acc, "test_loss": r.test_loss,
            "median_step_time_s": r.median_step_time_s, "wall_time_s": r.wall_time_s, "num_params": r.num_params,
            "train_loss": [float(f"{v:.5g}") for v in r.train_loss]}


def _jsonable(obj: Any) -> Any:
    """Plain JSON data; non-finite floats become null so the file is strict JSON."""
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _default_mode() -> int:
    """0666 minus the process umask: the mode ``open(path, "w")`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically: a temporary file in the same
    directory, flushed and fsynced, then ``os.replace``. On any error the old file (if
    any) is left as it was and the temporary file is removed.

    Args:
        obj: JSON-able data; dataclasses, objects with ``to_dict``, tensors, numpy
            values and paths are converted; nan/inf become null.
        path: destination file (parent directories are created).

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def environment(threads: int) -> dict[str, Any]:
    """The machine facts a benchmark record states: CPU model and count, torch threads and
    version, Python version, and the process's nice value."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "nice": os.nice(0) if hasattr(os, "nice") else None}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (None: unchanged), then restore the old value.

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def add_sweep_args(p: argparse.ArgumentParser, configs: Sequence[str], *, steps: int, lrs: Sequence[float],
                   batch_size: int = 64, eval_every: int = 50, train_subset: str = "all", test_subset: str = "all",
                   quick: str = "4 steps, batch 16, 128 train images, 1 seed, 1 lr") -> None:
    """The options every learning-rate-sweep benchmark shares (``--quick``, ``--configs``, the
    budget, the seeds and the data subsets); the defaults given here only fill the help texts,
    the scripts' budgets hold the values."""
    p.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
    p.add_argument("--configs", nargs="+", choices=list(configs), default=list(configs),
                   help="configurations to run")
    p.add_argument("--steps", type=int, help=f"training steps (default {steps})")
    p.add_argument("--batch-size", type=int, help=f"default {batch_size}")
    p.add_argument("--lrs", type=float, nargs="+", help=f"SGD lr grid (default {' '.join(map(str, lrs))})")
    p.add_argument("--eval-every", type=int, help=f"test-set evaluation interval in steps (default {eval_every})")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default 3; --quick 1)")
    p.add_argument("--select-seeds", type=int, default=1, help="seeds used in the lr sweep (default 1)")
    p.add_argument("--train-subset", type=int,
                   help=f"fixed random subset of the training images (default {train_subset})")
    p.add_argument("--test-subset", type=int, help=f"fixed random subset of the test images (default {test_subset})")


def finish_sweep_args(p: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None, script: str,
                      base: Any, **extra: Any) -> argparse.Namespace:
    """Complete the options of :func:`add_sweep_args`: the seed counts (``--quick``: 1), the
    command line as run (``args.command``), and ``args.budget``, the dataclass ``base`` with
    every given option (and ``extra`` override that is not None) replacing its field."""
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.select_seeds = min(args.select_seeds, args.seeds)
    if args.seeds < 1 or args.select_seeds < 1:
        p.error("need --seeds >= 1 and --select-seeds >= 1")
    given = list(sys.argv[1:] if argv is None else argv)
    args.command = f"python benchmarks/{script}" + (" " + " ".join(given) if given else "")
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lrs": tuple(args.lrs) if args.lrs else None,
                 "eval_every": args.eval_every, "train_subset": args.train_subset, "test_subset": args.test_subset,
                 **extra}
    args.budget = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    return args
