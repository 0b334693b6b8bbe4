"""Layer-wise second-order training, modulus units and TAT on Fashion-MNIST (issue 7 §3).

Implements the benchmark of "On the importance of consistency in training deep neural
networks" (Ye et al. 2017, arXiv:1708.00631; docs/theory.md §8) for ``netsurgeon.optim.LayerwiseLM``:
every Linear/Conv weight steps along ``G (A + λ·tr(A)/n·I)^(-1)``, ``A`` a moving average of
the layer input's second moments.

Four parts:

* ``a`` -- a 20-layer ReLU MLP of width 256 (784->256, 18 x 256->256, 256->10) with
  He-scaled orthogonal init (``orthogonal_init`` pass, gain sqrt 2; PyTorch's default init
  stalls SGD at this depth), trained with SGD (momentum 0.9), Adam and LayerwiseLM;
* ``b`` -- a deep narrow MLP, 50 layers x 32 units (784->32, 48 x 32->32, 32->10): ReLU
  (orthogonal init, gain sqrt 2) against the modulus unit ``|x|`` (orthogonal init, gain 1,
  then the ``modulus`` pass); each gain keeps ``q = ||h||²/n`` constant through its unit;
  the same three optimizers;
* ``c`` -- the 50-layer, width-256 chain of the DKS/TAT benchmark (``benchmarks/train_deep.py``,
  built by its ``make_model_fn``) as ``vanilla+tat`` (default init, then ``input_norm``,
  ``orthogonal_init``, ``tat`` with eta 0.9), with SGD and with LayerwiseLM;
  ``--c-configs vanilla vanilla+tat`` adds the untransformed chain (PyTorch default init,
  ReLU), which stalls at ln 10 with SGD (docs/benchmarks.md, issue 4) and did so with
  LayerwiseLM in a pilot;
* ``cost`` -- the time of one training step (zero_grad, forward, backward, step) of timm's
  ``resnet18`` (random init, 10 classes) on 224x224 inputs of batch 16 (``--cost-size``,
  ``--cost-batch``; at 32x32 the last stage runs at 1x1 and the ratio is about 2x), SGD against
  LayerwiseLM with and without chunking (and Adam for reference).

Protocol (parts a-c). Fashion-MNIST standardized with the train split's statistics and
flattened, all 60,000 training images (minibatches without replacement), the 10,000 test
images evaluated after the last step. Constant learning rate, cross-entropy. Every
learning rate of the grid runs with every seed. The target training loss is fixed per part
(``DEFAULT_PARTS``, placed by a pilot on seed 0 to be reachable by the best first-order run
within the budget) and the same for every configuration and optimizer; "steps to target"
is ``harness.steps_to_loss`` (first step whose smoothed loss, EMA 0.9 bias-corrected, is at or
below the target). The selected lr of a (configuration, optimizer) is the one where the
most seeds reach the target, then the fewest mean steps (a seed that misses counts as the
budget + 1), then the lowest final loss. A mean number of steps is reported only when every
seed reached the target; "time to target" sums the measured step times up to that step.

LayerwiseLM options (``LM_OPTIONS``): momentum 0.9, damping 0.1 (relative), ema 0.95,
update_every 10, subsample 1, no chunking for the MLPs; damping 0.01 (the default) diverged
at every lr in the pilot. Per-step cost: ``COST_LM`` (chunk 128, subsample 0.25,
update_every 10); blocks of ``update_every`` steps hold exactly one inverse recomputation,
so the per-step cost is the median over blocks of the block's mean step time (amortized);
the median single step (which skips the recomputation) is reported too. The variants run
interleaved, block by block, so load from other processes hits them alike.

Outputs in ``--out-dir`` (default ``docs/figures/train_consistency``): ``{a,b,c}.png``
(smoothed training loss at the selected lrs, mean over seeds with a min/max band),
``train_consistency.json`` (settings, environment, every run's curve, the cost timings, the
goal check) and ``train_consistency.md`` (the Markdown section, also printed). Both files are
rewritten after every part.

Usage:
    nice -n 5 python benchmarks/train_consistency.py --threads 1        # default run: 23.8 min on the shared 2-core machine
    python benchmarks/train_consistency.py --quick --out-dir /tmp/tc     # smoke run, seconds
    python benchmarks/train_consistency.py --parts a --steps 2000 --seeds 5
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

import netsurgeon
import train_deep
from harness import (RunResult, add_output_args, command_line, environment, log, lr_grid_text, machine_text,
                     new_parser, output_paths, plot_curves, run_record, save_json, steps_to_loss, torch_threads,
                     timed_steps, train_run, write_table_md)
from harness.data import load_splits
from harness.optimizers import LM_OPTIONS, optimizer_spec
from harness.stats import mean_sd
from harness.sweeps import seeds_cell
from netsurgeon.optim import LayerwiseLM

__all__ = ["PARTS", "Part", "DEFAULT_PARTS", "QUICK_PARTS", "LM_OPTIONS", "COST_LM", "build_mlp", "make_model_fn",
           "run_part", "part_rows", "measure_step_cost", "goal_check", "main"]

PARTS = ("a", "b", "c")
FIRST_ORDER = ("sgd", "adam")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "train_consistency"


COST_LM: dict[str, Any] = dict(LM_OPTIONS, chunk_size=128, subsample=0.25)
COST_GOAL = 1.5  # LayerwiseLM step / SGD step on resnet18


@dataclass(frozen=True)
class Part:
    """One training comparison: a network family, its configurations, grids, budget and target."""

    key: str
    title: str
    configs: tuple[str, ...]
    lrs: dict[str, dict[str, tuple[float, ...]]]  # optimizer -> configuration -> grid
    steps: int
    batch_size: int
    target: float
    train_subset: int | None = None
    test_subset: int | None = None

    @property
    def optimizers(self) -> tuple[str, ...]:
        return tuple(self.lrs)


def _grid(configs: Sequence[str], **per_opt: Any) -> dict[str, dict[str, tuple[float, ...]]]:
    """``optimizer -> configuration -> lrs``; a tuple applies to every configuration."""
    return {opt: {c: tuple(g[c] if isinstance(g, dict) else g) for c in configs} for opt, g in per_opt.items()}


C_CONFIGS = ("vanilla+tat", "vanilla")  # part c runs the first only unless --c-configs says otherwise
# Grids, budgets and targets placed by pilots on seed 0 (a: SGD 0.003-0.1, Adam 1e-4-1e-3,
# LayerwiseLM 0.003-0.3 at damping 0.01/0.1/1 (0.01 diverged at every lr); b: SGD 0.003-0.03,
# Adam 3e-4-3e-3, LM 0.003-0.03; c: SGD 0.003/0.01, LM 0.001-0.01). Each LM grid ends at an lr
# that diverged in the pilot (a: 0.03; b, modulus and c: 0.01), so it brackets the best lr.
# A target is a loss the best first-order run reached in its pilot well inside the budget.
DEFAULT_PARTS = {
    "a": Part("a", "20-layer MLP, width 256, ReLU", ("relu",),
              _grid(("relu",), sgd=(0.001, 0.003, 0.01, 0.03), adam=(1e-4, 3e-4, 1e-3),
                    lm=(0.001, 0.003, 0.01, 0.03)), 800, 128, 0.40),
    "b": Part("b", "50-layer MLP, width 32: ReLU vs modulus", ("relu", "modulus"),
              _grid(("relu", "modulus"), sgd=(3e-4, 0.001, 0.003, 0.01), adam=(1e-4, 3e-4, 1e-3),
                    lm=(3e-4, 0.001, 0.003, 0.01)), 1000, 128, 0.70),
    "c": Part("c", "50-layer MLP, width 256 (train_deep's chain) + TAT", ("vanilla+tat",),
              _grid(C_CONFIGS, sgd=(0.001, 0.003, 0.01), lm=(3e-4, 0.001, 0.003, 0.01)), 400, 128, 0.45),
}
QUICK_PARTS = {k: dataclasses.replace(p, lrs={o: {c: g[:1] for c, g in by_c.items()} for o, by_c in p.lrs.items()},
                                      steps=5, batch_size=16, target=2.4, train_subset=256, test_subset=128)
               for k, p in DEFAULT_PARTS.items()}


# ====================================================================== networks
def build_mlp(depth: int, width: int, act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """``depth`` Linear layers: 784->width, (depth-2) x width->width, width->10, ``act`` between."""
    layers: list[nn.Module] = [nn.Linear(784, width), act()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def make_model_fn(part: str, config: str) -> Callable[[int], nn.Module]:
    """``seed -> model`` for ``harness.train_run`` (called under the seeded RNG); part c's is
    ``train_deep.make_model_fn`` of the MLP family."""
    if part == "c":
        return train_deep.make_model_fn("mlp", config)
    depth, width = (20, 256) if part == "a" else (50, 32)

    def build(seed: int) -> nn.Module:
        passes: list[Any] = [("orthogonal_init", {"seed": seed, "gain": math.sqrt(2) if config == "relu" else 1.0})]
        if config == "modulus":
            passes.append("modulus")
        return netsurgeon.transform(build_mlp(depth, width), passes, example_inputs=torch.randn(2, 784))

    return build


# ====================================================================== runs
def _load(part: Part) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) of Fashion-MNIST, flattened, with the part's subsets."""
    return load_splits("fashion_mnist", part.train_subset, part.test_subset, flatten=True)


def run_part(part: Part, seeds: Sequence[int], log: Callable[[str], None] = print
             ) -> dict[str, dict[str, dict[float, list[RunResult]]]]:
    """Every (configuration, optimizer, lr, seed): ``{config: {optimizer: {lr: [run per seed]}}}``."""
    data = _load(part)
    out: dict[str, dict[str, dict[float, list[RunResult]]]] = {}
    for config in part.configs:
        fn = make_model_fn(part.key, config)
        out[config] = {}
        for opt in part.optimizers:
            out[config][opt] = {}
            for lr in part.lrs[opt][config]:
                start = time.perf_counter()
                runs = [train_run(fn, data, optimizer=optimizer_spec(opt), lr=lr, steps=part.steps,
                                  batch_size=part.batch_size, seed=s, eval_every=None) for s in seeds]
                out[config][opt][lr] = runs
                reach = [steps_to_loss(r, part.target) for r in runs]
                log(f"[{part.key}/{config}/{opt}] lr {lr:g}: final loss "
                    + ", ".join("diverged" if r.diverged else f"{r.final_train_loss:.4f}" for r in runs)
                    + f"; steps to {part.target:g}: {reach} ({time.perf_counter() - start:.0f} s)")
    return out


def _lr_key(runs: Sequence[RunResult], part: Part) -> tuple[int, float, float]:
    """Sort key of a learning rate: seeds missing the target, mean steps (a miss counts as
    steps + 1), mean final loss (inf when diverged)."""
    reach = [steps_to_loss(r, part.target) for r in runs]
    return (sum(n is None for n in reach), float(np.mean([part.steps + 1 if n is None else n for n in reach])),
            float(np.mean([r.final_train_loss for r in runs])))


def select_lr(by_lr: dict[float, list[RunResult]], part: Part) -> float:
    """The learning rate whose runs reach the target on the most seeds, then soonest."""
    return min(by_lr, key=lambda lr: _lr_key(by_lr[lr], part))


def part_rows(part: Part, results: dict[str, dict[str, dict[float, list[RunResult]]]]) -> list[dict[str, Any]]:
    """One row per (configuration, optimizer) at its selected lr; keys starting with _ are data."""
    rows = []
    for config, by_opt in results.items():
        for opt, by_lr in by_opt.items():
            lr = select_lr(by_lr, part)
            runs = by_lr[lr]
            reach = [steps_to_loss(r, part.target) for r in runs]
            all_in = all(n is not None for n in reach)
            times = [sum(r.step_time_s[:n]) for r, n in zip(runs, reach) if n is not None]
            edge = len(by_lr) > 1 and lr in (min(by_lr), max(by_lr))
            rows.append({
                "configuration": config, "optimizer": opt, "lr": f"{lr:g}" + (" (edge)" if edge else ""),
                "seeds": seeds_cell(runs),
                "steps to target (per seed)": ", ".join("–" if n is None else str(n) for n in reach),
                "mean steps": f"{np.mean(reach):.0f}" if all_in else f"not reached ({len(times)}/{len(runs)})",
                "time to target (s)": f"{np.mean(times):.1f}" if all_in else "–",
                f"train loss @{part.steps}": mean_sd([r.final_train_loss for r in runs], ".4f"),
                "test acc": mean_sd([r.final_test_acc for r in runs], ".4f"),
                "ms/step": f"{1e3 * np.median([r.median_step_time_s for r in runs]):.1f}",
                "_lr": lr, "_reach": reach, "_mean_steps": float(np.mean(reach)) if all_in else None,
                "_time_to_target": float(np.mean(times)) if all_in else None,
                "_losses": [r.final_train_loss for r in runs]})
    return rows


def grid_rows(part: Part, results: dict[str, dict[str, dict[float, list[RunResult]]]]) -> list[dict[str, Any]]:
    """One row per (configuration, optimizer, lr): the whole sweep, for the record."""
    rows = []
    for config, by_opt in results.items():
        for opt, by_lr in by_opt.items():
            best = select_lr(by_lr, part)
            for lr, runs in by_lr.items():
                reach = [steps_to_loss(r, part.target) for r in runs]
                ok = [r for r in runs if not r.diverged]
                rows.append({"configuration": config, "optimizer": opt, "lr": lr,
                             "reached": f"{sum(n is not None for n in reach)}/{len(runs)}",
                             "steps (per seed)": ", ".join("–" if n is None else str(n) for n in reach),
                             "final train loss": mean_sd([r.final_train_loss for r in ok], ".4f"),
                             "diverged": len(runs) - len(ok), "selected": lr == best})
    return rows


# ====================================================================== per-step cost
def measure_step_cost(batch_size: int = 64, rounds: int = 3, lm: dict[str, Any] | None = None,
                      seed: int = 0, size: int = 32) -> dict[str, Any]:
    """Time training steps of timm ``resnet18`` (10 classes, ``size`` x ``size`` inputs) per optimizer.

    Each variant trains its own copy of one random init on one fixed random batch. After a
    warm-up block, ``rounds`` rounds run one block of ``lm["update_every"]`` steps per variant,
    variants interleaved. Returns per variant the step times, the median step and the
    amortized step (median over blocks of the block mean), and the ratios to SGD.
    """
    import timm

    lm = dict(COST_LM if lm is None else lm)
    block = lm["update_every"]
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch_size, 3, size, size, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = timm.create_model("resnet18", pretrained=False, num_classes=10)
    factories: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-5),
        f"lm (chunk {lm['chunk_size']})": lambda m: LayerwiseLM(m, **dict(lm, lr=1e-4)),
        "lm (no chunks)": lambda m: LayerwiseLM(m, **dict(lm, lr=1e-4, chunk_size=None)),
    }
    variants = {}
    for name, make in factories.items():
        model = copy.deepcopy(base).train()
        variants[name] = (model, make(model))

    def block_times(name: str) -> list[float]:
        return timed_steps(*variants[name], x, y, block)

    for name in variants:
        block_times(name)  # warm-up; LayerwiseLM's first inverse happens here
    times: dict[str, list[list[float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            times[name].append(block_times(name))
    res: dict[str, Any] = {"batch_size": batch_size, "input_size": size, "rounds": rounds, "block": block, "lm_options": lm,
                           "num_params": sum(p.numel() for p in base.parameters()), "variants": {}}
    for name, blocks in times.items():
        res["variants"][name] = {"step_times_s": blocks, "median_step_s": float(np.median(np.concatenate(blocks))),
                                 "amortized_step_s": float(np.median([np.mean(b) for b in blocks]))}
    sgd = res["variants"]["sgd"]
    for v in res["variants"].values():
        v["ratio_amortized"] = v["amortized_step_s"] / sgd["amortized_step_s"]
        v["ratio_median"] = v["median_step_s"] / sgd["median_step_s"]
    return res


def cost_rows(cost: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"optimizer": name, "median step (ms)": f"{1e3 * v['median_step_s']:.1f}",
             "amortized step (ms)": f"{1e3 * v['amortized_step_s']:.1f}",
             "ratio to SGD (amortized)": f"{v['ratio_amortized']:.2f}x", "ratio to SGD (median)": f"{v['ratio_median']:.2f}x"}
            for name, v in cost["variants"].items()]


# ====================================================================== goal check
def _steps(row: dict[str, Any]) -> float:
    return math.inf if row["_mean_steps"] is None else row["_mean_steps"]


def goal_check(rows: dict[str, list[dict[str, Any]]], cost: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's goals and the part comparisons, each computed from the rows: a list of
    ``{"check", "value", "met"}`` (``met`` None when the data for it was not run)."""
    out = []
    for key, part_rows_ in rows.items():
        for config in dict.fromkeys(r["configuration"] for r in part_rows_):
            by_opt = {r["optimizer"]: r for r in part_rows_ if r["configuration"] == config}
            if "lm" not in by_opt or not any(o in by_opt for o in FIRST_ORDER):
                continue
            best = min((o for o in FIRST_ORDER if o in by_opt), key=lambda o: _steps(by_opt[o]))
            lm, fo = by_opt["lm"], by_opt[best]
            out.append({"check": f"({key}) {config}: LayerwiseLM reaches the target in fewer steps than the best "
                                 f"first-order run ({best})",
                        "value": f"{lm['mean steps']} vs {fo['mean steps']}",
                        "met": _steps(lm) < _steps(fo), "goal": key == "a"})
            if lm["_time_to_target"] is not None:
                fo_t = fo["_time_to_target"]
                out.append({"check": f"({key}) {config}: ... and in less wall time (sum of step times)",
                            "value": f"{lm['_time_to_target']:.1f} s vs {'–' if fo_t is None else f'{fo_t:.1f} s'}",
                            "met": fo_t is None or lm["_time_to_target"] < fo_t, "goal": False})
        if key == "b":
            for opt in dict.fromkeys(r["optimizer"] for r in part_rows_):
                pair = {r["configuration"]: r for r in part_rows_ if r["optimizer"] == opt}
                if {"relu", "modulus"} <= set(pair):
                    out.append({"check": f"(b) {opt}: modulus reaches the target in fewer steps than ReLU",
                                "value": f"{pair['modulus']['mean steps']} vs {pair['relu']['mean steps']}",
                                "met": _steps(pair["modulus"]) < _steps(pair["relu"]), "goal": False})
    if cost is not None:
        name = next(n for n in cost["variants"] if n.startswith("lm (chunk"))
        ratio = cost["variants"][name]["ratio_amortized"]
        out.append({"check": f"(cost) resnet18 step with LayerwiseLM ({name[4:-1]}) at most {COST_GOAL:g}x SGD "
                             "(amortized)", "value": f"{ratio:.2f}x", "met": ratio <= COST_GOAL, "goal": True})
    return out


# ====================================================================== records
def _run_dict(r: RunResult, target: float) -> dict[str, Any]:
    """A compact record of one run (:func:`harness.run_record`, no evaluations) with its steps to ``target``."""
    return run_record(r, {"steps_to_target": steps_to_loss(r, target)}, evals=False)


def _grid_text(part: Part) -> str:
    return "; ".join(f"{opt} {lr_grid_text(by_c)}" for opt, by_c in part.lrs.items())


def _markdown(parts: dict[str, Part], rows: dict[str, list[dict[str, Any]]], grids: dict[str, list[dict[str, Any]]],
              cost: dict[str, Any] | None, checks: list[dict[str, Any]], args: argparse.Namespace,
              env: dict[str, Any], figures: dict[str, Path], md_dir: Path, wall: dict[str, float]) -> str:
    lines = [f"Command: `{args.command}`  ",
             f"{machine_text(env)}. Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()) + ".  ",
             "LayerwiseLM (parts a-c): " + ", ".join(f"{k}={v}" for k, v in LM_OPTIONS.items()) + ".", ""]
    for key, part_rows_ in rows.items():
        p = parts[key]
        n_train = "all 60000" if p.train_subset is None else f"{p.train_subset}"
        lines += [f"#### ({key}) {p.title}", "",
                  f"{p.steps} steps of batch {p.batch_size} ({n_train} training images); target training loss "
                  f"**{p.target:g}** (smoothed); lr grids: {_grid_text(p)}; {args.seeds} seed(s) per lr. "
                  "Rows: the selected lr; mean ± sd over seeds.", ""]
        cols = [c for c in part_rows_[0] if not c.startswith("_")] if part_rows_ else []
        lines += [write_table_md(part_rows_, cols), "<details><summary>every learning rate</summary>", "",
                  write_table_md(grids[key], list(grids[key][0])) if grids[key] else "", "</details>", ""]
        if key in figures:
            lines += [f"![{key}]({os.path.relpath(figures[key].resolve(), md_dir)})", ""]
    if cost is not None:
        lm = cost["lm_options"]
        lines += [f"#### Per-step cost: timm resnet18, {cost.get('input_size', 32)}x{cost.get('input_size', 32)} "
                  "inputs", "",
                  f"Batch {cost['batch_size']}, {cost['num_params']:,} parameters; one warm-up block, then "
                  f"{cost['rounds']} rounds of one {cost['block']}-step block per optimizer (interleaved). "
                  f"LayerwiseLM: chunk_size={lm['chunk_size']}, subsample={lm['subsample']}, "
                  f"update_every={lm['update_every']}; a block holds one inverse recomputation, so \"amortized\" "
                  "(median over blocks of the block mean) includes it and \"median step\" does not.", "",
                  write_table_md(cost_rows(cost), list(cost_rows(cost)[0]))]
    lines += ["#### Goal check", ""]
    for c in checks:
        verdict = {True: "MET", False: "NOT MET", None: "not run"}[c["met"]]
        lines.append(f"- {'**goal** ' if c['goal'] else ''}{c['check']}: {c['value']} -> **{verdict}**")
    return "\n".join(lines) + "\n"


# ====================================================================== CLI
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = new_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: 5 steps of batch 16 on 256 images, 1 seed, "
                   "1 lr per optimizer, a tiny cost measurement")
    p.add_argument("--parts", nargs="+", choices=PARTS + ("cost",), default=list(PARTS) + ["cost"])
    p.add_argument("--c-configs", nargs="+", choices=C_CONFIGS, default=["vanilla+tat"],
                   help="configurations of part c (default vanilla+tat)")
    p.add_argument("--seeds", type=int, help="seeds per learning rate (default 3; --quick 1)")
    p.add_argument("--steps", type=int, nargs="+", metavar="[PART=]N",
                   help="step budget: N for every part or PART=N (default a=800 b=1000 c=400)")
    p.add_argument("--targets", nargs="+", metavar="PART=LOSS", help="target training loss (default a=0.4 b=0.7 c=0.45)")
    p.add_argument("--cost-batch", type=int, help="resnet18 batch for the cost (default 16; --quick 4)")
    p.add_argument("--cost-size", type=int, help="resnet18 input size for the cost (default 224, ResNet-18's "
                   "training size; --quick 32)")
    p.add_argument("--cost-rounds", type=int, help="timed blocks per optimizer (default 3; --quick 1)")
    add_output_args(p, DEFAULT_OUT, "train_consistency.md")
    args = p.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    if args.seeds < 1 or args.threads < 1:
        p.error("need --seeds >= 1 and --threads >= 1")
    base = QUICK_PARTS if args.quick else DEFAULT_PARTS
    overrides: dict[str, dict[str, Any]] = {k: {} for k in PARTS}
    for opt, field_, cast in (("steps", "steps", int), ("targets", "target", float)):
        for item in getattr(args, opt) or []:
            key, _, value = str(item).rpartition("=")
            for k in ([key] if key else PARTS):
                if k not in PARTS:
                    p.error(f"--{opt} {item}: part must be one of {PARTS}")
                overrides[k][field_] = cast(value)
    overrides["c"]["configs"] = tuple(args.c_configs)
    args.parts_cfg = {k: dataclasses.replace(base[k], **overrides[k]) for k in PARTS if k in args.parts}
    args.cost_size = args.cost_size or (32 if args.quick else 224)
    args.cost_batch = args.cost_batch or (4 if args.quick else 16)
    args.cost_rounds = args.cost_rounds or (1 if args.quick else 3)
    args.command = command_line("train_consistency.py", argv)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the figures, JSON and Markdown; return the summary.

    Returns:
        ``{"rows": {part: [row, ...]}, "cost": dict | None, "goal_check": [...], "markdown": str,
        "files": [Path, ...], "json": Path}``.
    """
    args = _parse(argv)
    with torch_threads(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    out_dir, md_path = output_paths(args, "train_consistency.md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    env = environment(args.threads)
    seeds = list(range(args.seeds))
    parts: dict[str, Part] = args.parts_cfg
    rows: dict[str, list[dict[str, Any]]] = {}
    grids: dict[str, list[dict[str, Any]]] = {}
    figures: dict[str, Path] = {}
    wall: dict[str, float] = {}
    record: dict[str, Any] = {"command": args.command, "environment": env, "seeds": seeds, "lm_options": LM_OPTIONS,
                              "parts": {}, "cost": None, "goal_check": [], "partial": True}
    cost = None
    json_path = out_dir / "train_consistency.json"

    def write() -> str:
        record["goal_check"] = checks = goal_check(rows, cost)
        md = _markdown(parts, rows, grids, cost, checks, args, env, figures, md_path.parent.resolve(), wall)
        save_json(record, json_path)
        md_path.write_text(md)
        return md

    for key, part in parts.items():
        start = time.perf_counter()
        results = run_part(part, seeds, log)
        wall[key] = time.perf_counter() - start
        rows[key], grids[key] = part_rows(part, results), grid_rows(part, results)
        curves = {f"{r['configuration']} / {r['optimizer']}, lr {r['_lr']:g}":
                  results[r["configuration"]][r["optimizer"]][r["_lr"]] for r in rows[key]}
        figures[key] = plot_curves(curves, out_dir / f"{key}.png",
                                   f"({key}) {part.title}\ntarget {part.target:g}, selected lrs")
        record["parts"][key] = {
            "settings": dataclasses.asdict(part), "wall_time_s": wall[key], "rows": rows[key], "grid": grids[key],
            "runs": {c: {o: {repr(lr): [_run_dict(r, part.target) for r in rs] for lr, rs in by_lr.items()}
                         for o, by_lr in by_o.items()} for c, by_o in results.items()}}
        write()
    if "cost" in args.parts:
        start = time.perf_counter()
        lm = dict(COST_LM, update_every=2) if args.quick else COST_LM
        cost = measure_step_cost(args.cost_batch, args.cost_rounds, lm, size=args.cost_size)
        wall["cost"] = time.perf_counter() - start
        record["cost"] = cost
        log("[cost] " + ", ".join(f"{n}: {1e3 * v['amortized_step_s']:.1f} ms ({v['ratio_amortized']:.2f}x)"
                                  for n, v in cost["variants"].items()))
    record["partial"] = False
    md = write()
    print(md)
    return {"rows": rows, "cost": cost, "goal_check": record["goal_check"], "markdown": md,
            "files": list(figures.values()) + [md_path], "json": json_path}


if __name__ == "__main__":
    main()
