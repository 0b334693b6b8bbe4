"""Seed-averaged accuracy of ``netsurgeon.analyze`` against ``netsurgeon.measure`` (issue 3).

Issue 3 asks that, at width 512, every node's predicted q be within 3% (relative) and
its c within 0.02 (absolute) of the measurement averaged over a few network seeds, for a
20-layer MLP (tanh, ReLU, GELU) and a 20-layer delta-orthogonal conv net. With the 4 seeds
of ``tests/test_analysis.py`` tanh meets it and ReLU and GELU do not. ``docs/analysis.md``
puts this down to finite-width noise: the prediction is unbiased, and the average over
seeds converges. This script checks that claim by averaging over many seeds.

The networks are built exactly as in ``tests/test_analysis.py``, so seeds 0-3 give the same
networks and inputs as the tests:

* MLP: ``Linear(512, 512)`` + activation, 20 times; orthogonal weights with gain² 2
  for ReLU and 1 otherwise; biases N(0, 0.1²). Inputs: 64 pairs with q = 1 and c = 0.5.
* Conv net: 20 times ``Conv2d(512, 512, 3, padding=1)`` + activation. The weights are
  delta-orthogonal (only the centre tap is non-zero, orthogonal, gain² 2 for ReLU and 1
  for tanh), and the biases are N(0, 0.1²). Inputs: 16 pairs of 512 x 4 x 4 maps at
  c = 0.5.

For each seed the script calls ``analyze(net, c_in=0.5)``, which predicts q at every node
and c at pair cosine 0.5. It then calls ``measure`` on the input pairs and records, at
every node, the ratio r = measured q / predicted q and the difference d = measured c -
predicted c. For the first N seeds (N = 4, 16, 64 and the maximum), it reports:

* the worst node's |mean r - 1|, with the standard error of mean r at that node and the
  z score |mean r - 1| / SE;
* the worst node's |mean d|, with its standard error;
* the test's metric ``max |mean pq - mean mq| / mean mq``, to compare with ``docs/analysis.md``.

It also reports the spread of r from seed to seed at the last layer, and the number of
seeds at which 2 standard errors of that node's mean equal 3%.

Usage:
    nice python benchmarks/analysis_accuracy.py --out /tmp/acc.md    # defaults: 128 MLP / 64 conv seeds
    python benchmarks/analysis_accuracy.py --quick                    # smoke run, 4 seeds each
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import netsurgeon
from harness import publish

WIDTH, DEPTH, BIAS_STD, C_IN = 512, 20, 0.1, 0.5
MLP_ACTS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
CONV_ACTS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
Q_TARGET, C_TARGET = 0.03, 0.02


def mlp(act: Callable[[], nn.Module], seed: int) -> nn.Sequential:
    """The 20-layer MLP of ``tests/test_analysis.py`` (``_chain(act, 512, 20, gain, 0.1, seed)``)."""
    gain = 2.0 if act is nn.ReLU else 1.0
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        lin = nn.Linear(WIDTH, WIDTH)
        nn.init.orthogonal_(lin.weight, gain=gain ** 0.5)
        nn.init.normal_(lin.bias, 0, BIAS_STD)
        layers += [lin, act()]
    return nn.Sequential(*layers)


def convnet(act: Callable[[], nn.Module], seed: int) -> nn.Sequential:
    """The 20-layer delta-orthogonal conv net of ``tests/test_analysis.py`` (gain² 2 for ReLU)."""
    gain = 2.0 if act is nn.ReLU else 1.0
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
        centre = torch.empty(WIDTH, WIDTH)
        nn.init.orthogonal_(centre, gain=gain ** 0.5)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = centre
            conv.bias.normal_(0, BIAS_STD)
        layers += [conv, act()]
    return nn.Sequential(*layers)


@dataclass
class Runs:
    """Per-seed, per-node predicted and measured q and c, arrays ``[seeds, nodes]``."""

    nodes: list[str]
    pq: np.ndarray
    mq: np.ndarray
    pc: np.ndarray
    mc: np.ndarray


def collect(build: Callable[[int], nn.Module], input_shape: tuple[int, ...], seeds: int) -> Runs:
    """Predict and measure every node of ``build(seed)`` for seeds ``0..seeds-1``."""
    rows: list[tuple[list[float], ...]] = []
    names: list[str] = []
    for seed in range(seeds):
        m = build(seed)
        gm = netsurgeon.trace(m)
        a = netsurgeon.analyze(gm, c_in=C_IN)
        g = torch.Generator().manual_seed(100 + seed)  # the tests' input seeds
        z1, z2 = torch.randn(input_shape, generator=g), torch.randn(input_shape, generator=g)
        meas = netsurgeon.measure(gm, z1, C_IN * z1 + (1 - C_IN ** 2) ** 0.5 * z2)
        names = [n for n in a.kernels if n in meas.nodes]
        rows.append(([a.q(n) for n in names], [meas[n].q for n in names],
                     [a.c(n) for n in names], [meas[n].c for n in names]))
    pq, mq, pc, mc = (np.array([r[i] for r in rows]) for i in range(4))
    return Runs(names, pq, mq, pc, mc)


def _se(x: np.ndarray) -> np.ndarray:
    """Standard error of the mean over axis 0 (NaN for one seed)."""
    return x.std(0, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else np.full(x.shape[1:], np.nan)


def summary_rows(label: str, runs: Runs, ns: list[int]) -> list[str]:
    """One Markdown row per N: worst-node q and c statistics over the first N seeds."""
    ratio, diff = runs.mq / runs.pq, runs.mc - runs.pc
    out = []
    for n in ns:
        r, d = ratio[:n], diff[:n]
        err_q, se_q = np.abs(r.mean(0) - 1), _se(r)
        iq = int(np.argmax(err_q))
        err_c, se_c = np.abs(d.mean(0)), _se(d)
        ic = int(np.argmax(err_c))
        z_all = err_q / se_q
        test_q = np.max(np.abs(runs.pq[:n].mean(0) - runs.mq[:n].mean(0)) / runs.mq[:n].mean(0))
        ok = "yes" if err_q[iq] <= Q_TARGET and err_c[ic] <= C_TARGET else "no"
        out.append(f"| {label} | {n} | {err_q[iq]:.4f} | {runs.nodes[iq]} | {se_q[iq]:.4f} | {z_all[iq]:.1f} | "
                   f"{np.nanmax(z_all):.1f} | {err_c[ic]:.4f} | {se_c[ic]:.4f} | {test_q:.4f} | {ok} |")
    return out


def spread_row(label: str, runs: Runs) -> str:
    """Last layer: mean ratio ± SE over all seeds, per-seed std, seeds needed for 2 SE = 3%."""
    r = (runs.mq / runs.pq)[:, -1]
    sd = float(r.std(ddof=1)) if len(r) > 1 else float("nan")
    need = int(np.ceil((2 * sd / Q_TARGET) ** 2)) if np.isfinite(sd) else 0
    lo, hi = float(np.min(r)), float(np.max(r))
    return (f"| {label} | {len(r)} | {r.mean():.4f} ± {sd / np.sqrt(len(r)):.4f} | {sd:.4f} | "
            f"{lo:.3f} .. {hi:.3f} | {need} |")


def run(mlp_seeds: int, conv_seeds: int) -> str:
    t0 = time.perf_counter()
    results: dict[str, Runs] = {}
    for name, act in MLP_ACTS.items():
        results[f"MLP {name}"] = collect(lambda s, act=act: mlp(act, s), (64, WIDTH), mlp_seeds)
    for name, act in CONV_ACTS.items():
        results[f"conv {name}"] = collect(lambda s, act=act: convnet(act, s), (16, WIDTH, 4, 4), conv_seeds)
    elapsed = time.perf_counter() - t0
    lines = ["# analysis_accuracy", "",
             f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
             f"{platform.processor() or platform.machine()}, cpus {os.cpu_count()}; "
             f"{mlp_seeds} MLP seeds, {conv_seeds} conv seeds; {elapsed:.0f} s", "",
             "r = measured q / predicted q, d = measured c - predicted c, per node and seed; means over the "
             "first N seeds (seeds 0..N-1; the prefixes are nested). Worst node = node with the largest "
             f"|mean r - 1|; SE = standard error of the mean over seeds; z = |mean r - 1| / SE. "
             f"Nodes: input, 40 layer outputs and the output ({len(next(iter(results.values())).nodes)}). "
             "\"test metric\" = max over nodes of |mean pq - mean mq| / mean mq, as in tests/test_analysis.py.",
             "", "| net | N | max \\|mean r - 1\\| | at node | SE there | z there | max z | max \\|mean d\\| "
             "| SE there | test metric | 3% / 0.02 met |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, runs in results.items():
        total = len(runs.pq)
        ns = sorted({n for n in (4, 16, 64, 128) if n < total} | {total})
        lines += summary_rows(label, runs, ns)
    lines += ["", "## Last layer, all seeds", "",
              "| net | seeds | mean r ± SE | per-seed std of r | min .. max r | seeds for 2 SE = 3% |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [spread_row(label, runs) for label, runs in results.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlp-seeds", type=int, default=128, help="network seeds per MLP activation (default 128)")
    p.add_argument("--conv-seeds", type=int, default=64, help="network seeds per conv activation (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 seeds each")
    p.add_argument("--out", default=None, help="also write the Markdown report here (atomically)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.mlp_seeds = args.conv_seeds = 4
    report = run(args.mlp_seeds, args.conv_seeds)
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
