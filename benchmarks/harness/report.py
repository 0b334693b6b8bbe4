"""Writers for benchmark results: Markdown tables and their cells, loss and accuracy plots, atomic JSON and text."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from netsurgeon._fileio import write_atomic

from .train import RunResult

__all__ = ["write_table_md", "plot_curves", "plot_accuracy", "run_record", "save_json", "save_text", "publish",
           "machine_text", "subset_text", "lr_grid_text"]


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
    """Plot test accuracy vs step, mean over the non-diverged runs with a min/max band; arguments
    and return value as in :func:`plot_curves`."""
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


def run_record(r: RunResult, extra: dict[str, Any] | None = None, evals: bool = True) -> dict[str, Any]:
    """A run as a compact JSON-ready record: its settings, summary figures, evaluations and the
    per-step training loss rounded to 5 significant digits.

    Args:
        r: the run.
        extra: entries placed after the settings (a script's own figures of the run). Default: None.
        evals: include the test evaluations (``eval_steps``, ``test_acc``, ``test_loss``). Default: True.
    """
    rec = {"optimizer": r.optimizer, "lr": r.lr, "seed": r.seed, "steps_done": r.steps_done, "diverged": r.diverged,
           "diverged_at": r.diverged_at, **(extra or {}), "final_train_loss": r.final_train_loss,
           "final_test_acc": r.final_test_acc}
    if evals:
        rec.update(eval_steps=r.eval_steps, test_acc=r.test_acc, test_loss=r.test_loss)
    return rec | {"median_step_time_s": r.median_step_time_s, "wall_time_s": r.wall_time_s,
                  "num_params": r.num_params, "train_loss": [float(f"{v:.5g}") for v in r.train_loss]}


def machine_text(env: dict[str, Any], shared: bool = False) -> str:
    """``"Machine: CPU, N CPU cores, torch V with T thread(s), nice K"`` from :func:`~harness.cli.environment`
    (``shared``: the cores are marked as shared with other jobs); the caller appends the wall time."""
    return (f"Machine: {env['cpu']}, {env['cpu_count']} CPU cores{' (shared with other jobs)' if shared else ''}, "
            f"torch {env['torch']} with {env['torch_threads']} thread(s), nice {env['nice']}")


def subset_text(n: int | None, total: int | None = None) -> str:
    """How many images of a split a run uses: ``"all"`` (``"all <total>"``) or a fixed random subset."""
    if n is None:
        return "all" if total is None else f"all {total}"
    return f"a fixed random subset of {n}"


def lr_grid_text(grids: dict[str, Sequence[float]], same: str = "") -> str:
    """Learning-rate grids per configuration: ``"[a, b]" + same`` when every configuration has the
    same grid, else ``"config [a, b], ..."``."""
    text = {c: "[" + ", ".join(f"{v:g}" for v in g) + "]" for c, g in grids.items()}
    if len(set(text.values())) == 1:
        return text[next(iter(text))] + same
    return ", ".join(f"{c} {t}" for c, t in text.items())


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
    return save_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n", path)


def save_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` atomically: a temporary file in the same directory, flushed and fsynced,
    then ``os.replace``. On any error the old file (if any) is left as it was and the temporary
    file is removed. Parent directories are created.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)
    return path


def publish(report: str, path: str | os.PathLike | None) -> None:
    """Print ``report`` and, when ``path`` is given, also write it there (:func:`save_text`)."""
    print(report)
    if path:
        save_text(report, path)
