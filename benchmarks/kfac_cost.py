"""Per-step cost of ``netsurgeon.optim.KFAC`` against SGD (issue 18 §1): timm resnet18 (random weights),
batch 16, cross-entropy on random labels, at 224 and 64 px. One step is forward, backward and the
optimizer's step; K-FAC's factors are collected every ``--period`` steps and decomposed every
``--period`` steps, so its time is averaged over whole periods (the amortized cost). SGD and the K-FAC
variants (one per ``--chunk-sizes`` entry) take turns in blocks of one period, on the same model's shapes,
so that a load change on the machine affects all; each ratio is of the means over all blocks.

Goals: K-FAC's amortized step <= 1.2x SGD's at 224 px, <= 1.5x at 64 px.

Usage:
    python benchmarks/kfac_cost.py                            # both sizes, chunks 256/128/64, 3 blocks each
    python benchmarks/kfac_cost.py --sizes 64 --blocks 2 --threads 1 --chunk-sizes 128
Writes docs/figures/kfac_cost.json and prints the Markdown table (docs/benchmarks.md, "K-FAC").
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.train import timed_steps  # noqa: E402
from netsurgeon.optim import KFAC  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOALS = {224: 1.2, 64: 1.5}


def measure(size: int, period: int, blocks: int, subsample: float, chunk_sizes: list[int | None], damping_mode: str,
            batch: int = 16) -> list[dict]:
    """One row per chunk size: SGD and every K-FAC variant take turns, one period each per block."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    sgd_model = timm.create_model("resnet18")
    runs = [(sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=1e-3, momentum=0.9))]
    for chunk in chunk_sizes:
        model = timm.create_model("resnet18")
        runs.append((model, KFAC(model, lr=1e-3, damping=1e-3, damping_mode=damping_mode, stats_every=period,
                                 update_every=period, subsample=subsample, chunk_size=chunk)))
    timed_steps(*runs[0], x, y, 1)  # warm-up (allocator, first-call costs); K-FAC's first step builds its state
    for model, opt in runs[1:]:
        timed_steps(model, opt, x, y, period)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(blocks):
        for t, (model, opt) in zip(times, runs):
            t += timed_steps(model, opt, x, y, period)
    ms = sum(times[0]) / len(times[0])
    rows = []
    for chunk, t in zip(chunk_sizes, times[1:]):
        mk = sum(t) / len(t)
        rows.append({"size": size, "batch": batch, "period": period, "subsample": subsample, "chunk_size": chunk,
                     "damping_mode": damping_mode, "blocks": blocks, "sgd_s_per_step": ms, "kfac_s_per_step": mk,
                     "ratio": mk / ms, "goal": GOALS.get(size), "kfac_max_step_s": max(t), "sgd_steps": times[0],
                     "kfac_steps": t})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    ap.add_argument("--period", type=int, default=10, help="stats_every = update_every (default 10)")
    ap.add_argument("--blocks", type=int, default=3, help="alternating blocks of one period each (default 3)")
    ap.add_argument("--subsample", type=float, default=1.0, help="K-FAC's subsample of rows/locations (default 1)")
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 128, 64],
                    help="K-FAC's chunk_size, one variant each (default 256 128 64; 0: none)")
    ap.add_argument("--damping-mode", choices=("factored", "exact"), default="factored")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "kfac_cost.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for s in args.sizes for r in measure(s, args.period, args.blocks, args.subsample,
                                                   [c or None for c in args.chunk_sizes], args.damping_mode)]
    env = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "device": "cpu"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    tmp.replace(args.out)
    print(f"| size | batch | period | subsample | chunk | damping | SGD s/step | K-FAC s/step (amortized) | ratio | goal | "
          f"met |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {r['period']} | {r['subsample']:g} | {r['chunk_size']} | "
              f"{r['damping_mode']} | "
              f"{r['sgd_s_per_step']:.3f} | "
              f"{r['kfac_s_per_step']:.3f} | {r['ratio']:.2f}x | "
              + ("— | — |" if r["goal"] is None else f"≤ {r['goal']}x | {'yes' if r['ratio'] <= r['goal'] else 'no'} |"))
    print(f"\n{env}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
