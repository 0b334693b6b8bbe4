"""Identity at initialization on the CIFAR-10 subset (issue 6 §3).

Claim tested: a residual network *without* batch norm whose residual blocks are the identity
at initialization trains as well as the same network *with* batch norm (Hardt & Ma, "Identity
matters in deep learning", arXiv:1611.04231; Zhang, Dauphin & Ma, "Fixup initialization",
arXiv:1901.09321; De & Smith, "Batch normalization biases residual blocks towards the identity
function" (SkipInit), arXiv:2002.10444; Bachlechner et al., ReZero, arXiv:2003.04887; docs/theory.md §7).

The network (``harness.models.SmallResNet``): post-activation BasicBlocks ``relu(F(x) + shortcut(x))`` with
``F = conv3x3 -> [BN] -> relu -> conv3x3 -> [BN]`` (He et al. 2016, arXiv:1512.03385), a 3x3
stem, 3 stages of 2 blocks with widths 16/32/64 (stride 2 and a 1x1 projection shortcut at each
stage change), global average pooling and a linear head. Six configurations:

* ``bn``              -- the reference: BatchNorm after every conv (convs without bias);
* ``nobn``            -- the same network without BatchNorm (convs with bias), default init;
* ``nobn+zero_last``  -- ``nobn`` after ``identity_residual`` mode ``zero_last`` (last conv of
  every branch zeroed);
* ``nobn+skipinit``   -- mode ``skipinit`` (a learnable scalar, 0 at init, on every branch);
* ``nobn+fixup``      -- mode ``fixup`` (branch convs He x L^(-1/(2m-2)), last conv and the
  classifier zeroed, scalar biases and multipliers);
* ``nobn+hardt_ma``   -- mode ``hardt_ma`` (branch convs N(0, σ²), σ = 1/(k² c); the classifier a
  fixed random projection).

Every pass is applied with ``netsurgeon.transform(model, passes=[("identity_residual", {"mode": m,
"seed": seed})], example_inputs=torch.randn(1, 3, 32, 32))`` on top of PyTorch's default init;
the shortcut projections and the stem keep their default init in every configuration.

Protocol. SGD with momentum 0.9 (``--optimizer kfac``: netsurgeon's K-FAC, damping ``--kfac-damping``), constant
learning rate, no weight decay, no augmentation,
inputs standardized per channel; ``--steps`` steps of batch ``--batch-size`` on a fixed random
subset of the training split. The same lr grid for every configuration is swept on the first
``--select-seeds`` seeds; the lr with the lowest mean training loss over the last 5% of the
steps (among lrs with no diverged run) is selected and the remaining seeds run at that lr.
Test accuracy is on the 1000-image test split.

Outputs in ``--out-dir`` (default ``docs/figures/train_identity``): ``train_loss.png``,
``test_acc.png``, ``train_identity.json`` and ``train_identity.md`` (the Markdown section, also
printed). Both are rewritten after every configuration, so an interrupted run leaves the
configurations it finished (marked partial).

Usage:
    nice -n 10 python benchmarks/train_identity.py                  # default run: 16.6 min on 2 cores shared with 2 jobs
    python benchmarks/train_identity.py --quick --out-dir /tmp/ti    # smoke run, seconds
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

import netsurgeon
from harness import (add_output_args, add_sweep_args, environment, finish_sweep_args, log, machine_text, new_parser,
                     output_paths, plot_accuracy, plot_curves, save_json, steps_to_loss, subset_text, torch_threads,
                     write_table_md)
from harness.data import load_splits
from harness.models import BasicBlock, SmallResNet
from harness.stats import finite, mean_sd, sd
from harness.sweeps import ConfigResult, SweepBudget, lr_cell, seeds_cell, selected_curves, sweep_config, sweep_rows

__all__ = ["CONFIGS", "Budget", "BasicBlock", "SmallResNet", "build_model", "pass_record", "branch_share", "run_config", "main"]

CONFIGS = ("bn", "nobn", "nobn+zero_last", "nobn+skipinit", "nobn+fixup", "nobn+hardt_ma")
WIDTHS, BLOCKS = (16, 32, 64), (2, 2, 2)
INPUT_SHAPE = (3, 32, 32)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "figures" / "train_identity"


@dataclass(frozen=True)
class Budget(SweepBudget):
    """Data and step budget (training split: 10000 images, test split: 1000)."""

    target_loss: float         # for "steps to loss" (smoothed training loss)


DEFAULT_BUDGET = Budget(250, 64, (0.03, 0.1), 50, 5000, None, 1.8)
QUICK_BUDGET = Budget(4, 16, (0.03,), 2, 128, 64, 2.2)


# ====================================================================== network
def build_model(config: str, seed: int | None = 0) -> nn.Module:
    """The network of ``config`` (one of :data:`CONFIGS`): default init, then the
    ``identity_residual`` pass (seeded with ``seed``) for the ``nobn+<mode>`` configurations."""
    if config not in CONFIGS:
        raise ValueError(f"config={config!r}; valid: {CONFIGS}")
    net = SmallResNet(norm=config == "bn", widths=WIDTHS, blocks=BLOCKS)
    if "+" in config:
        mode = config.split("+", 1)[1]
        net = netsurgeon.transform(net, passes=[("identity_residual", {"mode": mode, "seed": seed})],
                                   example_inputs=torch.randn(1, *INPUT_SHAPE))
    return net


def pass_record(config: str) -> dict[str, Any]:
    """What ``identity_residual`` changed and skipped in ``config``'s network (empty for bn, nobn)."""
    if "+" not in config:
        return {"changed": [], "skipped": {}}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rec = netsurgeon.report(build_model(config)).passes[0]
    return {"changed": [f"{c.node}: {c.what}" for c in rec.changes], "skipped": {s.node: s.why for s in rec.skipped}}


@torch.no_grad()
def branch_share(model: nn.Module, x: torch.Tensor) -> float:
    """How far the network is from its branch-free version: ``max|f(x) - f_cut(x)| / max|f(x)|``
    in eval mode, where ``f_cut`` is a copy with every block's last conv (``conv2``) zeroed, so every
    residual block reduces to ``relu(shortcut(x))``. 0 when every block is the identity (up to its
    shortcut and output ReLU); 0/0 (a zero classifier, fixup) counts as 0."""
    cut = copy.deepcopy(model)
    for name, mod in cut.named_modules():
        if name.split(".")[-1] == "conv2" and isinstance(mod, nn.Conv2d):
            nn.init.zeros_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    was = model.training
    model.eval()
    try:
        out, ref = model(x), cut.eval()(x)
    finally:
        model.train(was)
    scale = float(out.abs().max())
    return 0.0 if scale == 0.0 else float((out - ref).abs().max()) / scale


# ====================================================================== training
def run_config(config: str, data: tuple[torch.Tensor, ...], budget: Budget, seeds: Sequence[int],
               select_seeds: int, optimizer: Any = "sgd") -> ConfigResult:
    """Sweep the lr grid on the first ``select_seeds`` seeds, then run the others at the best lr."""
    return sweep_config(config, lambda seed: build_model(config, seed), data, budget, seeds, select_seeds, optimizer)


# ====================================================================== summaries
def summary_rows(results: dict[str, ConfigResult], shares: dict[str, float], target: float) -> list[dict[str, Any]]:
    """One row per configuration at its selected lr."""
    rows = []
    for config, res in results.items():
        reached = [steps_to_loss(r, target) for r in res.runs if not r.diverged]
        hit = [s for s in reached if s is not None]
        rows.append({
            "configuration": config, "BN": "yes" if config == "bn" else "no",
            "branch share at init": shares.get(config),
            "trainable params": res.runs[0].num_params if res.runs else None,
            "lr": lr_cell(res.best_lr, res.best_at_edge), "seeds": seeds_cell(res.runs),
            "loss at step 1": mean_sd([r.train_loss[0] for r in res.runs if r.train_loss], ".3f"),
            "final train loss": mean_sd([r.final_train_loss for r in res.runs], ".4f"),
            "test acc": mean_sd([r.final_test_acc for r in res.runs], ".4f"),
            f"steps to loss {target:g}": (mean_sd(hit, ".0f") + ("" if len(hit) == len(reached) else
                                          f" ({len(reached) - len(hit)} not reached)")) if hit else "not reached",
            "step ms (median)": mean_sd([1e3 * r.median_step_time_s for r in res.runs], ".0f"),
            "_losses": [r.final_train_loss for r in res.runs], "_accs": [r.final_test_acc for r in res.runs]})
    return rows


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """Each BN-free configuration minus the BN reference, against the seed spread (mechanical)."""
    by = {r["configuration"]: r for r in rows}
    ref = by.get("bn")
    if ref is None or not finite(ref["_losses"]):
        return ["- No comparison: the bn reference has no finished run."]
    lb, ab = finite(ref["_losses"]), finite(ref["_accs"])
    out = []
    for config, r in by.items():
        if config == "bn":
            continue
        lc, ac = finite(r["_losses"]), finite(r["_accs"])
        if not (lc and ac):
            out.append(f"- {config}: no finished run.")
            continue
        dl, da = np.mean(lc) - np.mean(lb), np.mean(ac) - np.mean(ab)
        out.append(f"- {config} vs bn: final training loss {dl:+.4f} (seed sd {sd(lc):.4f} vs {sd(lb):.4f}), "
                   f"test accuracy {100 * da:+.2f} points (seed sd {100 * sd(ac):.2f} vs {100 * sd(ab):.2f}); "
                   + ("one seed: no spread to compare with." if min(len(ac), len(ab)) < 2 else
                      "the accuracy difference " + ("exceeds" if abs(da) > sd(ac) + sd(ab) else "is within")
                      + " the sum of the two sds."))
    return out


def _markdown(rows: list[dict[str, Any]], sweep: list[dict[str, Any]], records: dict[str, dict[str, Any]],
              args: argparse.Namespace, env: dict[str, Any], figures: list[Path], link_dir: Path, wall: float,
              done: int) -> str:
    b = args.budget
    n_train, n_test = subset_text(b.train_subset, 10000), subset_text(b.test_subset, 1000)
    partial = [] if done == len(args.configs) else \
        [f"**Partial:** {done} of {len(args.configs)} configurations finished.", ""]
    lines = partial + [
        f"Command: `{args.command}`  ",
        f"{machine_text(env, shared=True)}. Wall time {wall / 60:.1f} min.", "",
        (f"Budget: {b.steps} steps of {args.optimizer_text} (constant lr, no weight decay, no augmentation) of batch "
        f"{b.batch_size}; training images: {n_train} of the 10000-image CIFAR-10 subset; test images: {n_test}, "
        f"evaluated every {b.eval_every} steps. lr grid {list(b.lrs)} for every configuration, swept on "
        f"{args.select_seeds} seed(s), selected by the lowest final training loss (mean of the last 5% of steps; "
        f"'edge' = the best lr is at the grid's edge); {args.seeds} seed(s) at the selected lr. Mean ± sd over "
        "seeds. 'branch share at init' = max|f - f_cut| / max|f| on 256 test images (eval mode, seed 0), f_cut "
        "the same network with every block's last conv zeroed: 0 means every block is exactly "
        f"relu(shortcut(x)) at init. 'steps to loss {b.target_loss:g}' = first step at which the smoothed "
        "training loss (EMA 0.9) is at most that value."), "",
        write_table_md(rows, [c for c in rows[0] if not c.startswith("_")]) if rows else "",
        "Learning-rate sweep (final training loss / test accuracy, select seeds):", "",
        write_table_md(sweep, list(sweep[0])) if sweep else "",
        ("What `identity_residual` changed (seed 0): "
         + "; ".join(f"{c}: {len(r['changed'])} changes, {len(r['skipped'])} skipped" for c, r in records.items()
                     if "+" in c) + "."), "",
        "Mechanical comparison at the selected lrs:", "", *reading(rows), ""]
    lines += [f"![{p.stem}]({os.path.relpath(p.resolve(), link_dir.resolve())})" for p in figures] + [""]
    return "\n".join(lines)


# ====================================================================== CLI
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = new_parser(__doc__)
    add_sweep_args(p, CONFIGS, steps=250, lrs=(0.03, 0.1), train_subset="5000", test_subset="all 1000")
    p.add_argument("--target-loss", type=float, help="smoothed training loss for 'steps to loss' (default 1.8)")
    add_output_args(p, DEFAULT_OUT, "train_identity.md", why=": the machine is shared")
    p.add_argument("--link-dir", type=Path, default=ROOT / "docs",
                   help="figure links in the Markdown are relative to this directory (default docs/, where the "
                        "section goes into benchmarks.md)")
    args = p.parse_args(argv)
    return finish_sweep_args(p, args, argv, "train_identity.py", QUICK_BUDGET if args.quick else DEFAULT_BUDGET,
                             target_loss=args.target_loss)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the figures, JSON and Markdown; return the summary.

    Returns:
        ``{"rows", "sweep", "records", "shares", "markdown", "files", "json"}``.
    """
    args = _parse(argv)
    with torch_threads(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    out_dir, md_path = output_paths(args, "train_identity.md")
    budget, env, seeds = args.budget, environment(args.threads), list(range(args.seeds))
    start = time.perf_counter()
    data = load_splits("cifar10", budget.train_subset, budget.test_subset)
    records = {c: pass_record(c) for c in args.configs}
    shares = {}
    for config in args.configs:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            shares[config] = branch_share(build_model(config, 0), data[2][:256])
    results: dict[str, ConfigResult] = {}
    summary: dict[str, Any] = {}
    for config in args.configs:
        res = results[config] = run_config(config, data, budget, seeds, args.select_seeds, args.optimizer_spec)
        log(f"[{config}] best lr {res.best_lr}, final loss "
            + (", ".join(f"{r.final_train_loss:.4f}" for r in res.runs) or "all diverged")
            + f", test acc {', '.join(f'{r.final_test_acc}' for r in res.runs)} ({res.wall_time_s:.0f} s)")
        summary = _write(results, records, shares, args, env, out_dir, md_path, time.perf_counter() - start)
    print(summary["markdown"])
    return summary


def _write(results: dict[str, ConfigResult], records: dict[str, dict[str, Any]], shares: dict[str, float],
           args: argparse.Namespace, env: dict[str, Any], out_dir: Path, md_path: Path, wall: float) -> dict[str, Any]:
    """Write the figures, JSON and Markdown for the configurations finished so far."""
    budget = args.budget
    rows, sweep = summary_rows(results, shares, budget.target_loss), sweep_rows(results, diverged_at=True)
    title = f"small ResNet on CIFAR-10 subset, {budget.steps} steps, batch {budget.batch_size}"
    curves = selected_curves(results)
    figures = [plot_curves(curves, out_dir / "train_loss.png", title),
               plot_accuracy(curves, out_dir / "test_acc.png", title)]
    md = _markdown(rows, sweep, records, args, env, figures, args.link_dir, wall, len(results))
    json_path = save_json({
        "command": args.command, "environment": env, "budget": asdict(budget), "seeds": list(range(args.seeds)),
        "select_seeds": args.select_seeds, "wall_time_s": wall, "finished": list(results),
        "partial": len(results) < len(args.configs), "identity_residual": records, "branch_share_at_init": shares,
        "rows": rows,
        "configs": {c: r.record(args.select_seeds) for c, r in results.items()}}, out_dir / "train_identity.json")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    return {"rows": rows, "sweep": sweep, "records": records, "shares": shares, "markdown": md,
            "files": figures + [md_path], "json": json_path}


if __name__ == "__main__":
    main()
