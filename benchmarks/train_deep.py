"""Deep networks without BatchNorm or skip connections: DKS and TAT on real data (issue 4 §4).

Four configurations of one deep network are trained with the same step budget:

* ``reference``   -- ResNet-style: BatchNorm after every weight layer and residual skips
  (post-activation blocks of two layers, He et al. 2016, arXiv:1512.03385), ReLU;
* ``vanilla``     -- the same weight layers in a plain chain, no BatchNorm, no skips,
  PyTorch's default init, ReLU;
* ``vanilla+dks`` -- the vanilla chain with tanh, then
  ``netsurgeon.transform(net, ["input_norm", "orthogonal_init", ("dks", {"zeta": 1.5})])``
  (Deep Kernel Shaping, Martens et al. 2021, arXiv:2110.01765; docs/theory.md §4). DKS is run on
  tanh because it works poorly with ReLU (docs/theory.md §4.2: ReLU's map stays degenerate);
* ``vanilla+tat`` -- the vanilla ReLU chain, then
  ``transform(net, ["input_norm", "orthogonal_init", ("tat", {"eta": 0.9})])``, which
  turns every ReLU into TAT's tailored leaky ReLU "TReLU" (Zhang et al. 2022,
  arXiv:2203.08120; docs/theory.md §5).

Two network families: ``mlp``, a 50-layer MLP of width 256 on Fashion-MNIST (flattened to
784 features; 784->256, 48 x 256->256, 256->10), and ``conv``, a 21-conv-layer CNN on the
CIFAR-10 subset (3x3 convs, widths 16/32/64 in stages of 8/6/6 convs after a stem conv,
stride-2 transitions, global average pooling, linear head; the reference adds a 1x1
projection shortcut with BatchNorm at each of the two transitions; ``--conv-widths`` sets
the three widths).

Protocol. Each configuration is trained with SGD (momentum 0.9) and with Adam (and, with
``--optimizers lm``, with netsurgeon's layer-wise second-order optimizer ``LayerwiseLM``,
options ``LM_OPTIONS``; with ``--optimizers kfac``, with ``netsurgeon.optim.KFAC``, options
``KFAC_OPTIONS``, its damping swept over ``--dampings-kfac`` crossed with its lr grid), at constant
learning rate, cross-entropy loss, minibatches drawn without replacement. The
reference trains for ``S`` steps; the three others for ``ceil(1.5 S)`` steps
(``--goal-factor``), so that the goal "reach the reference's final training loss within
1.5x the reference's steps" can be checked directly. With a constant learning rate the
first ``S`` steps of a longer run are exactly the run of ``S`` steps, so every table
column "@S" compares equal budgets. The learning rate is swept over a three-point grid
per configuration (``DEFAULT_BUDGETS``; ``--lrs-sgd`` / ``--lrs-adam`` / ``--lrs-lm`` set one
grid for all) with the first ``--select-seeds`` seeds (default 1) and chosen by the lowest mean
training loss over the last 5% of the first ``S`` steps among the learning rates whose
runs did not diverge; the remaining seeds then run at that learning rate only. Goal
check: the target is the reference's mean (over seeds) smoothed training loss at step
``S``; ``harness.steps_to_loss`` on the mean smoothed curve gives the first step each
configuration reaches it, and the ratio to the reference's own step count is reported
(goal: <= 1.5). With more than one optimizer, a second column measures every run against the
*best* reference, the reference trained with the optimizer that gave it the lowest loss at ``S``
(issue 18's headline: vanilla + DKS or TAT with K-FAC within 1.0x of it).

Default budget (about 40 minutes on 2 CPU cores, 3 seeds): MLP ``S = 400`` steps of batch
128 on all 60,000 Fashion-MNIST training images, test on all 10,000; CNN ``S = 200`` steps
of batch 32 on all 10,000 images of the CIFAR-10 subset, test on its 1,000 test images.
That is 110 training runs of ``S`` or ``1.5 S`` steps. Under CPU contention (another
busy process) use ``--threads 1``: two torch threads then slow every step many times over.

Outputs in ``--out-dir`` (default ``docs/figures/train_deep``): ``{family}_{optimizer}.png``
(smoothed training loss of the four configurations at their selected learning rates,
mean over seeds with a min/max band), ``train_deep.json`` (budgets, environment, every
run's loss curve and summary) and ``train_deep.md`` (the Markdown section, also printed).

Usage:
    nice python benchmarks/train_deep.py                          # default run, about 40 min on 2 cores
    python benchmarks/train_deep.py --quick --out-dir /tmp/td     # smoke run, seconds
    python benchmarks/train_deep.py --only mlp --steps 3000 --seeds 5 --select-seeds 3   # bigger run
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

import netsurgeon
from harness import (RunResult, add_output_args, command_line, environment, log, lr_grid_text, lr_sweep, machine_text,
                     new_parser, output_paths, plot_curves, run_record, save_json, steps_to_reference, subset_text,
                     torch_threads, train_run, write_table_md)
from harness.data import load_splits
from harness.optimizers import KFAC_OPTIONS, LM_OPTIONS, optimizer_spec
from harness.stats import loss_at, mean_sd
from harness.sweeps import lr_cell, seeds_cell, selected_curves

__all__ = ["CONFIGS", "FAMILIES", "LM_OPTIONS", "optimizer_spec", "FamilyBudget", "Shaping", "ConfigResult", "build_network", "make_model_fn",
           "run_family", "goal_rows", "summary_rows", "main"]

CONFIGS = ("reference", "vanilla", "vanilla+dks", "vanilla+tat")
FAMILIES = ("mlp", "conv")
OPTIMIZERS = ("sgd", "adam")          # the default; "lm" (LayerwiseLM) and "kfac" (K-FAC) are opt-in
OPTIMIZER_CHOICES = OPTIMIZERS + ("lm", "kfac", "soap", "psgd")  # lm: LayerwiseLM (issue 7); kfac: KFAC_OPTIONS;
# soap / psgd: heavyball's SOAP and PSGDKron (optional package; harness.optimizers.HEAVYBALL_OPTIONS)
ACTIVATION = {"reference": "relu", "vanilla": "relu", "vanilla+dks": "tanh", "vanilla+tat": "relu"}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "train_deep"


@dataclass(frozen=True)
class Shaping:
    """The options of the transformed configurations: ``dks``'s zeta, ``tat``'s eta (their
    defaults, docs/theory.md §4-§5) and ``orthogonal_init``'s conv scheme ("delta" or "full")."""

    zeta: float = 1.5
    eta: float = 0.9
    conv_init: str = "delta"

MLP_WIDTH, MLP_DEPTH = 256, 50           # weight layers: 1 input + 48 hidden + 1 output
CONV_WIDTHS, CONV_BLOCKS = (16, 32, 64), (4, 3, 3)  # two 3x3 convs per block, plus a stem conv


Grid = dict[str, dict[str, tuple[float, ...]]]  # optimizer -> configuration -> learning rates
_OPT_NAMES = {"sgd": "SGD", "adam": "Adam", "lm": "LayerwiseLM", "kfac": "K-FAC", "soap": "SOAP (heavyball)",
              "psgd": "PSGDKron (heavyball)"}


@dataclass(frozen=True)
class FamilyBudget:
    """Data, step budget and learning-rate grids of one network family."""

    dataset: str
    steps: int                 # S: the reference's steps (others train ceil(goal_factor * S))
    batch_size: int
    lrs: Grid
    train_subset: int | None   # None: the whole training split
    test_subset: int | None
    dampings: tuple[float, ...] = (1e-2, 1e-1, 1.0)  # K-FAC's damping grid (crossed with its lr grid)


# LayerwiseLM: a seed-0 pilot on the CNN (ζ = 3, full-window convs) did best at 0.01 for the
# reference and at 0.003 for DKS, whose loss went to 250-480 at 0.01.
_LM = {"reference": (0.003, 0.01, 0.03), "vanilla": (0.003, 0.01, 0.03), "vanilla+dks": (0.001, 0.003, 0.01),
       "vanilla+tat": (0.001, 0.003, 0.01)}


# K-FAC (true Fisher, momentum 0.9, factored damping swept over FamilyBudget.dampings): one grid for all.
# Pilot (CNN reference, seed 0, S = 200; docs/benchmarks.md, "K-FAC"): lr 0.03 with damping 1e-3 / 1e-2 / 0.1
# gave 2.10 / 1.96 / 1.65, lr 0.01 and 0.1 with damping 1e-2 1.73 and 2.08: the damping grid is centred on 0.1.
_KFAC = {c: (0.01, 0.03, 0.1) for c in CONFIGS}


def _grid(sgd: Sequence[float], adam: dict[str, Sequence[float]], lm: dict[str, Sequence[float]] = _LM,
          kfac: dict[str, Sequence[float]] = _KFAC) -> Grid:
    """The lr grids; heavyball's SOAP and PSGD (Adam-like step sizes) get Adam's."""
    adam_grid = {c: tuple(adam[c]) for c in CONFIGS}
    return {"sgd": {c: tuple(sgd) for c in CONFIGS}, "adam": adam_grid, "lm": {c: tuple(lm[c]) for c in CONFIGS},
            "kfac": {c: tuple(kfac[c]) for c in CONFIGS}, "soap": dict(adam_grid), "psgd": dict(adam_grid)}


# Three-point grids placed by a pilot sweep (seed 0; SGD lr 0.003-1 for the MLP, 0.003-0.3
# for the CNN; Adam 1e-4-3e-3; 400 MLP steps of batch 128, 300 CNN steps of batch 32):
# SGD did best at its lowest lr, 0.003, for every configuration that trained (DKS/TAT blow
# up from 0.01-0.03 on), and Adam's best lies lower for DKS/TAT than for the reference.
# The table flags a selected lr at the edge of its grid.
_SGD = (0.001, 0.003, 0.01)
_ADAM_REF = (3e-4, 1e-3, 3e-3)
DEFAULT_BUDGETS = {
    "mlp": FamilyBudget("fashion_mnist", 400, 128, _grid(_SGD, {
        "reference": _ADAM_REF, "vanilla": _ADAM_REF, "vanilla+dks": (3e-5, 1e-4, 3e-4),
        "vanilla+tat": (3e-5, 1e-4, 3e-4)}), None, None),
    "conv": FamilyBudget("cifar10", 200, 32, _grid(_SGD, {
        "reference": _ADAM_REF, "vanilla": _ADAM_REF, "vanilla+dks": (1e-4, 3e-4, 1e-3),
        "vanilla+tat": (3e-5, 1e-4, 3e-4)}), None, None),
}
_QUICK_GRID = _grid((0.003,), {c: (1e-4,) for c in CONFIGS}, {c: (0.003,) for c in CONFIGS},
                    {c: (0.01,) for c in CONFIGS})
QUICK_BUDGETS = {
    "mlp": FamilyBudget("fashion_mnist", 4, 16, _QUICK_GRID, 256, 128, (1e-2,)),
    "conv": FamilyBudget("cifar10", 4, 16, _QUICK_GRID, 256, 128, (1e-2,)),
}


# ====================================================================== networks
def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "tanh": nn.Tanh}[name]()


class ResidualBlock(nn.Module):
    """Post-activation residual block ``act(branch(x) + shortcut(x))`` (arXiv:1512.03385)."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.branch, self.shortcut, self.act = branch, shortcut, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.branch(x) + self.shortcut(x))


def _mlp_layers(bias: bool) -> tuple[nn.Module, list[tuple[nn.Module, nn.Module, int, int, int]], list[nn.Module]]:
    """Stem, (layer, layer, in, out, stride) pairs and head of the MLP."""
    pairs = [(nn.Linear(MLP_WIDTH, MLP_WIDTH, bias=bias), nn.Linear(MLP_WIDTH, MLP_WIDTH, bias=bias),
              MLP_WIDTH, MLP_WIDTH, 1) for _ in range((MLP_DEPTH - 2) // 2)]
    return nn.Linear(784, MLP_WIDTH, bias=bias), pairs, [nn.Linear(MLP_WIDTH, 10)]


def _conv_layers(bias: bool, widths: Sequence[int] = CONV_WIDTHS
                 ) -> tuple[nn.Module, list[tuple[nn.Module, nn.Module, int, int, int]], list[nn.Module]]:
    """Stem, (conv, conv, in, out, stride) pairs and head of the CNN with stage ``widths``."""
    pairs, c = [], widths[0]
    for stage, (width, blocks) in enumerate(zip(widths, CONV_BLOCKS)):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            pairs.append((nn.Conv2d(c, width, 3, stride, 1, bias=bias), nn.Conv2d(width, width, 3, 1, 1, bias=bias),
                          c, width, stride))
            c = width
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Conv2d(3, widths[0], 3, 1, 1, bias=bias), pairs, head


def build_network(family: str, activation: str, residual: bool,
                  conv_widths: Sequence[int] = CONV_WIDTHS) -> nn.Sequential:
    """The deep network of ``family``: a plain chain, or with ``residual=True`` the
    ResNet-style reference (BatchNorm after every weight layer but the head, skips
    around every pair of layers, 1x1 conv + BatchNorm projections where the shape changes).

    Args:
        family: "mlp" or "conv".
        activation: "relu" or "tanh".
        residual: build the BatchNorm + skip reference instead of the plain chain.
        conv_widths: the CNN's three stage widths (default ``CONV_WIDTHS``).

    Returns:
        An ``nn.Sequential`` at PyTorch's default initialization.
    """
    if len(conv_widths) != len(CONV_BLOCKS) or min(conv_widths) < 1:
        raise ValueError(f"conv_widths needs {len(CONV_BLOCKS)} positive widths, got {tuple(conv_widths)}")
    stem, pairs, head = _mlp_layers(bias=not residual) if family == "mlp" else _conv_layers(not residual, conv_widths)
    norm = nn.BatchNorm1d if family == "mlp" else nn.BatchNorm2d
    width = MLP_WIDTH if family == "mlp" else conv_widths[0]
    layers: list[nn.Module] = [stem] + ([norm(width)] if residual else []) + [_act(activation)]
    for first, second, c_in, c_out, stride in pairs:
        if not residual:
            layers += [first, _act(activation), second, _act(activation)]
            continue
        branch = nn.Sequential(first, norm(c_out), _act(activation), second, norm(c_out))
        shortcut = (nn.Identity() if c_in == c_out and stride == 1 else
                    nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out)))
        layers.append(ResidualBlock(branch, shortcut, _act(activation)))
    return nn.Sequential(*layers, *head)


def _passes(config: str, seed: int, shaping: Shaping = Shaping()) -> list[Any]:
    """The netsurgeon passes turning the vanilla chain into ``config``."""
    last = {"vanilla+dks": ("dks", {"zeta": shaping.zeta}), "vanilla+tat": ("tat", {"eta": shaping.eta})}[config]
    return ["input_norm", ("orthogonal_init", {"seed": seed, "conv": shaping.conv_init}), last]


def make_model_fn(family: str, config: str, shaping: Shaping = Shaping(),
                  conv_widths: Sequence[int] = CONV_WIDTHS) -> Callable[[int], nn.Module]:
    """``seed -> model`` for ``harness.train_run`` (called under the seeded RNG)."""
    input_shape = (784,) if family == "mlp" else (3, 32, 32)

    def build(seed: int) -> nn.Module:
        net = build_network(family, ACTIVATION[config], residual=config == "reference", conv_widths=conv_widths)
        if config in ("vanilla+dks", "vanilla+tat"):
            net = netsurgeon.transform(net, _passes(config, seed, shaping),
                                       example_inputs=torch.randn(2, *input_shape))
        return net

    return build


# ====================================================================== runs
@dataclass
class ConfigResult:
    """The sweep and the selected runs of one (family, optimizer, configuration)."""

    family: str
    optimizer: str
    config: str
    steps: int                       # S, the common budget
    total_steps: int                 # steps actually trained (S for the reference)
    scores: dict[float, float | None]  # mean training loss at S per lr; None if a seed diverged
    best_lr: float | None
    runs: list[RunResult] = field(default_factory=list)          # all seeds at best_lr
    sweep_runs: dict[float, list[RunResult]] = field(default_factory=dict)
    wall_time_s: float = 0.0
    damping: float | None = None     # K-FAC: the selected damping (scores and sweep_runs are at it)
    damping_scores: dict[float, dict[float, float | None]] = field(default_factory=dict)  # K-FAC: damping -> scores
    damping_runs: dict[float, dict[float, list[RunResult]]] = field(default_factory=dict)  # K-FAC: every sweep run

    @property
    def best_at_edge(self) -> bool:
        """True when the selected lr is the smallest or largest of a grid of 2 or more."""
        return len(self.scores) > 1 and self.best_lr in (min(self.scores), max(self.scores))


def acc_at(run: RunResult, step: int) -> float | None:
    """Test accuracy evaluated after ``step`` steps, or None."""
    if step in run.eval_steps and not (run.diverged and run.diverged_at is not None and run.diverged_at <= step):
        return run.test_acc[run.eval_steps.index(step)]
    return None


def _select(sweep_runs: dict[float, list[RunResult]], steps: int) -> tuple[dict[float, float | None], float | None]:
    """Per-lr mean training loss at ``steps`` (None if any seed diverged) and the best lr."""
    scores = {lr: None if any(r.diverged for r in rs) else float(np.mean([loss_at(r, steps) for r in rs]))
              for lr, rs in sweep_runs.items()}
    eligible = [lr for lr, s in scores.items() if s is not None and math.isfinite(s)]
    return scores, (min(eligible, key=lambda lr: scores[lr]) if eligible else None)


def run_config(family: str, config: str, optimizer: str, data: tuple[torch.Tensor, ...], budget: FamilyBudget,
               seeds: Sequence[int], select_seeds: int, goal_factor: float,
               shaping: Shaping = Shaping(), conv_widths: Sequence[int] = CONV_WIDTHS) -> ConfigResult:
    """Sweep the lr grid on the first ``select_seeds`` seeds, then run the other seeds at the best lr."""
    start = time.perf_counter()
    total = budget.steps if config == "reference" else math.ceil(goal_factor * budget.steps)
    fn = make_model_fn(family, config, shaping, conv_widths)
    lrs = budget.lrs[optimizer][config]
    kw = dict(batch_size=budget.batch_size, eval_every=budget.steps)
    sweeps = {}  # damping (None: not K-FAC) -> (spec, scores, best lr, runs)
    for damping in (budget.dampings if optimizer == "kfac" else (None,)):
        spec = optimizer_spec(optimizer, damping=damping) if optimizer == "kfac" else optimizer_spec(optimizer)
        sweep = lr_sweep(fn, data, optimizer=spec, lrs=lrs, seeds=list(seeds[:select_seeds]), steps=total, **kw)
        sweeps[damping] = (spec, *_select(sweep.runs, budget.steps), sweep.runs)
    valid = [d for d, (_, scores, best, _) in sweeps.items() if best is not None]
    damping = min(valid, key=lambda d: sweeps[d][1][sweeps[d][2]]) if valid else next(iter(sweeps))
    spec, scores, best, sweep_runs = sweeps[damping]
    runs = list(sweep_runs[best]) if best is not None else []
    if best is not None:
        runs += [train_run(fn, data, optimizer=spec, lr=best, steps=total, seed=s, **kw)
                 for s in seeds[select_seeds:]]
    kfac = optimizer == "kfac"
    return ConfigResult(family, optimizer, config, budget.steps, total, scores, best, runs, sweep_runs,
                        time.perf_counter() - start, damping if kfac else None,
                        {d: v[1] for d, v in sweeps.items()} if kfac else {},
                        {d: v[3] for d, v in sweeps.items()} if kfac else {})


def _load(family: str, budget: FamilyBudget) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test), flattened for the MLP, with the budget's subsets."""
    return load_splits(budget.dataset, budget.train_subset, budget.test_subset, flatten=family == "mlp")


def run_family(family: str, budget: FamilyBudget, configs: Sequence[str], seeds: Sequence[int],
               select_seeds: int, goal_factor: float, log: Callable[[str], None] = print,
               optimizers: Sequence[str] = OPTIMIZERS, shaping: Shaping = Shaping(),
               conv_widths: Sequence[int] = CONV_WIDTHS) -> dict[str, dict[str, ConfigResult]]:
    """Every configuration of ``family`` with every optimizer: ``{optimizer: {config: result}}``."""
    data = _load(family, budget)
    results: dict[str, dict[str, ConfigResult]] = {}
    for opt in optimizers:
        results[opt] = {}
        for config in configs:
            res = run_config(family, config, opt, data, budget, seeds, select_seeds, goal_factor, shaping,
                             conv_widths)
            results[opt][config] = res
            losses = ", ".join(f"{loss_at(r, res.steps):.4g}" for r in res.runs) or "all diverged"
            log(f"[{family}/{opt}/{config}] best lr {res.best_lr}, loss@{res.steps}: {losses} "
                f"({res.wall_time_s:.0f} s)")
    return results


# ====================================================================== summaries
def goal_rows(results: dict[str, ConfigResult], goal_factor: float) -> dict[str, dict[str, Any]]:
    """Steps to the reference's final smoothed loss, per configuration of one optimizer.

    The target is the reference's mean smoothed training loss at its last step ``S``;
    ``ratio`` is a configuration's first step at or below it (mean smoothed curve,
    ``harness.steps_to_loss``) divided by the reference's own first step there.
    """
    ref = results.get("reference")
    found = steps_to_reference(ref.runs, ref.steps, {c: r.runs for c, r in results.items()}) if ref else None
    if found is None:
        return {c: {"target": None, "steps_to_target": None, "ratio": None, "goal_met": None} for c in results}
    target, ref_steps, reached = found
    out = {}
    for config, n in reached.items():
        out[config] = {"target": target, "reference_steps": ref_steps, "steps_to_target": n,
                       "ratio": None if n is None else n / ref_steps,
                       "goal_met": None if config == "reference" else n is not None and n <= goal_factor * ref_steps}
    return out


def best_reference(results: dict[str, dict[str, ConfigResult]]) -> str | None:
    """The optimizer whose reference runs have the lowest mean training loss at ``S`` (None: no reference ran)."""
    losses = {opt: float(np.mean([loss_at(r, by["reference"].steps) for r in by["reference"].runs]))
              for opt, by in results.items() if "reference" in by and by["reference"].runs}
    return min(losses, key=losses.get) if losses else None


def best_reference_goals(results: dict[str, dict[str, ConfigResult]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Steps to the *best* reference's final loss (the reference trained with its best optimizer,
    :func:`best_reference`), for every (optimizer, configuration), as a ratio to that reference's own steps."""
    best = best_reference(results)
    if best is None:
        return {}
    ref = results[best]["reference"]
    found = steps_to_reference(ref.runs, ref.steps, {f"{o}/{c}": r.runs for o, by in results.items()
                                                     for c, r in by.items()})
    if found is None:
        return {}
    target, ref_steps, reached = found
    return {tuple(k.split("/", 1)): {"reference_optimizer": best, "target": target, "reference_steps": ref_steps,
                                     "steps_to_target": n, "ratio": None if n is None else n / ref_steps}
            for k, n in reached.items()}


def _damping_cell(res: ConfigResult) -> str:
    if res.damping is None:
        return ""
    edge = len(res.damping_scores) > 1 and res.damping in (min(res.damping_scores), max(res.damping_scores))
    return f", λ {res.damping:g}" + (" (edge)" if edge else "")


def summary_rows(results: dict[str, dict[str, ConfigResult]], goal_factor: float) -> list[dict[str, Any]]:
    """One table row per (optimizer, configuration) of a family; with more than one optimizer, also the
    steps to the best reference's loss (the reference with its best optimizer)."""
    rows = []
    versus_best = best_reference_goals(results) if len(results) > 1 else {}
    for opt, by_config in results.items():
        goals = goal_rows(by_config, goal_factor)
        for config, res in by_config.items():
            g = goals[config]
            if g["steps_to_target"] is not None:
                reach = f"{g['steps_to_target']} ({g['ratio']:.2f}x)"
            else:
                reach = f"not in {res.total_steps}" if res.runs else "–"
            extra = {}
            if versus_best:
                b = versus_best[opt, config]
                extra[f"steps to best ref. ({b['reference_optimizer']}) loss"] = (
                    f"{b['steps_to_target']} ({b['ratio']:.2f}x)" if b["steps_to_target"] is not None
                    else (f"not in {res.total_steps}" if res.runs else "–"))
            rows.append({
                "optimizer": opt, "configuration": config, "activation": ACTIVATION[config],
                "lr": lr_cell(res.best_lr, res.best_at_edge) + _damping_cell(res), "seeds": seeds_cell(res.runs),
                f"train loss @{res.steps}": mean_sd([loss_at(r, res.steps) for r in res.runs], ".4f"),
                f"test acc @{res.steps}": mean_sd([acc_at(r, res.steps) for r in res.runs], ".4f"),
                "steps to ref. loss (ratio)": reach,
                f"≤ {goal_factor:g}x": {None: "–", True: "yes", False: "no"}[g["goal_met"]], **extra,
                "_goal": g, "_versus_best": versus_best.get((opt, config)), "_losses": [loss_at(r, res.steps) for r in res.runs],
                "_accs": [acc_at(r, res.steps) for r in res.runs]})
    return rows


def _run_dict(r: RunResult, steps: int) -> dict[str, Any]:
    """A compact record of one run (:func:`harness.run_record`) with its loss and accuracy at ``steps``."""
    return run_record(r, {"loss_at_S": loss_at(r, steps), "test_acc_at_S": acc_at(r, steps)})


def _environment(threads: int) -> dict[str, Any]:
    return {**environment(threads), "passes": netsurgeon.list_passes()}


def _markdown(all_rows: dict[str, list[dict[str, Any]]], budgets: dict[str, FamilyBudget], args: argparse.Namespace,
              env: dict[str, Any], figures: dict[str, list[Path]], md_dir: Path, wall: dict[str, float]) -> str:
    seeds = args.seeds
    lines = [f"Command: `{args.command}`  ",
             f"{machine_text(env)}. Wall time: " + ", ".join(f"{f} {wall[f] / 60:.1f} min" for f in wall) + ".", ""]
    for family, rows in all_rows.items():
        b = budgets[family]
        data = ("Fashion-MNIST, flattened to 784 features" if family == "mlp"
                else "CIFAR-10 subset (32x32x3)")
        net = (f"{MLP_DEPTH}-layer MLP of width {MLP_WIDTH}" if family == "mlp" else
               f"{1 + 2 * sum(CONV_BLOCKS)}-conv CNN, widths {'/'.join(map(str, args.conv_widths))}")
        n_train, n_test = subset_text(b.train_subset), subset_text(b.test_subset)
        lines += [f"### {family}: {net} on {data}", "",
                  f"S = {b.steps} steps for the reference, {math.ceil(args.goal_factor * b.steps)} for the others; "
                  f"batch {b.batch_size}; training images: {n_train}; test images: {n_test}. "
                  "lr grids: "
                  + "; ".join(f"{_OPT_NAMES[o]} {lr_grid_text(b.lrs[o], ' (all)')}" for o in args.optimizers)
                  + (f", damping {'/'.join(f'{d:g}' for d in b.dampings)} (crossed; options "
                     + ", ".join(f"{k}={v}" for k, v in KFAC_OPTIONS.items()) + ")" if "kfac" in args.optimizers
                     else "")
                  + "; swept on "
                  f"{args.select_seeds} seed(s), selected by training loss at S; "
                  f"{seeds} seed(s) at the selected lr; dks zeta {args.zeta:g}, tat eta {args.eta:g}, "
                  f"{args.conv_init} orthogonal convs. "
                  "Mean ± sd over seeds.", ""]
        cols = [c for c in rows[0] if not c.startswith("_")] if rows else []
        lines.append(write_table_md(rows, cols))
        for opt in args.optimizers:
            g = next((r["_goal"] for r in rows if r["optimizer"] == opt and r["configuration"] == "reference"), None)
            if g and g["target"] is not None:
                lines.append(f"- {opt}: target = reference's smoothed loss at step {b.steps}: {g['target']:.4f}, "
                             f"reached by the reference's mean curve at step {g['reference_steps']}.")
        best = next((r["_versus_best"] for r in rows if r["_versus_best"]), None)
        if best is not None:
            lines.append(f"- best reference: the reference with {_OPT_NAMES[best['reference_optimizer']]} (lowest mean "
                         f"training loss at step {b.steps}); its smoothed loss there, {best['target']:.4f}, is the target "
                         f"of the column \"steps to best ref.\", as a ratio to the {best['reference_steps']} steps its "
                         "own mean curve takes.")
        lines.append("")
        lines += [f"![{p.stem}]({os.path.relpath(p.resolve(), md_dir)})" for p in figures[family]] + [""]
    return "\n".join(lines)


# ====================================================================== CLI
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = new_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, batch 16, 256 train / 128 test images, 1 seed, 1 lr")
    p.add_argument("--only", choices=FAMILIES, help="run one family only")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="configurations to run")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZER_CHOICES, default=list(OPTIMIZERS),
                   help="optimizers to run (default: sgd adam; lm is LayerwiseLM with LM_OPTIONS)")
    p.add_argument("--zeta", type=float, default=Shaping.zeta, help=f"dks option zeta (default {Shaping.zeta})")
    p.add_argument("--eta", type=float, default=Shaping.eta, help=f"tat option eta (default {Shaping.eta})")
    p.add_argument("--conv-init", choices=("delta", "full"), default=Shaping.conv_init,
                   help="orthogonal_init's conv scheme for dks/tat: centre tap only, or the whole window "
                        f"(default {Shaping.conv_init})")
    p.add_argument("--conv-widths", type=int, nargs=3, default=list(CONV_WIDTHS), metavar="W",
                   help="the CNN's three stage widths (default %s)" % " ".join(map(str, CONV_WIDTHS)))
    p.add_argument("--steps", type=int, help="S, the reference's steps (default: mlp 400, conv 200)")
    p.add_argument("--batch-size", type=int, help="default: mlp 128, conv 32")
    for flag, default in (("sgd", "0.001 0.003 0.01"), ("adam", "per configuration, see DEFAULT_BUDGETS"),
                          ("lm", "0.003 0.01 0.03 for reference and vanilla, 0.001 0.003 0.01 for dks and tat"),
                          ("kfac", "0.01 0.03 0.1"), ("heavyball", "Adam's grids")):
        what = "SOAP and PSGD" if flag == "heavyball" else _OPT_NAMES[flag]
        p.add_argument(f"--lrs-{flag}", type=float, nargs="+",
                       help=f"{what} lr grid for every configuration (default {default})")
    p.add_argument("--dampings-kfac", type=float, nargs="+", help="K-FAC damping grid, crossed with its lr grid "
                   "(default 0.01 0.1 1)")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default 3; --quick 1)")
    p.add_argument("--select-seeds", type=int, default=1, help="seeds used in the lr sweep (default 1)")
    p.add_argument("--train-subset", type=int, help="use a fixed random subset of the training images")
    p.add_argument("--test-subset", type=int, help="use a fixed random subset of the test images")
    p.add_argument("--goal-factor", type=float, default=1.5, help="others train this many times S (default 1.5)")
    add_output_args(p, DEFAULT_OUT, "train_deep.md", threads=2)
    args = p.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.select_seeds = min(args.select_seeds, args.seeds)
    if args.goal_factor < 1 or args.seeds < 1 or args.select_seeds < 1:
        p.error("need --goal-factor >= 1, --seeds >= 1 and --select-seeds >= 1")
    if not (args.zeta > 1 and 0 < args.eta < 1):
        p.error(f"need --zeta > 1 and 0 < --eta < 1 (got --zeta {args.zeta:g}, --eta {args.eta:g})")
    if args.dampings_kfac and min(args.dampings_kfac) <= 0:
        p.error(f"--dampings-kfac must be > 0, got {args.dampings_kfac}")
    if min(args.conv_widths) < 1:
        p.error(f"--conv-widths must be positive, got {args.conv_widths}")
    args.command = command_line("train_deep.py", argv)
    return args


def _budget(family: str, args: argparse.Namespace) -> FamilyBudget:
    b = (QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS)[family]
    lrs = {opt: {c: tuple(given) if given else grid for c, grid in b.lrs[opt].items()}
           for opt, given in (("sgd", args.lrs_sgd), ("adam", args.lrs_adam), ("lm", args.lrs_lm),
                              ("kfac", args.lrs_kfac), ("soap", args.lrs_heavyball), ("psgd", args.lrs_heavyball))}
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "train_subset": args.train_subset,
                 "test_subset": args.test_subset, "lrs": lrs,
                 "dampings": tuple(args.dampings_kfac) if args.dampings_kfac else None}
    return dataclasses.replace(b, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the figures, JSON and Markdown; return the summary.

    Returns:
        ``{"rows": {family: [row, ...]}, "markdown": str, "files": [Path, ...], "json": Path}``.
    """
    args = _parse(argv)
    with torch_threads(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    out_dir, md_path = output_paths(args, "train_deep.md")
    env = _environment(args.threads)
    seeds = list(range(args.seeds))
    families = [args.only] if args.only else list(FAMILIES)
    budgets = {f: _budget(f, args) for f in families}
    all_rows, figures, wall, record = {}, {}, {}, {}
    for family in families:
        start = time.perf_counter()
        results = run_family(family, budgets[family], args.configs, seeds, args.select_seeds, args.goal_factor,
                             log=log, optimizers=args.optimizers,
                             shaping=Shaping(args.zeta, args.eta, args.conv_init), conv_widths=args.conv_widths)
        wall[family] = time.perf_counter() - start
        all_rows[family] = summary_rows(results, args.goal_factor)
        figures[family] = []
        for opt, by_config in results.items():
            path = plot_curves(selected_curves(by_config), out_dir / f"{family}_{opt}.png",
                               f"{family} / {opt}: reference {budgets[family].steps} steps, others "
                               f"{math.ceil(args.goal_factor * budgets[family].steps)}")
            figures[family].append(path)
        record[family] = {
            "budget": dataclasses.asdict(budgets[family]), "wall_time_s": wall[family],
            "rows": [{k: v for k, v in r.items() if k not in ("_goal", "_versus_best")}
                     | {"goal": r["_goal"], "versus_best_reference": r["_versus_best"]} for r in all_rows[family]],
            "configs": {opt: {c: {"best_lr": r.best_lr, "scores_at_S": r.scores, "total_steps": r.total_steps,
                                  "damping": r.damping,
                                  "damping_scores_at_S": {repr(d): v for d, v in r.damping_scores.items()},
                                  "other_damping_runs": {repr(d): {repr(lr): [_run_dict(x, r.steps) for x in rs]
                                                                   for lr, rs in by_lr.items()}
                                                         for d, by_lr in r.damping_runs.items() if d != r.damping},
                                  "wall_time_s": r.wall_time_s,
                                  "runs": {repr(lr): [_run_dict(x, r.steps) for x in rs]
                                           for lr, rs in r.sweep_runs.items()},
                                  "extra_seed_runs": [_run_dict(x, r.steps) for x in r.runs[args.select_seeds:]]}
                              for c, r in by_config.items()} for opt, by_config in results.items()}}
    md = _markdown(all_rows, budgets, args, env, figures, md_path.parent.resolve(), wall)
    json_path = save_json({"command": args.command, "environment": env, "seeds": seeds,
                           "zeta": args.zeta, "eta": args.eta, "conv_init": args.conv_init,
                           "conv_widths": args.conv_widths,
                           "select_seeds": args.select_seeds, "goal_factor": args.goal_factor,
                           "families": record}, out_dir / "train_deep.json")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    print(md)
    return {"rows": all_rows, "markdown": md, "files": [p for f in figures.values() for p in f] + [md_path],
            "json": json_path}


if __name__ == "__main__":
    main()
