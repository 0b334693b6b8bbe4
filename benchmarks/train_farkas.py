"""Farkas rows on a small ResNet-18-style network on the CIFAR-10 subset (issue 5 §3).

Farkas layers (Pooladian, Finlay & Oberman, "Farkas layers: don't shift the data, fix the
geometry", arXiv:1910.02840; docs/theory.md §6) append to a layer one computed unit
``z_F = -mean(z) + b_F`` so that a ReLU layer is never entirely dead. The paper reports
that they help most when batch norm is removed. Four configurations, same budget and
learning-rate grid:

* ``bn``           -- ResNet-18 layout (BasicBlocks [2, 2, 2, 2], post-activation, He et
  al. 2016, arXiv:1512.03385), narrow: widths 16/32/64/128, 3x3 stem, no max pool,
  global average pooling, linear head; BatchNorm after every conv, convs without bias;
* ``bn+farkas``    -- ``bn`` after ``netsurgeon.transform(net, passes=["farkas"])``;
* ``nobn``         -- the same network without BatchNorm, convs with bias;
* ``nobn+farkas``  -- ``nobn`` after the ``farkas`` pass.

All at PyTorch's default initialization (as in the paper). The ``farkas`` pass works in
layer mode: only the first conv of each BasicBlock (conv1 -> [bn1] -> relu -> conv2) gets a
unit; conv2, the shortcut convs and the stem feed residual sums and are skipped (the
paper's FarkasNet instead computes the unit from the block's sum and grows the width by
one per block; ``--farkas-mode block`` runs the pass's implementation of that, not part
of the default run). The pass's defaults are used: mean aggregation, learned clamped ``b_F``,
default init of the consumers' new input columns. With one seed the Farkas model's
original weights equal the plain model's (the pass runs after the plain init).

Protocol. SGD with momentum 0.9 (``--optimizer kfac``: netsurgeon's K-FAC, damping ``--kfac-damping``), constant
learning rate, batch 64, ``--steps`` steps, no
augmentation, inputs standardized per channel. The lr grid is swept on the first
``--select-seeds`` seeds and the lr with the lowest mean training loss over the last 5% of
the steps (among lrs with no diverged run) is selected; the remaining seeds run at that
lr. Test accuracy is on the 1000-image test split, every ``--eval-every`` steps.

Overhead. The training step (forward, backward, SGD step on one fixed batch of 64) of the
plain model, of a plain model whose conv1 layers are one channel wider (the Farkas
model's shapes without the Farkas unit's ops) and of the Farkas model is timed
interleaved (round-robin, order alternating), median over ``--time-steps`` steps after
warm-up, with the run's torch threads (default 1: on the shared 2-core machine, two threads
were 5-7x slower per step than one whenever another job was running).

Outputs in ``--out-dir`` (default ``docs/figures/train_farkas``): ``train_loss.png``,
``test_acc.png``, ``train_farkas.json`` (budget, environment, pass reports, every run) and
``train_farkas.md`` (the Markdown section, also printed).

Usage:
    nice -n 10 python benchmarks/train_farkas.py                  # default run, about 24 min on the shared 2-core machine
    python benchmarks/train_farkas.py --quick --out-dir /tmp/tf    # smoke run, seconds
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from harness import (add_output_args, add_sweep_args, environment, finish_sweep_args, log, machine_text, new_parser,
                     output_paths, plot_accuracy, plot_curves, save_json, save_text, subset_text, torch_threads,
                     write_table_md)
from harness.data import load_splits
from harness.models import BasicBlock, SmallResNet
from harness.stats import finite, mean_sd, sd
from harness.sweeps import ConfigResult as SweptConfig
from harness.sweeps import SweepBudget, lr_cell, seeds_cell, selected_curves, sweep_config, sweep_rows
from netsurgeon.layers import FarkasLayer, FarkasSum

__all__ = ["CONFIGS", "BasicBlock", "Budget", "SmallResNet", "build_model", "conv_macs", "dead_stats",
           "farkas_record", "main", "measure_overhead", "run_config", "time_train_steps"]

CONFIGS = ("bn", "bn+farkas", "nobn", "nobn+farkas")
WIDTHS, BLOCKS = (16, 32, 64, 128), (2, 2, 2, 2)
INPUT_SHAPE = (3, 32, 32)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "train_farkas"


@dataclass(frozen=True)
class Budget(SweepBudget):
    """Data, step and timing budget (training split: 10000 images, test split: 1000)."""

    time_steps: int            # timed steps per model in the overhead measurement
    time_warmup: int


DEFAULT_BUDGET = Budget(300, 64, (0.01, 0.03, 0.1), 50, None, None, 30, 5)
QUICK_BUDGET = Budget(4, 16, (0.03,), 2, 128, 64, 3, 1)


# ====================================================================== network
def build_model(config: str, extra: int = 0, mode: str = "layer") -> nn.Module:
    """The network of ``config`` (one of :data:`CONFIGS`) at PyTorch's default init; ``mode`` is
    the ``farkas`` pass's mode ("layer", the default, or "block": FarkasNet's block sums too)."""
    net = SmallResNet(norm=config.startswith("bn"), widths=WIDTHS, blocks=BLOCKS, extra=extra)
    if config.endswith("+farkas"):
        passes = ["farkas"] if mode == "layer" else [("farkas", {"mode": mode})]
        net = netsurgeon.transform(net, passes=passes, example_inputs=torch.randn(1, *INPUT_SHAPE))
    return net


def farkas_record(config: str, mode: str = "layer") -> dict[str, Any]:
    """What the ``farkas`` pass changed and skipped in ``config``'s network, and the counts of
    FarkasLayer (layer units) and FarkasSum (block-sum units, ``mode="block"`` only) modules."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        gm = build_model(config, mode=mode)
    rec = netsurgeon.report(gm).passes[0]
    return {"mode": mode, "changed": [c.node for c in rec.changes], "skipped": {s.node: s.why for s in rec.skipped},
            "farkas_layers": sum(isinstance(m, FarkasLayer) for m in gm.modules()),
            "farkas_sums": sum(isinstance(m, FarkasSum) for m in gm.modules())}


def conv_macs(model: nn.Module, x: torch.Tensor | None = None) -> int:
    """Multiply-accumulates of the convs and linears for one input image (forward; ``x`` of
    batch 1, default zeros of the benchmark's input shape)."""
    total = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * m.weight[0].numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *INPUT_SHAPE) if x is None else x)
    finally:
        for h in hooks:
            h.remove()
        model.train()
    return total


@torch.no_grad()
def dead_stats(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """How dead the blocks' ReLUs are on ``x`` (eval mode), averaged over the 8 blocks.

    ``relu1_dead_locations``: fraction of (example, position) at which every channel of a
    block's first ReLU is zero (what a Farkas unit rules out without BN);
    ``relu1_dead_channels``: fraction of its channels that are zero on all of ``x``;
    ``relu2_*``: the same for the ReLU after the residual sum (no Farkas unit there).
    """
    outs: dict[str, list[torch.Tensor]] = {"relu1": [], "relu2": []}

    def keep(key: str) -> Callable[..., None]:
        return lambda module, inputs, output: outs[key].append(output)

    hooks = [m.register_forward_hook(keep(name.rsplit(".", 1)[-1]))
             for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in outs]
    was = model.training
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    stats = {}
    for k, hs in outs.items():
        stats[f"{k}_dead_locations"] = float(np.mean([float((h.amax(1) <= 0).float().mean()) for h in hs]))
        stats[f"{k}_dead_channels"] = float(np.mean([float((h.amax((0, 2, 3)) <= 0).float().mean()) for h in hs]))
    return stats


# ====================================================================== training
@dataclass
class ConfigResult(SweptConfig):
    """The lr sweep, the runs at the selected lr and the trained models' dead ReLUs of one configuration."""

    dead: dict[tuple[float, int], dict[str, float]] = field(default_factory=dict)  # (lr, seed) -> dead_stats


def run_config(config: str, data: tuple[torch.Tensor, ...], budget: Budget, seeds: Sequence[int],
               select_seeds: int, mode: str = "layer", optimizer: Any = "sgd") -> ConfigResult:
    """Sweep the lr grid on the first ``select_seeds`` seeds, then run the others at the best lr."""
    start = time.perf_counter()
    built: list[nn.Module] = []  # the models train_run trains (in place), in the order it builds them

    def fn(seed: int) -> nn.Module:  # called by train_run under the seeded RNG
        built.append(build_model(config, mode=mode))
        return built[-1]

    res = sweep_config(config, fn, data, budget, seeds, select_seeds, optimizer)
    swept = [r for runs in res.sweep_runs.values() for r in runs]
    order = swept + res.runs[len(res.sweep_runs[res.best_lr]) if res.best_lr is not None else 0:]
    probe = data[2][:256]
    dead = {(r.lr, r.seed): dead_stats(m, probe) for r, m in zip(order, built, strict=True)}
    return ConfigResult(**{**vars(res), "wall_time_s": time.perf_counter() - start}, dead=dead)


# ====================================================================== overhead
def time_train_steps(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int,
                     warmup: int) -> dict[str, float]:
    """Median seconds of one SGD training step (forward, backward, step) per model, interleaved."""
    def stepper(model: nn.Module) -> Callable[[], float]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        model.train()

        def step() -> float:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            return time.perf_counter() - t0
        return step

    steppers = {k: stepper(m) for k, m in models.items()}
    for s in steppers.values():
        for _ in range(warmup):
            s()
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for i in range(steps):
        for k in (names if i % 2 == 0 else names[::-1]):
            times[k].append(steppers[k]())
    return {k: float(np.median(v)) for k, v in times.items()}


def measure_overhead(x: torch.Tensor, y: torch.Tensor, budget: Budget, mode: str = "layer") -> list[dict[str, Any]]:
    """Plain, widened-plain and Farkas step times (and MACs) for the BN and the BN-free network."""
    rows = []
    for norm in ("bn", "nobn"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            models = {"plain": build_model(norm), "widened": build_model(norm, extra=1),
                      "farkas": build_model(norm + "+farkas", mode=mode)}
        t = time_train_steps(models, x, y, budget.time_steps, budget.time_warmup)
        macs = {k: conv_macs(m) for k, m in models.items()}
        rows.append({"network": norm, "plain ms": 1e3 * t["plain"], "widened ms": 1e3 * t["widened"],
                     "farkas ms": 1e3 * t["farkas"], "farkas / plain": t["farkas"] / t["plain"],
                     "widened / plain": t["widened"] / t["plain"], "farkas / widened": t["farkas"] / t["widened"],
                     "MACs farkas / plain": macs["farkas"] / macs["plain"]})
    return rows


def measure_overhead_timm(names: Sequence[str], size: int, batch: int, steps: int, warmup: int,
                          mode: str = "layer") -> list[dict[str, Any]]:
    """The same ratio on timm models at their real widths (ResNet-18: 64 to 512 channels), with
    batch norm and with batch norm removed (``strip_bn`` remove), on random ``size`` x ``size`` inputs."""
    import timm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    rows = []
    for name in names:
        for norm in ("bn", "nobn"):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                plain = timm.create_model(name, pretrained=False, num_classes=10)
                if norm == "nobn":
                    plain = netsurgeon.transform(plain, passes=[("strip_bn", {"mode": "remove"})],
                                                 example_inputs=x[:1])
                passes = ["farkas"] if mode == "layer" else [("farkas", {"mode": mode})]
                farkas = netsurgeon.transform(plain, passes=passes, example_inputs=x[:1])
            t = time_train_steps({"plain": plain, "farkas": farkas}, x, y, steps, warmup)
            rep = netsurgeon.report(farkas).passes[-1]
            macs = {k: conv_macs(m, x[:1]) for k, m in (("plain", plain), ("farkas", farkas))}
            rows.append({"network": f"timm {name} {norm}", "input": f"{batch}x3x{size}x{size}",
                         "Farkas layers": len(rep.changes), "plain ms": 1e3 * t["plain"],
                         "farkas ms": 1e3 * t["farkas"], "farkas / plain": t["farkas"] / t["plain"],
                         "MACs farkas / plain": macs["farkas"] / macs["plain"]})
    return rows


# ====================================================================== summaries
def summary_rows(results: dict[str, ConfigResult], records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration at its selected lr."""
    rows = []
    for config, res in results.items():
        rows.append({
            "configuration": config, "BN": "yes" if config.startswith("bn") else "no",
            "Farkas layers": records[config]["farkas_layers"] if config in records else 0,
            "params": res.runs[0].num_params if res.runs else None,
            "lr": lr_cell(res.best_lr, res.best_at_edge), "seeds": seeds_cell(res.runs),
            "final train loss": mean_sd([r.final_train_loss for r in res.runs], ".4f"),
            "test acc": mean_sd([r.final_test_acc for r in res.runs], ".4f"),
            "step ms (median)": mean_sd([1e3 * r.median_step_time_s for r in res.runs], ".0f"),
            "_losses": [r.final_train_loss for r in res.runs], "_accs": [r.final_test_acc for r in res.runs]})
    return rows


def dead_rows(results: dict[str, ConfigResult], init: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Dead-ReLU statistics at init (seed 0) and after training (mean over the seeds at the selected lr)."""
    rows = []
    for config, res in results.items():
        end = [res.dead[(r.lr, r.seed)] for r in res.runs if not r.diverged]
        mean = {k: float(np.mean([d[k] for d in end])) if end else None for k in init[config]}
        rows.append({"configuration": config,
                     "relu1 dead locations, init": init[config]["relu1_dead_locations"],
                     "relu1 dead locations, end": mean["relu1_dead_locations"],
                     "relu1 dead channels, init": init[config]["relu1_dead_channels"],
                     "relu1 dead channels, end": mean["relu1_dead_channels"],
                     "relu2 dead channels, init": init[config]["relu2_dead_channels"],
                     "relu2 dead channels, end": mean["relu2_dead_channels"]})
    return rows


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """Farkas minus plain, with and without BN, against the seed spread (mechanical, no judgement)."""
    by = {r["configuration"]: r for r in rows}
    out = []
    for norm, label in (("bn", "With BN"), ("nobn", "Without BN")):
        a, b = by.get(norm), by.get(norm + "+farkas")
        if a is None or b is None:
            continue
        la, lb = finite(a["_losses"]), finite(b["_losses"])
        aa, ab = finite(a["_accs"]), finite(b["_accs"])
        if not (la and lb and aa and ab):
            out.append(f"- {label}: no comparison (a configuration has no finished run).")
            continue
        dl, da = np.mean(lb) - np.mean(la), np.mean(ab) - np.mean(aa)
        out.append(f"- {label}: Farkas changes the final training loss by {dl:+.4f} (seed sd {sd(la):.4f} "
                   f"plain, {sd(lb):.4f} Farkas) and test accuracy by {100 * da:+.2f} points (seed sd "
                   f"{100 * sd(aa):.2f} / {100 * sd(ab):.2f}); |difference| "
                   + ("exceeds" if abs(da) > sd(aa) + sd(ab) else "is within")
                   + " the sum of the two accuracy sds.")
    return out


def _markdown(rows: list[dict[str, Any]], sweep: list[dict[str, Any]], dead: list[dict[str, Any]], overhead: list[dict[str, Any]],
              records: dict[str, dict[str, Any]], budget: Budget, args: argparse.Namespace, env: dict[str, Any],
              figures: list[Path], md_dir: Path, wall: float) -> str:
    b = budget
    n_train, n_test = subset_text(b.train_subset, 10000), subset_text(b.test_subset, 1000)
    rec = records.get("nobn+farkas") or records.get("bn+farkas") or {}
    lines = [
        f"Command: `{args.command}`  ",
        f"{machine_text(env, shared=True)}. Wall time {wall / 60:.1f} min.", "",
        (f"Budget: {b.steps} steps of {args.optimizer_text} (constant lr) of batch {b.batch_size}; training images: "
         f"{n_train}; test images: {n_test}, evaluated every {b.eval_every} steps. lr grid {list(b.lrs)} for "
         f"every configuration, swept on {args.select_seeds} seed(s), selected by the lowest final training "
         f"loss (mean of the last 5% of steps); {args.seeds} seed(s) at the selected lr. Mean ± sd over "
         "seeds; 'step ms' is the median step time inside the training runs (not controlled for load)."), "",
        (f"Farkas pass mode `{args.farkas_mode}`: {rec.get('farkas_layers', '–')} Farkas layers per network "
         "(the first conv of each BasicBlock)"
         + (f" and {rec.get('farkas_sums', '–')} Farkas units on block sums" if args.farkas_mode == "block" else "")
         + f"; skipped: {len(rec.get('skipped', {}))} layers (conv2 and shortcut convs feed a residual sum, the "
         "stem's ReLU output feeds a residual sum, the head feeds the output)."), "",
        write_table_md(rows, [c for c in rows[0] if not c.startswith("_")]) if rows else "",
        "Learning-rate sweep (final training loss / test accuracy):", "",
        write_table_md(sweep, list(sweep[0])) if sweep else "",
        ("Dead ReLUs on the first 256 test images (eval mode), averaged over the 8 blocks: 'dead locations' = "
         "fraction of (image, position) where every channel of the block's first ReLU (the one a Farkas unit "
         "feeds) is zero; 'dead channels' = fraction of channels zero on all 256 images. Init: seed 0; end: "
         "mean over the seeds at the selected lr."), "",
        write_table_md(dead, list(dead[0])) if dead else "",
        ("Training-step overhead (forward + backward + SGD step, batch "
         f"{b.batch_size}, median of {b.time_steps} interleaved steps after {b.time_warmup} warm-up; "
         "'widened' = the plain network with every conv1 one channel wider, i.e. the Farkas model's shapes "
         "without the Farkas unit's own ops):"), "",
        write_table_md(overhead, list(overhead[0])) if overhead else "",
        "Mechanical comparison at the selected lrs:", "", *reading(rows), ""]
    lines += [f"![{p.stem}]({os.path.relpath(p.resolve(), md_dir)})" for p in figures] + [""]
    return "\n".join(lines)


# ====================================================================== CLI
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = new_parser(__doc__)
    add_sweep_args(p, CONFIGS, steps=300, lrs=(0.01, 0.03, 0.1))
    p.add_argument("--time-steps", type=int, help="timed steps per model for the overhead (default 30)")
    p.add_argument("--overhead-only", action="store_true",
                   help="only the training-step overhead (small network and timm models); writes overhead.md/json")
    p.add_argument("--overhead-models", nargs="*", default=["resnet18"],
                   help="timm models whose overhead is measured at their real widths (default resnet18; none: skip)")
    p.add_argument("--overhead-size", type=int, default=32, help="input size for the timm overhead (default 32)")
    p.add_argument("--farkas-mode", choices=("layer", "block"), default="layer",
                   help="the farkas pass's mode (default layer: units on every block's conv1 only)")
    add_output_args(p, DEFAULT_OUT, "train_farkas.md", why=": on a shared 2-core machine 2 threads stall")
    args = p.parse_args(argv)
    return finish_sweep_args(p, args, argv, "train_farkas.py", QUICK_BUDGET if args.quick else DEFAULT_BUDGET,
                             time_steps=args.time_steps)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the figures, JSON and Markdown; return the summary.

    Returns:
        ``{"rows", "sweep", "dead", "overhead", "records", "markdown", "files", "json"}``.
    """
    args = _parse(argv)
    with torch_threads(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    out_dir, md_path = output_paths(args, "train_farkas.md")
    budget, env, seeds = args.budget, environment(args.threads), list(range(args.seeds))
    start = time.perf_counter()
    data = load_splits("cifar10", budget.train_subset, budget.test_subset)
    if args.overhead_only:
        return _overhead_only(args, data, env, out_dir, start)
    records = {c: farkas_record(c, args.farkas_mode) for c in args.configs if c.endswith("+farkas")}
    results: dict[str, ConfigResult] = {}
    for config in args.configs:
        res = results[config] = run_config(config, data, budget, seeds, args.select_seeds, args.farkas_mode,
                                           args.optimizer_spec)
        log(f"[{config}] best lr {res.best_lr}, final loss "
            + (", ".join(f"{r.final_train_loss:.4f}" for r in res.runs) or "all diverged")
            + f", test acc {', '.join(f'{r.final_test_acc}' for r in res.runs)} ({res.wall_time_s:.0f} s)")
    n = budget.batch_size
    overhead = measure_overhead(data[0][:n], data[1][:n], budget, args.farkas_mode)
    overhead += measure_overhead_timm(args.overhead_models, args.overhead_size, n, budget.time_steps,
                                      budget.time_warmup, args.farkas_mode)
    log("overhead: " + "; ".join(f"{r['network']} farkas/plain {r['farkas / plain']:.3f}" for r in overhead))
    wall = time.perf_counter() - start
    rows, sweep = summary_rows(results, records), sweep_rows(results)
    init_dead = {}
    for config in results:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            init_dead[config] = dead_stats(build_model(config, mode=args.farkas_mode), data[2][:256])
    dead = dead_rows(results, init_dead)
    title = f"small ResNet-18 on CIFAR-10 subset, {budget.steps} steps, batch {budget.batch_size}"
    curves = selected_curves(results)
    figures = [plot_curves(curves, out_dir / "train_loss.png", title),
               plot_accuracy(curves, out_dir / "test_acc.png", title)]
    md = _markdown(rows, sweep, dead, overhead, records, budget, args, env, figures, md_path.parent.resolve(), wall)
    json_path = save_json({
        "command": args.command, "environment": env, "budget": asdict(budget), "seeds": seeds,
        "select_seeds": args.select_seeds, "wall_time_s": wall, "farkas_pass": records, "overhead": overhead,
        "dead": dead,
        "rows": [{k: v for k, v in r.items()} for r in rows],
        "configs": {c: r.record(args.select_seeds,
                                dead_end={f"lr {lr:g} seed {seed}": d for (lr, seed), d in r.dead.items()})
                    for c, r in results.items()}}, out_dir / "train_farkas.json")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    print(md)
    return {"rows": rows, "sweep": sweep, "dead": dead, "overhead": overhead, "records": records, "markdown": md,
            "files": figures + [md_path], "json": json_path}


def _overhead_only(args: argparse.Namespace, data: tuple[torch.Tensor, ...], env: dict[str, Any], out_dir: Path,
                   start: float) -> dict[str, Any]:
    budget, n = args.budget, args.budget.batch_size
    rows = measure_overhead(data[0][:n], data[1][:n], budget, args.farkas_mode)
    rows += measure_overhead_timm(args.overhead_models, args.overhead_size, n, budget.time_steps,
                                  budget.time_warmup, args.farkas_mode)
    for r in rows:
        log(f"overhead: {r['network']} farkas/plain {r['farkas / plain']:.3f}")
    wall = time.perf_counter() - start
    md = "\n".join([
        f"Command: `{args.command}`  ",
        (f"{machine_text(env)}, load average at the end {os.getloadavg()[0]:.2f}. Wall time {wall / 60:.1f} min."),
        "",
        (f"Training-step time (forward + backward + SGD step), median of {budget.time_steps} interleaved steps "
         f"after {budget.time_warmup} warm-up, Farkas pass mode `{args.farkas_mode}`. The small network's rows "
         "use CIFAR-10 images of batch " f"{n}; the timm rows use random inputs."), "",
        write_table_md(rows, list(dict.fromkeys(k for r in rows for k in r))), ""])
    md_path = args.md_out or out_dir / "overhead.md"
    json_path = save_json({"command": args.command, "environment": env, "budget": asdict(budget),
                           "wall_time_s": wall, "overhead": rows}, out_dir / "overhead.json")
    save_text(md, md_path)
    print(md)
    return {"overhead": rows, "markdown": md, "files": [md_path], "json": json_path}


if __name__ == "__main__":
    main()
