"""Conditions by measurement (issue 16): after each DKS/TAT pipeline, predicted vs measured, over seeds.

For every model of ``harness.measured_models`` (a dozen of different families, all shaped layers
of width ≥ 256, plus the known gaps), each seed builds the model afresh, runs its pipeline with
``orthogonal_init(seed)``, predicts with ``netsurgeon.analyze`` (and the pass's ``IdealGraph``)
and measures on fresh input pairs. The table gives, per model:

* **q at the shaped nodes**: over the input and output of every ``ShapedActivation``, the largest
  |mean d| (d = measured - predicted; the prediction is 1 there) with its SE, and the largest |z|;
* **the network C map at c = 0, 0.5, 0.9**: predicted and measured (mean ± SE over the seeds), at
  the output of a flat network and at the body (per location, before the head's global pooling)
  of a network with locations;
* **head C(0)**: the output after the global pooling, reported (see docs/dks.md);
* **holds**: every q and C-map row within 3 SE (q: plus ``Q_FLOOR``, C: plus ``C_FLOOR``); a row
  outside is measured again on as many more seeds and fails only if still outside over all of
  them (``harness.measured_models.check``).

Usage:
    python benchmarks/measured_conditions.py --out /tmp/measured.md            # 16 seeds, every model
    python benchmarks/measured_conditions.py --seeds 4 --models mlp_tanh       # a quick look
    python benchmarks/measured_conditions.py --seeds 64 --json /tmp/m.json     # raw per-seed values too
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from harness import publish, save_json
from harness.measured_models import C_FLOOR, COSINES, KNOWN_GAPS, MODELS, Q_FLOOR, Verdict, check


def _pm(row) -> str:
    return f"{row.measured:.4f} ± {row.se:.4f}"


def model_row(verdict: Verdict) -> str:
    res = verdict.first
    spec = res.spec
    q = res.q_rows()
    worst = max(q, key=lambda r: abs(r.diff))
    zmax = max(max(0.0, abs(r.diff) - Q_FLOOR * abs(r.predicted)) / r.se for r in q if r.se > 0)
    where = "output" if res.body is None else "body"
    prefix = "C(" if res.body is None else "body C("
    cells = []
    for c in COSINES:
        r = res.rows[f"{prefix}{c:g})"]
        cells.append(f"{r.predicted:.4f} / {_pm(r)}")
    head = res.rows["C(0)"] if res.body is not None else None
    head_cell = f"{head.predicted:.4f} / {_pm(head)}" if head is not None else "–"
    if verdict.failures:
        holds = f"**no** ({len(verdict.failures)} rows; worst: {_worst(verdict.failures)})"
    elif verdict.flagged:
        holds = (f"yes ({len(verdict.flagged)} rows outside 3 SE at {res.seeds} seeds, within at "
                 f"{verdict.both.seeds}: {_worst(verdict.flagged)})")
    else:
        holds = "yes"
    return (f"| {spec.name} | {spec.family} | {spec.pipeline_text()} | {res.shaped} | "
            f"{worst.diff:+.4f} ± {worst.se:.4f} | {zmax:.1f} | {where} | " + " | ".join(cells)
            + f" | {head_cell} | {holds} |")


def _worst(rows) -> str:
    r = max(rows, key=lambda r: abs(r.z))
    return f"{r.what}: {r.predicted:.4f} vs {r.measured:.4f}, z = {r.z:.1f}"


HEADER = ("| model | family | pipeline | shaped | q: worst mean d ± SE | q: max z | C map at | "
          + " | ".join(f"C({c:g}) pred / meas ± SE" for c in COSINES) + " | head C(0) pred / meas ± SE | holds |\n"
          + "|" + "---|" * (10 + len(COSINES)))


def run(names: list[str], seeds: int) -> tuple[str, dict]:
    lines, raw, times = [HEADER], {}, {}
    for name in names:
        spec = MODELS.get(name) or KNOWN_GAPS[name]
        t0 = time.perf_counter()
        verdict = check(spec, seeds)
        times[name] = time.perf_counter() - t0
        lines.append(model_row(verdict))
        raw[name] = {"spec": spec.what, "pipeline": spec.pipeline_text(), "body": verdict.first.body,
                     "rows": {k: vars(r) for k, r in verdict.first.rows.items()},
                     "per_seed": (verdict.both or verdict.first).per_seed,
                     "failures": [vars(r) for r in verdict.failures], "seconds": times[name]}
        print(f"{name}: {times[name]:.1f} s", file=sys.stderr, flush=True)
    text = "\n".join(lines)
    text += (f"\n\n{seeds} seeds per model (a row outside 3 SE is confirmed on {2 * seeds}); input pairs at "
             f"c = {', '.join(f'{c:g}' for c in COSINES)}; Q_FLOOR = {Q_FLOOR:g} (relative), C_FLOOR = {C_FLOOR:g}. "
             "Times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
             + f". torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}.\n")
    return text, raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=16, help="seeds per model (default 16)")
    p.add_argument("--models", default=None,
                   help="comma-separated names (default: the dozen, then the known gaps)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--json", default=None, help="write every row and the per-seed values here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else list(MODELS) + list(KNOWN_GAPS)
    unknown = [n for n in names if n not in MODELS and n not in KNOWN_GAPS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(list(MODELS) + list(KNOWN_GAPS))}")
    text, raw = run(names, args.seeds)
    publish(text, args.out)
    if args.json:
        save_json(raw, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
