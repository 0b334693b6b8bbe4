"""Per-step cost of ``netsurgeon.optim.KFAC`` against SGD (issue 18 §1): timm resnet18 (random weights),
batch 16, cross-entropy on random labels, at 224 and 64 px. One step is forward, backward and the
optimizer's step; K-FAC's factors are collected every ``--period`` steps and decomposed every
``--period`` steps, so its time is averaged over whole periods (the amortized cost). SGD and K-FAC
alternate in blocks of one period, on the same model copy's shapes, so that a load change on the
machine affects both; the ratio is of the means over all blocks.

Goals: K-FAC's amortized step <= 1.2x SGD's at 224 px, <= 1.5x at 64 px.

Usage:
    python benchmarks/kfac_cost.py                            # both sizes, 3 blocks each
    python benchmarks/kfac_cost.py --sizes 64 --blocks 2 --threads 1
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


def measure(size: int, period: int, blocks: int, subsample: float, chunk_size: int | None, batch: int = 16) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    sgd_model, kfac_model = timm.create_model("resnet18"), timm.create_model("resnet18")
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3, momentum=0.9)
    kfac = KFAC(kfac_model, lr=1e-3, damping=1e-3, stats_every=period, update_every=period, subsample=subsample,
                chunk_size=chunk_size)
    timed_steps(sgd_model, sgd, x, y, 1)  # warm-up (allocator, first-call costs); K-FAC's first step builds its state
    timed_steps(kfac_model, kfac, x, y, period)
    t_sgd, t_kfac = [], []
    for _ in range(blocks):
        t_sgd += timed_steps(sgd_model, sgd, x, y, period)
        t_kfac += timed_steps(kfac_model, kfac, x, y, period)
    ms, mk = sum(t_sgd) / len(t_sgd), sum(t_kfac) / len(t_kfac)
    return {"size": size, "batch": batch, "period": period, "subsample": subsample, "chunk_size": chunk_size,
            "blocks": blocks,
            "sgd_s_per_step": ms, "kfac_s_per_step": mk, "ratio": mk / ms, "goal": GOALS.get(size),
            "kfac_max_step_s": max(t_kfac), "sgd_steps": t_sgd, "kfac_steps": t_kfac}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    ap.add_argument("--period", type=int, default=10, help="stats_every = update_every (default 10)")
    ap.add_argument("--blocks", type=int, default=3, help="alternating blocks of one period each (default 3)")
    ap.add_argument("--subsample", type=float, default=1.0, help="K-FAC's subsample of rows/locations (default 1)")
    ap.add_argument("--chunk-size", type=int, default=256, help="K-FAC's chunk_size (default 256; 0: none)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "kfac_cost.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(s, args.period, args.blocks, args.subsample, args.chunk_size or None) for s in args.sizes]
    env = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "device": "cpu"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    tmp.replace(args.out)
    print(f"| size | batch | period | subsample | chunk | SGD s/step | K-FAC s/step (amortized) | ratio | goal | met |\n"
          f"|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {r['period']} | {r['subsample']:g} | {r['chunk_size']} | "
              f"{r['sgd_s_per_step']:.3f} | "
              f"{r['kfac_s_per_step']:.3f} | {r['ratio']:.2f}x | ≤ {r['goal']}x | "
              f"{'yes' if r['ratio'] <= r['goal'] else 'no'} |")
    print(f"\n{env}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
