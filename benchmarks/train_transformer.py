"""Transformers without normalization or skips: shaped attention and TAT on real text and images (issue 17 §4).

Two tasks, each with one Pre-LN model class (``harness.transformer_models``) that every
configuration starts from:

* ``lm``  -- a character-level causal language model on the Shakespeare corpus
  (``harness.text``: 4.68M train / 0.38M test characters, whole works held out; vocabulary = the
  train split's 84 characters + one id for unknown characters). ``depth`` Pre-LN blocks with causal
  ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` after a fused ``qkv`` linear, a GELU MLP
  of ratio 4, token + learned position embeddings, a final LayerNorm and a linear head. Trained on
  non-overlapping windows of ``context`` characters (next-character cross-entropy at every position);
  tested on every window of the test split, reported in bits per character (test loss / ln 2).
* ``vit`` -- a small ViT on the CIFAR-10 subset (10,000 train / 1,000 test images, channel-standardized):
  patch-4 patchify conv, learned position embeddings, ``depth`` Pre-LN blocks with bidirectional
  attention, a final LayerNorm, the mean over tokens and a linear head; reported in test accuracy.

Configurations, each the Pre-LN model rewritten by ``netsurgeon.transform(model, passes, example_inputs=(x,))``
(``PIPELINES``; the GraphModule it returns is trained directly):

1. ``pre-ln``             -- the reference, untransformed.
2. ``nf+shaped+tat``      -- no norms, normalized skips: ``remove_norms``, ``normalize_sums``, ``input_norm``,
   ``orthogonal_init``, ``attention_shaping`` (E-SPA, He et al. 2023, arXiv:2302.10322), ``tat``
   (Zhang et al. 2022, arXiv:2203.08120).
3. ``vanilla+shaped+tat`` -- no norms, no skips: ``remove_norms``, ``remove_skips``, ``input_norm``,
   ``orthogonal_init``, ``attention_shaping``, ``tat``.
4. ``value-skipinit``     -- as 3 with ``attention_shaping(mode="value-skipinit")``.
5. ``vanilla``            -- ``remove_norms``, ``remove_skips`` only (expected to stall).

``input_norm`` and ``orthogonal_init`` are there because ``tat`` (and DKS generally, docs/dks.md) sets its
targets under the assumption q = 1 at every activation input: ``orthogonal_init`` gives the linear layers
``σw² = 1`` (the models' 0.02-std init would shrink q about 20-fold per layer); ``input_norm`` puts a
parameter-free ``LocationNorm`` on the ViT's pixels and, in the LM, after the token + position embedding sum
(q = 1 at every token). Without ``input_norm`` ``tat`` refuses the LM unless the embedding table's mean square is
1 within 1e-3 (it is exactly 1 here: the model class initializes the token rows at norm ``sqrt(width)``).
``--drop-pass NAME`` removes a pass from every
pipeline (debugging only: the table says so), ``--set PASS.OPTION=VALUE`` sets a pass option.

Protocol. Adam at a constant learning rate, no weight decay, minibatches drawn without replacement
(``--kfac CONFIG ...``: those configurations train with netsurgeon's K-FAC instead, ``--kfac-lrs`` /
``--kfac-damping``; the reference keeps Adam, so they are measured against it). The
reference trains ``S`` steps; every other configuration trains ``ceil(f S)`` steps with ``f`` its goal factor
(``GOALS``: 1.2 for ``nf+shaped+tat``, 3 for the three skip-free ones; ``--horizon`` sets one factor for all),
so its goal can be read off directly (a constant learning rate makes the first ``S`` steps of a longer run the
run of ``S`` steps). The learning rate is chosen per configuration from a three-point grid (``LRS``) by the
mean training loss over the last 5% of ``--sweep-steps`` steps (default ``S``) on the first
``--select-seeds`` seeds, among lrs whose runs did not diverge; then every seed trains the configuration's
horizon at that lr (a sweep run already that long is reused). Goal check: the target is the reference's mean
(over seeds) smoothed training loss at step ``S``; ``harness.steps_to_loss`` on each configuration's mean
smoothed curve gives the first step it is reached, and the ratio is taken to the reference's own first step
there (as in ``train_deep.py``). Goals: ``nf+shaped+tat`` <= 1.2x, ``vanilla+shaped+tat`` <= 3x, ``vanilla``
does not reach it within 3x (stalls); ``value-skipinit`` has no goal of its own and is shown against 3x.

Default budget (``--budget full``): 12 blocks of width 128, 4 heads, context 128, batch 32, 3 seeds, one seed
for the lr sweep at the full ``S``: LM ``S`` = 1100 steps, ViT ``S`` = 2400 steps, chosen so one reference run
takes about 10 minutes at 1 thread on the 2-core development CPU (measured: docs/benchmarks.md, "Transformers
without normalization or skips": 0.53 s and 0.25 s per reference step on the idle machine). With every
configuration's horizon, 3 lrs and 3 seeds that is about 48 S steps per task, some 18 hours at 1 thread.
``--budget reduced`` is what was run (``REDUCED``: S = 200 / 300, 1 seed, the lr grid swept on 50 / 75 steps;
61 minutes on the shared machine). ``--quick`` is the smoke run
(2 blocks of width 32, a few steps, seconds).

Outputs in ``--out-dir`` (default ``docs/figures/train_transformer``): ``lm.png`` / ``vit.png`` (smoothed
training loss vs step of every configuration at its selected lr, mean over seeds with a min/max band),
``train_transformer.json`` (budgets, environment, pipelines and their reports, every run's loss curve and
summary) and ``train_transformer.md`` (the Markdown section, also printed). Both files are rewritten after
each task, so a long run keeps what it finished.

Usage:
    python benchmarks/train_transformer.py --budget reduced              # the reduced run, about 1 hour
    python benchmarks/train_transformer.py --quick --out-dir /tmp/tt     # smoke run, seconds
    python benchmarks/train_transformer.py --task lm --configs pre-ln vanilla --steps 300 --lrs 1e-3
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

import netsurgeon
from harness import (RunResult, add_output_args, command_line, environment, log, lr_sweep, machine_text, new_parser,
                     output_paths, plot_curves, run_record, save_json, save_text, steps_to_reference, subset_text,
                     torch_threads, train_run, write_table_md)
from harness.data import load_splits
from harness.optimizers import KFAC_OPTIONS, optimizer_spec
from harness.stats import loss_at, mean_sd
from harness.sweeps import lr_cell, seeds_cell, selected_curves
from harness.text import load_char_splits
from harness.transformer_models import CharTransformer, VisionTransformer

__all__ = ["CONFIGS", "TASKS", "GOALS", "PIPELINES", "Dims", "TaskBudget", "ConfigResult", "SequenceLogits",
           "pipeline", "build_model", "make_model_fn", "run_config", "run_task", "goal_rows", "summary_rows", "main"]

CONFIGS = ("pre-ln", "nf+shaped+tat", "vanilla+shaped+tat", "value-skipinit", "vanilla")
TASKS = ("lm", "vit")
GOALS: dict[str, float | None] = {"nf+shaped+tat": 1.2, "vanilla+shaped+tat": 3.0, "value-skipinit": None,
                                  "vanilla": 3.0}
"""Goal factor per configuration (steps to the reference's final loss over the reference's); ``vanilla``'s
goal is to *miss* it (it stalls); ``value-skipinit`` has none and trains 3x ``S`` like the skip-free ones."""
HORIZON = {"pre-ln": 1.0, "nf+shaped+tat": 1.2, "vanilla+shaped+tat": 3.0, "value-skipinit": 3.0, "vanilla": 3.0}
_SHAPE = "attention_shaping"
_SKIPINIT = (_SHAPE, {"mode": "value-skipinit"})
PIPELINES: dict[str, list[Any]] = {
    "pre-ln": [],
    "nf+shaped+tat": ["remove_norms", "normalize_sums", "input_norm", "orthogonal_init", _SHAPE, "tat"],
    "vanilla+shaped+tat": ["remove_norms", "remove_skips", "input_norm", "orthogonal_init", _SHAPE, "tat"],
    "value-skipinit": ["remove_norms", "remove_skips", "input_norm", "orthogonal_init", _SKIPINIT, "tat"],
    "vanilla": ["remove_norms", "remove_skips"],
}
"""The passes of each configuration; ``orthogonal_init`` gets ``seed`` = the run's seed (:func:`pipeline`)."""
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "train_transformer"


@dataclass(frozen=True)
class Dims:
    """The model's shape: blocks, width, heads, and the LM's context (the ViT has 64 tokens of patch 4)."""

    depth: int = 12
    width: int = 128
    heads: int = 4
    context: int = 128


@dataclass(frozen=True)
class TaskBudget:
    """Steps, batch, lr grids and data of one task."""

    steps: int                            # S, the reference's steps
    batch_size: int
    lrs: dict[str, tuple[float, ...]]     # configuration -> Adam lr grid
    sweep_steps: int | None               # steps of each lr-sweep run; None: S
    train_subset: int | None              # windows (lm) / images (vit); None: all
    test_subset: int | None
    sweep_test_subset: int | None = None  # test examples evaluated at the end of a shorter sweep run


# Adam grids, three points per configuration and task, each centred on the best lr of a pilot sweep (seed 0,
# lrs 3e-5 .. 3e-3; 40 LM steps, 60 ViT steps; docs/benchmarks.md); vanilla gets the reference's grid. The
# table flags a selected lr at its grid's edge. LM vanilla+shaped+tat was (3e-5, 1e-4, 3e-4) until the full
# budget selected 3e-4, its upper edge; the grid moved up one point.
LRS = {
    "lm": {"pre-ln": (1e-3, 3e-3, 1e-2), "nf+shaped+tat": (3e-4, 1e-3, 3e-3), "vanilla+shaped+tat": (1e-4, 3e-4, 1e-3),
           "value-skipinit": (1e-4, 3e-4, 1e-3), "vanilla": (1e-3, 3e-3, 1e-2)},
    "vit": {"pre-ln": (1e-4, 3e-4, 1e-3), "nf+shaped+tat": (1e-4, 3e-4, 1e-3), "vanilla+shaped+tat": (1e-5, 3e-5, 1e-4),
            "value-skipinit": (1e-5, 3e-5, 1e-4), "vanilla": (1e-4, 3e-4, 1e-3)},
}
FULL = {"lm": TaskBudget(1100, 32, LRS["lm"], None, None, None),
        "vit": TaskBudget(2400, 32, LRS["vit"], None, None, None)}
REDUCED = {"lm": TaskBudget(200, 32, LRS["lm"], 50, None, None, 128),
           "vit": TaskBudget(300, 32, LRS["vit"], 75, None, None, 256)}
REDUCED_SEEDS = 1
_QUICK_LRS = {c: (1e-3,) for c in CONFIGS}
QUICK = {"lm": TaskBudget(3, 4, _QUICK_LRS, None, 64, 16), "vit": TaskBudget(3, 8, _QUICK_LRS, None, 128, 32)}
QUICK_DIMS = Dims(depth=2, width=32, heads=2, context=32)


# ====================================================================== models
class SequenceLogits(nn.Module):
    """``net(x).transpose(1, 2)``: ``(B, T, V)`` logits as ``(B, V, T)``, the layout ``F.cross_entropy`` takes
    for a sequence of targets ``(B, T)``, so ``harness.train_run`` trains and tests the LM as it is.
    (Its test "accuracy" is then ``T`` times the per-character accuracy.)"""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).transpose(1, 2)


def pipeline(config: str, seed: int, drop: Sequence[str] = (), options: dict[str, dict[str, Any]] | None = None
             ) -> list[Any]:
    """The passes of ``config`` as ``netsurgeon.transform`` takes them, ``drop`` removed, ``options`` merged.

    Example:
        >>> pipeline("vanilla", 0)
        ['remove_norms', 'remove_skips']
        >>> pipeline("value-skipinit", 3)[3:]
        [('orthogonal_init', {'seed': 3}), ('attention_shaping', {'mode': 'value-skipinit'}), 'tat']
    """
    out: list[Any] = []
    for p in PIPELINES[config]:
        name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        if name in drop:
            continue
        if name == "orthogonal_init":
            opts["seed"] = seed
        opts.update((options or {}).get(name, {}))
        out.append((name, opts) if opts else name)
    return out


def _example(task: str, dims: Dims, vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if task == "lm":
        return torch.randint(0, vocab_size, (2, dims.context), generator=g)
    return torch.randn(2, 3, 32, 32, generator=g)


def build_model(task: str, config: str, seed: int, dims: Dims, vocab_size: int = 0, drop: Sequence[str] = (),
                options: dict[str, dict[str, Any]] | None = None) -> nn.Module:
    """The Pre-LN model of ``task`` at the current RNG state, rewritten into ``config``.

    Returns:
        The ``nn.Module`` itself for ``pre-ln``, else the ``torch.fx.GraphModule`` of ``netsurgeon.transform``.
    """
    if task == "lm":
        net: nn.Module = CharTransformer(vocab_size, dims.width, dims.depth, dims.heads, dims.context, norm="pre-ln")
    else:
        net = VisionTransformer(width=dims.width, depth=dims.depth, heads=dims.heads, norm="pre-ln")
    passes = pipeline(config, seed, drop, options)
    if not passes:
        return net
    return netsurgeon.transform(net, passes=passes, example_inputs=(_example(task, dims, vocab_size),))


def make_model_fn(task: str, config: str, dims: Dims, vocab_size: int = 0, drop: Sequence[str] = (),
                  options: dict[str, dict[str, Any]] | None = None) -> Callable[[int], nn.Module]:
    """``seed -> model`` for ``harness.train_run`` (called under its seeded RNG). The built model is cached per
    seed and a copy handed out, so the lrs of a sweep share one transform (the same model they would each
    have built: the first build runs under the same seeded RNG). The LM comes wrapped in
    :class:`SequenceLogits`."""
    cache: dict[int, nn.Module] = {}

    def build(seed: int) -> nn.Module:
        if seed not in cache:
            cache[seed] = build_model(task, config, seed, dims, vocab_size, drop, options)
        net = copy.deepcopy(cache[seed])
        return SequenceLogits(net) if task == "lm" else net

    build.cache = cache  # type: ignore[attr-defined]
    return build


# ====================================================================== runs
@dataclass
class ConfigResult:
    """The lr sweep and the runs at the selected lr of one (task, configuration)."""

    task: str
    config: str
    steps: int                                 # S
    total_steps: int                           # this configuration's horizon
    sweep_steps: int
    scores: dict[float, float | None]          # mean training loss at the sweep's end per lr; None: diverged
    best_lr: float | None
    sweep_runs: dict[float, list[RunResult]]
    runs: list[RunResult] = field(default_factory=list)
    passes: list[Any] = field(default_factory=list)
    transform_report: dict[str, Any] | None = None
    transform_s: float = 0.0
    wall_time_s: float = 0.0
    optimizer: str = "adam"                    # "kfac" for the configurations given to --kfac

    @property
    def best_at_edge(self) -> bool:
        """True when the selected lr is the smallest or largest of a grid of 2 or more."""
        return len(self.scores) > 1 and self.best_lr in (min(self.scores), max(self.scores))


def metric_at(run: RunResult, step: int, task: str) -> float | None:
    """Test bits per character (lm) or accuracy (vit) evaluated after ``step`` steps, or None."""
    if step not in run.eval_steps or (run.diverged and run.diverged_at is not None and run.diverged_at <= step):
        return None
    i = run.eval_steps.index(step)
    return run.test_loss[i] / math.log(2) if task == "lm" else run.test_acc[i]


def _horizon(config: str, steps: int, factor: float | None) -> int:
    return steps if config == "pre-ln" else math.ceil((factor or HORIZON[config]) * steps)


def run_config(task: str, config: str, data: tuple[torch.Tensor, ...], budget: TaskBudget, dims: Dims,
               seeds: Sequence[int], select_seeds: int, horizon: float | None = None, vocab_size: int = 0,
               drop: Sequence[str] = (), options: dict[str, dict[str, Any]] | None = None,
               cache: str | os.PathLike | None = None, descending: bool = False, optimizer: Any = "adam"
               ) -> ConfigResult:
    """Sweep the lr grid for ``sweep_steps`` on the first ``select_seeds`` seeds, then train every seed for the
    configuration's horizon at the best lr. ``cache``: ``harness.train_run``'s directory of finished runs;
    ``optimizer``: Adam by default, or what ``harness.optimizers.optimizer_spec`` gives."""
    start = time.perf_counter()
    total = _horizon(config, budget.steps, horizon)
    sweep_steps = min(budget.sweep_steps or budget.steps, total)
    fn = make_model_fn(task, config, dims, vocab_size, drop, options)
    t0 = time.perf_counter()
    with torch.random.fork_rng():  # the seed-0 build, timed and reported (train_run rebuilds under its own seeding)
        torch.manual_seed(seeds[0])
        first = build_model(task, config, seeds[0], dims, vocab_size, drop, options)
    transform_s = time.perf_counter() - t0
    report = netsurgeon.report(first).to_dict() if isinstance(first, torch.fx.GraphModule) else None
    kw = dict(optimizer=optimizer, batch_size=budget.batch_size, cache=cache)
    reuse = sweep_steps == total
    sweep_data = data
    if not reuse and budget.sweep_test_subset is not None:
        sweep_data = (data[0], data[1], data[2][:budget.sweep_test_subset], data[3][:budget.sweep_test_subset])
    sweep = lr_sweep(fn, sweep_data, lrs=budget.lrs[config], seeds=list(seeds[:select_seeds]), steps=sweep_steps,
                     eval_every=budget.steps if reuse else None, **kw)
    runs: list[RunResult] = []
    if sweep.best_lr is not None:
        done = list(sweep.best_runs) if reuse else []
        rest = list(seeds[len(done):])
        order = rest[::-1] if descending else rest  # a second process sharing the cache starts at the other end
        trained = {s: train_run(fn, data, lr=sweep.best_lr, steps=total, seed=s, eval_every=budget.steps, **kw)
                   for s in order}
        runs = done + [trained[s] for s in rest]
    return ConfigResult(task, config, budget.steps, total, sweep_steps, sweep.scores, sweep.best_lr, sweep.runs,
                        runs, pipeline(config, seeds[0], drop, options), report, transform_s,
                        time.perf_counter() - start, optimizer if isinstance(optimizer, str) else optimizer.name)


def load_task_data(task: str, budget: TaskBudget, dims: Dims) -> tuple[tuple[torch.Tensor, ...], int]:
    """``((x_train, y_train, x_test, y_test), vocab_size)``; vocab_size is 0 for the ViT."""
    if task == "lm":
        data, vocab = load_char_splits(dims.context, budget.train_subset, budget.test_subset)
        return data, vocab.size
    return load_splits("cifar10", budget.train_subset, budget.test_subset), 0


def run_task(task: str, budget: TaskBudget, dims: Dims, configs: Sequence[str], seeds: Sequence[int],
             select_seeds: int, horizon: float | None = None, drop: Sequence[str] = (),
             options: dict[str, dict[str, Any]] | None = None, keep_going: bool = False,
             log: Callable[[str], None] = print, cache: str | os.PathLike | None = None, descending: bool = False,
             kfac: dict[str, Any] | None = None) -> tuple[dict[str, ConfigResult], dict[str, str], int]:
    """Every configuration of ``task``: ``({config: result}, {config: refusal message}, vocab_size)``.
    ``kfac``: ``{"configs": [...], "lrs": (...), "damping": λ}``, configurations trained with K-FAC instead
    of Adam, on that lr grid.

    Each pipeline is built once before any training, so a pass that is missing or refuses the model stops the
    run at once (with ``keep_going`` the configuration is recorded as refused and the others run)."""
    data, vocab_size = load_task_data(task, budget, dims)
    refused: dict[str, str] = {}
    for config in configs:
        try:
            build_model(task, config, seeds[0], dims, vocab_size, drop, options)
        except Exception as e:  # noqa: BLE001 -- recorded with its type, or re-raised
            if not keep_going:
                raise
            refused[config] = f"{type(e).__name__}: {e}"
            log(f"[{task}/{config}] refused: {refused[config]}")
    results: dict[str, ConfigResult] = {}
    for config in configs:
        if config in refused:
            continue
        b, spec = budget, "adam"
        if kfac and config in kfac["configs"]:
            b = dataclasses.replace(budget, lrs={**budget.lrs, config: tuple(kfac["lrs"])})
            spec = optimizer_spec("kfac", damping=kfac["damping"])
        res = run_config(task, config, data, b, dims, seeds, select_seeds, horizon, vocab_size, drop, options,
                         cache, descending, spec)
        results[config] = res
        losses = ", ".join(f"{loss_at(r, res.steps):.4g}" for r in res.runs) or "all diverged"
        log(f"[{task}/{config}] best lr {res.best_lr}, loss@{res.steps}: {losses} ({res.wall_time_s:.0f} s)")
    return results, refused, vocab_size


# ====================================================================== summaries
def goal_rows(results: dict[str, ConfigResult]) -> dict[str, dict[str, Any]]:
    """Steps to the reference's final smoothed loss, per configuration (as ``train_deep.goal_rows``).

    ``goal_met``: reached within the goal factor (``GOALS``); for ``vanilla``, *not* reached within it
    (it stalls); None where there is no goal or no reference."""
    ref = results.get("pre-ln")
    found = steps_to_reference(ref.runs, ref.steps, {c: r.runs for c, r in results.items()}) if ref else None
    if found is None:
        return {c: {"target": None, "reference_steps": None, "steps_to_target": None, "ratio": None,
                    "goal": GOALS.get(c), "goal_met": None} for c in results}
    target, ref_steps, reached = found
    out = {}
    for config, n in reached.items():
        goal = GOALS.get(config)
        within = n is not None and goal is not None and n <= goal * ref_steps
        met = None if goal is None else (not within if config == "vanilla" else within)
        out[config] = {"target": target, "reference_steps": ref_steps, "steps_to_target": n,
                       "ratio": None if n is None else n / ref_steps, "goal": goal, "goal_met": met}
    return out


def _goal_text(config: str) -> str:
    g = GOALS.get(config)
    if g is None:
        return "–"
    return f"stalls (not ≤ {g:g}x)" if config == "vanilla" else f"≤ {g:g}x"


def summary_rows(task: str, results: dict[str, ConfigResult], refused: dict[str, str] | None = None,
                 drop: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One table row per configuration of ``task`` (refused configurations included)."""
    goals, rows = goal_rows(results), []
    metric = "test bits/char" if task == "lm" else "test acc"
    fmt = ".3f" if task == "lm" else ".4f"
    for config in CONFIGS:
        if config in (refused or {}):
            rows.append({"configuration": config, "lr": "refused", "_goal": None, "_losses": [], "_tests": []})
            continue
        if config not in results:
            continue
        res, g = results[config], goals[config]
        if g["steps_to_target"] is not None:
            reach = f"{g['steps_to_target']} ({g['ratio']:.2f}x)"
        else:
            reach = f"not in {res.total_steps}" if res.runs else "–"
        name = config + (" (without " + ", ".join(d for d in drop if d in str(PIPELINES[config])) + ")"
                         if any(d in str(PIPELINES[config]) for d in drop) else "") \
            + (" [K-FAC]" if res.optimizer == "kfac" else "")
        S, T = res.steps, res.total_steps
        rows.append({
            "configuration": name, "lr": lr_cell(res.best_lr, res.best_at_edge), "seeds": seeds_cell(res.runs),
            f"train loss @{S}": mean_sd([loss_at(r, S) for r in res.runs], ".4f"),
            "train loss @end (steps)": (mean_sd([loss_at(r, T) for r in res.runs], ".4f") + f" ({T})"
                                        if T != S else "same"),
            f"{metric} @{S}": mean_sd([metric_at(r, S, task) for r in res.runs], fmt),
            f"{metric} @end": mean_sd([metric_at(r, T, task) for r in res.runs], fmt) if T != S else "same",
            "steps to ref. loss (ratio)": reach, "goal": _goal_text(config),
            "met": {None: "–", True: "yes", False: "no"}[g["goal_met"]],
            "s/step": mean_sd([r.median_step_time_s for r in res.runs], ".3f"),
            "_goal": g, "_losses": [loss_at(r, S) for r in res.runs],
            "_tests": [metric_at(r, T, task) for r in res.runs]})
    return rows


def sweep_table(results: dict[str, ConfigResult]) -> str:
    """Mean training loss at the end of the sweep per lr (or "diverged at step n"), one row per configuration."""
    rows = []
    lrs = sorted({lr for res in results.values() for lr in res.sweep_runs})
    cols = ["configuration", "sweep steps"] + [f"lr {lr:g}" for lr in lrs]
    for config, res in results.items():
        row: dict[str, Any] = {"configuration": config, "sweep steps": res.sweep_steps}
        for lr, runs in res.sweep_runs.items():
            key = f"lr {lr:g}"
            bad = [r for r in runs if r.diverged]
            row[key] = (f"diverged at step {min(r.diverged_at for r in bad)}" if bad
                        else f"{np.mean([loss_at(r, res.sweep_steps) for r in runs]):.4f}"
                        + (" *" if lr == res.best_lr else ""))
        rows.append(row)
    return write_table_md(rows, cols)


def _run_dict(r: RunResult, res: ConfigResult) -> dict[str, Any]:
    return run_record(r, {"loss_at_S": loss_at(r, res.steps) if r.steps >= res.steps else None,
                          "test_at_S": metric_at(r, res.steps, res.task), "test_at_end": metric_at(r, r.steps, res.task)})


def _task_record(task: str, budget: TaskBudget, dims: Dims, results: dict[str, ConfigResult],
                 refused: dict[str, str], rows: list[dict[str, Any]], vocab_size: int, wall: float) -> dict[str, Any]:
    return {
        "budget": dataclasses.asdict(budget), "dims": dataclasses.asdict(dims), "vocab_size": vocab_size,
        "wall_time_s": wall, "refused": refused,
        "rows": [{k: v for k, v in r.items() if k != "_goal"} | {"goal": r["_goal"]} for r in rows],
        "configs": {c: {"passes": r.passes, "best_lr": r.best_lr, "scores": r.scores, "steps": r.steps,
                        "total_steps": r.total_steps, "sweep_steps": r.sweep_steps, "wall_time_s": r.wall_time_s,
                        "transform_s": r.transform_s, "transform_report": r.transform_report,
                        "sweep_runs": {repr(lr): [_run_dict(x, r) for x in rs] for lr, rs in r.sweep_runs.items()},
                        "runs": [_run_dict(x, r) for x in r.runs]} for c, r in results.items()}}


def _pass_text(passes: list[Any]) -> str:
    def one(p: Any) -> str:
        if isinstance(p, str):
            return p
        opts = ", ".join(f"{k}={v!r}" for k, v in p[1].items() if k != "seed")
        return f"{p[0]}({opts})" if opts else p[0]
    return ", ".join(one(p) for p in passes) or "none"


def _markdown_task(task: str, budget: TaskBudget, dims: Dims, results: dict[str, ConfigResult],
                   refused: dict[str, str], rows: list[dict[str, Any]], args: argparse.Namespace, vocab_size: int,
                   figure: Path | None, md_dir: Path, wall: float) -> str:
    if task == "lm":
        head = (f"### lm: {dims.depth}-block Pre-LN char transformer (width {dims.width}, {dims.heads} heads, "
                f"context {dims.context}, vocab {vocab_size}) on Shakespeare")
        data = (f"windows of {dims.context} characters: train {subset_text(budget.train_subset)}, "
                f"test {subset_text(budget.test_subset)}")
    else:
        head = f"### vit: {dims.depth}-block Pre-LN ViT (width {dims.width}, {dims.heads} heads, patch 4) on CIFAR-10"
        data = f"train images {subset_text(budget.train_subset)}, test images {subset_text(budget.test_subset)}"
    sweep = results[next(iter(results))].sweep_steps if results else budget.steps
    grids = "; ".join(f"{c} [" + ", ".join(f"{v:g}" for v in budget.lrs[c]) + "]" for c in results)
    lines = [head, "",
             f"S = {budget.steps} steps for pre-ln; the others train " +
             ", ".join(f"{c} {r.total_steps}" for c, r in results.items() if c != "pre-ln") +
             f". Adam, constant lr, batch {budget.batch_size}; {data}. lr grids: {grids}; each lr trained "
             f"{budget.sweep_steps or budget.steps} steps on {args.select_seeds} seed(s) and selected by training "
             f"loss there; {args.seeds} seed(s) at the selected lr. Wall time {wall / 60:.1f} min. "
             "Mean ± sd over seeds.", ""]
    if args.kfac:
        lines += [f"Configurations marked [K-FAC] train with netsurgeon's K-FAC instead of Adam: damping "
                  f"{args.kfac_damping:g}, options " + ", ".join(f"{k}={v}" for k, v in KFAC_OPTIONS.items())
                  + " (parameters outside linear layers, such as embeddings and attention biases, get its base "
                  "update, SGD with momentum at its lr); their lr grid is the one listed for them.", ""]
    lines.append(write_table_md(rows, [c for c in rows[0] if not c.startswith("_")] if rows else []))
    ref = next((r["_goal"] for r in rows if r["configuration"] == "pre-ln" and r["_goal"]), None)
    if ref and ref["target"] is not None:
        unit = " nats/char" if task == "lm" else ""
        lines.append(f"Target = pre-ln's mean smoothed training loss at step {budget.steps}: "
                     f"{ref['target']:.4f}{unit}, reached by pre-ln's mean curve at step {ref['reference_steps']}.")
        lines.append("")
    lines += [f"Learning-rate sweep ({sweep} steps, mean training loss over the last 5%; * selected):", "",
              sweep_table(results)]
    lines += ["Pipelines: " + "; ".join(f"`{c}`: {_pass_text(r.passes)}" for c, r in results.items()) + ".", ""]
    for c, msg in refused.items():
        lines += [f"- `{c}` refused: `{msg}`"]
    if refused:
        lines.append("")
    if figure is not None:
        lines += [f"![{figure.stem}]({os.path.relpath(figure.resolve(), md_dir)})", ""]
    return "\n".join(lines)


# ====================================================================== CLI
def _parse_set(p: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        name, dot, opt = key.partition(".")
        if not (eq and dot and name and opt):
            p.error(f"--set {item!r}: expected PASS.OPTION=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.setdefault(name, {})[opt] = value
    return out


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = new_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 blocks of width 32, 3 steps (9 for the "
                   "3x configurations), tiny data subsets, 1 seed, 1 lr")
    p.add_argument("--budget", choices=("full", "reduced"), default="full",
                   help="full: S = 1100 (lm) / 2400 (vit), 3 seeds; reduced: the run reported in docs/benchmarks.md "
                        "(S = 200 / 300, lr sweep on 50 / 75 steps, 1 seed)")
    p.add_argument("--task", choices=("lm", "vit", "both"), default="both", help="task(s) to run (default both)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="configurations to run")
    p.add_argument("--steps", type=int, help="S, pre-ln's steps, for every task run")
    p.add_argument("--sweep-steps", type=int, help="steps of each lr-sweep run (default S)")
    p.add_argument("--horizon", type=float, help="train every non-reference configuration this many times S "
                   "(default: its goal factor, 1.2 or 3)")
    p.add_argument("--batch-size", type=int, help="default 32")
    p.add_argument("--lrs", type=float, nargs="+", help="one Adam lr grid for every configuration "
                   "(default: per task and configuration, LRS)")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default 3; --quick and reduced: 1)")
    p.add_argument("--select-seeds", type=int, default=1, help="seeds used in the lr sweep (default 1)")
    p.add_argument("--train-subset", type=int, help="fixed random subset of training windows / images")
    p.add_argument("--test-subset", type=int, help="fixed random subset of test windows / images")
    p.add_argument("--depth", type=int, help="blocks (default 12)")
    p.add_argument("--width", type=int, help="model width (default 128)")
    p.add_argument("--heads", type=int, help="attention heads (default 4)")
    p.add_argument("--context", type=int, help="LM context in characters (default 128)")
    p.add_argument("--drop-pass", action="append", default=[], metavar="PASS",
                   help="remove this pass from every pipeline (debugging; the table marks it); repeatable")
    p.add_argument("--set", action="append", default=[], metavar="PASS.OPTION=VALUE", dest="set_options",
                   help="a pass option for every pipeline that runs the pass, e.g. tat.tau=0.1; repeatable")
    p.add_argument("--kfac", nargs="+", choices=CONFIGS, default=[], metavar="CONFIG",
                   help="configurations trained with netsurgeon's K-FAC instead of Adam (harness.optimizers."
                        "KFAC_OPTIONS; the table marks them [K-FAC]); the others keep Adam")
    p.add_argument("--kfac-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03],
                   help="K-FAC's lr grid (default 0.003 0.01 0.03)")
    p.add_argument("--kfac-damping", type=float, default=1e-2, help="K-FAC's damping (default 0.01)")
    p.add_argument("--cache-dir", type=Path, help="directory of finished runs, content-addressed (harness.train_run's "
                   "cache=): a run already there is read back, so a long run can be split over several invocations "
                   "(e.g. --configs subsets in parallel processes, then all configurations to assemble the tables)")
    p.add_argument("--seeds-descending", action="store_true",
                   help="train the seeds after the lr sweep from the last to the first (the results are the same): "
                        "a second process on the same --cache-dir then works from the other end")
    p.add_argument("--keep-going", action="store_true",
                   help="record a configuration whose pipeline fails to build as refused and run the others "
                        "(default: stop at once)")
    add_output_args(p, DEFAULT_OUT, "train_transformer.md", threads=1,
                    why="; the benchmark machine's 2 cores are shared")
    args = p.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick or args.budget == "reduced" else 3)
    args.select_seeds = min(args.select_seeds, args.seeds)
    if args.seeds < 1 or args.select_seeds < 1:
        p.error("need --seeds >= 1 and --select-seeds >= 1")
    if args.horizon is not None and args.horizon < 1:
        p.error(f"need --horizon >= 1, got {args.horizon:g}")
    for name in ("steps", "sweep_steps", "batch_size", "depth", "width", "heads", "context", "train_subset",
                 "test_subset"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not args.kfac_damping > 0 or min(args.kfac_lrs) <= 0:
        p.error(f"need --kfac-damping > 0 and --kfac-lrs > 0, got {args.kfac_damping:g} and {args.kfac_lrs}")
    args.options = _parse_set(p, args.set_options)
    base = QUICK_DIMS if args.quick else Dims()
    args.dims = dataclasses.replace(base, **{k: getattr(args, k) for k in ("depth", "width", "heads", "context")
                                             if getattr(args, k) is not None})
    if args.dims.width % args.dims.heads:
        p.error(f"--width {args.dims.width} is not divisible by --heads {args.dims.heads}")
    args.tasks = list(TASKS) if args.task == "both" else [args.task]
    args.command = command_line("train_transformer.py", argv)
    return args


def _budget(task: str, args: argparse.Namespace) -> TaskBudget:
    b = (QUICK if args.quick else REDUCED if args.budget == "reduced" else FULL)[task]
    overrides = {"steps": args.steps, "sweep_steps": args.sweep_steps, "batch_size": args.batch_size,
                 "train_subset": args.train_subset, "test_subset": args.test_subset,
                 "lrs": {c: tuple(args.lrs) for c in CONFIGS} if args.lrs else None}
    return dataclasses.replace(b, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the figures, JSON and Markdown; return the summary.

    Returns:
        ``{"rows": {task: [row, ...]}, "markdown": str, "files": [Path, ...], "json": Path}``.
    """
    args = _parse(argv)
    with torch_threads(args.threads), _flush_denormal():
        return _main(args)


@contextlib.contextmanager
def _flush_denormal() -> Iterator[None]:
    """Flush denormal floats to zero while the benchmark runs. ``vanilla``'s signal shrinks to ~1e-36 at
    init, and denormal arithmetic made its CPU steps 10-20x slower (11.3 s against 0.55 s measured on the
    LM); values that small are zero for every purpose here."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    out_dir, md_path = output_paths(args, "train_transformer.md")
    env = {**environment(args.threads), "passes": netsurgeon.list_passes()}
    seeds = list(range(args.seeds))
    all_rows: dict[str, list[dict[str, Any]]] = {}
    sections, figures, record = [], [], {}
    header = [f"Command: `{args.command}`  ", f"{machine_text(env, shared=True)}.", ""]
    json_path = out_dir / "train_transformer.json"
    for task in args.tasks:
        start = time.perf_counter()
        budget = _budget(task, args)
        results, refused, vocab_size = run_task(task, budget, args.dims, args.configs, seeds, args.select_seeds,
                                                args.horizon, args.drop_pass, args.options, args.keep_going, log=log,
                                                cache=args.cache_dir, descending=args.seeds_descending,
                                                kfac={"configs": args.kfac, "lrs": args.kfac_lrs,
                                                      "damping": args.kfac_damping} if args.kfac else None)
        wall = time.perf_counter() - start
        rows = summary_rows(task, results, refused, args.drop_pass)
        all_rows[task] = rows
        figure = None
        if results:
            figure = plot_curves(selected_curves(results), out_dir / f"{task}.png",
                                 f"{task}: pre-ln {budget.steps} steps, others up to "
                                 f"{max(r.total_steps for r in results.values())}")
            figures.append(figure)
        sections.append(_markdown_task(task, budget, args.dims, results, refused, rows, args, vocab_size, figure,
                                       md_path.parent.resolve(), wall))
        record[task] = _task_record(task, budget, args.dims, results, refused, rows, vocab_size, wall)
        save_json({"command": args.command, "environment": env, "seeds": seeds, "select_seeds": args.select_seeds,
                   "horizon": args.horizon, "drop_pass": args.drop_pass, "options": args.options,
                   "goals": GOALS, "tasks": record}, json_path)
        md = "\n".join(header + sections)
        save_text(md, md_path)
    print(md)
    return {"rows": all_rows, "markdown": md, "files": figures + [md_path], "json": json_path}


if __name__ == "__main__":
    main()
