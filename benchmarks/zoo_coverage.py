"""Coverage of the broad zoo (issue 16): every step on every model, table in docs/coverage.md.

Usage:
    python benchmarks/zoo_coverage.py                     # the whole zoo, 2 worker processes
    python benchmarks/zoo_coverage.py --models resnet18 hf:gpt2 --workers 1
    python benchmarks/zoo_coverage.py --select            # re-apply the selection rule (about 2 minutes)

Each model runs in its own process with a time limit (``--timeout``), so a model that hangs
or crashes the interpreter is recorded, not lost. Results: docs/figures/coverage/results.json
and the table in docs/coverage.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.broad_zoo import (SELECTION_FILE, STEPS, ZooModel, all_models, result_to_json, run_model,  # noqa: E402
                               select_timm)

OUT_JSON = ROOT / "docs" / "figures" / "coverage" / "results.json"
OUT_MD = ROOT / "docs" / "coverage.md"


def _worker(m: ZooModel, q) -> None:
    import torch
    torch.set_num_threads(1)
    final = run_model(m, report=lambda r: q.put(("partial", result_to_json(r))))
    q.put(("done", result_to_json(final)))


def run_one(m: ZooModel, timeout: float) -> dict:
    """One model in its own process. Past ``timeout`` seconds in all, the steps that finished keep
    their results and the others are ``timeout``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(m, q))
    t = time.perf_counter()
    p.start()
    res = {"model": str(m), "has_attention": False, "steps": {}}
    why = ""
    while not why:
        left = timeout - (time.perf_counter() - t)
        try:
            kind, res = q.get(timeout=max(0.01, min(5.0, left)))
            if kind == "done":
                break
        except queue.Empty:
            if not p.is_alive() and q.empty():
                why = f"the model's process died (exit code {p.exitcode}; out of memory?)"
            elif left <= 0:
                why = f"no result within {timeout:.0f} s for the model's steps (killed)"
    if why:  # the steps that finished keep their results
        res["steps"] = {s: res["steps"].get(s) or {"status": "timeout", "cause": why,
                                                   "seconds": time.perf_counter() - t} for s in STEPS}
    p.join(5)
    if p.is_alive():
        p.kill()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="names (timm) or torchvision:NAME / hf:NAME; default all")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--select", action="store_true", help="re-apply the selection rule and save it")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/")
    ap.add_argument("--resume", action="store_true", help="skip the models results.json already holds")
    args = ap.parse_args(argv)
    if args.select:
        import timm
        models = select_timm(print)
        SELECTION_FILE.write_text(json.dumps({"timm": timm.__version__, "models": [asdict(m) for m in models]},
                                             indent=1) + "\n")
    models = all_models()
    if args.models:
        models = [m for m in models if str(m) in args.models]
    if args.resume and OUT_JSON.exists():
        done = json.loads(OUT_JSON.read_text())
        models = [m for m in models if str(m) not in done]
    models.sort(key=lambda m: m.params)  # the small ones first
    from concurrent.futures import ThreadPoolExecutor
    results = {}
    with ThreadPoolExecutor(args.workers) as ex:
        for r in ex.map(lambda m: run_one(m, args.timeout), models):
            results[r["model"]] = r
            if not args.no_write:
                _save(results, bool(args.models) or args.resume)
            print(r["model"], " ".join(f"{s}={v['status']}" for s, v in r["steps"].items()), flush=True)
    if not args.no_write:
        write_markdown(json.loads(OUT_JSON.read_text()), all_models())
    return 0


def _pct(n: int, d: int) -> str:
    return f"{n}/{d} ({100 * n / d:.0f} %)" if d else "0/0"


def summary(results: dict, models: list[ZooModel]) -> dict[str, tuple[int, int]]:
    """``{row: (ok, total)}`` over the models of ``models`` that have results."""
    rows = [results[str(m)] for m in models if str(m) in results]
    plain = [r for r in rows if not r["has_attention"]]
    ok = lambda r, s: r["steps"].get(s, {}).get("status") == "ok"  # noqa: E731
    either = lambda r: ok(r, "pipeline_remove_skips") or ok(r, "pipeline_normalize_sums")  # noqa: E731
    out = {s: (sum(ok(r, s) for r in rows), len(rows)) for s in STEPS}
    out["pipeline (either) without self-attention"] = (sum(either(r) for r in plain), len(plain))
    out["pipeline (either) with self-attention"] = (sum(either(r) for r in rows if r["has_attention"]),
                                                    sum(r["has_attention"] for r in rows))
    out["models with a crash (an exception that is not a NetsurgeonError)"] = (
        sum(any(v["status"] == "crash" for v in r["steps"].values()) for r in rows), len(rows))
    out["models with a wrong result (a step completed, its check failed)"] = (
        sum(any(v["status"] == "wrong" for v in r["steps"].values()) for r in rows), len(rows))
    out["models that timed out"] = (sum(any(v["status"] == "timeout" for v in r["steps"].values()) for r in rows),
                                    len(rows))
    return out


def write_markdown(results: dict, models: list[ZooModel]) -> None:
    """docs/coverage.md: the summary and the per-model table, from results.json."""
    head = ["model", "attn", *STEPS]
    lines = ["# Coverage of the broad zoo", "",
             "Written by `python benchmarks/zoo_coverage.py` (do not edit by hand); raw results in",
             "`docs/figures/coverage/results.json`. The timm models are chosen by the rule in",
             "`benchmarks/harness/broad_zoo.py` (the smallest model of every timm module and of a second family",
             "in it, by parameter count), plus five torchvision and three Hugging Face models. Each step is",
             "`ok`, `refused` (a `NetsurgeonError`, its cause below), `crash` (any other exception), `wrong`",
             "(it completed and its check failed).", "",
             "`pipeline_*` is `strip_bn(mode=remove)`, `remove_skips` or `normalize_sums`, `maxpool_to_avgpool`,",
             "`input_norm`, `orthogonal_init`, `tat` (or `dks` where TAT cannot shape an activation: kinks, relu²),",
             "then the conditions recomputed from the result (`verify_shaping`). The `normalize_sums` variant",
             "runs only where the `remove_skips` one did not complete (`skipped` otherwise); the goal counts",
             "a model when either completes. `timeout`: a step not finished when the model's time (all its",
             "steps together) ran out, or its process died. On models with self-attention the pipeline also",
             "removes LayerNorm/RMSNorm (`remove_norms`, before the middle pass) and shapes every self-attention",
             "block (`attention_shaping`, E-SPA, after `orthogonal_init`), and the check adds `verify_attention`:",
             "each shaped block's query is exactly zero on the input and its matrix carries the schedule's token",
             "kernel to the next (A Σ Aᵀ = Σ_l). A model whose softmax is not self-attention (split attention,",
             "squeeze-excite softmax) gets the plain pipeline's steps with the attention pass reporting none.",
             "Models that take any input size run at 64 px (112 px where 64 fails: patch sizes 14 and 16);",
             "a model is judged to have self-attention from its graph, or from its modules if it does not trace.",
             "",
             "## Summary", "", "| step | ok |", "|---|---|"]
    for k, (n, d) in summary(results, models).items():
        lines.append(f"| {k} | {_pct(n, d)} |")
    lines += ["", "## Per model", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    causes: list[str] = []
    for m in models:
        r = results.get(str(m))
        if r is None:
            lines.append(f"| {m} | | " + " | ".join("not run" for _ in STEPS) + " |")
            continue
        cells = []
        for s in STEPS:
            st = r["steps"].get(s, {"status": "not run", "cause": ""})
            if st["status"] in ("refused", "crash", "wrong", "timeout"):
                causes.append(f"- **{m}**, {s}: {st['status']}: {st['cause'].replace('|', '/')}")
                cells.append(f"{st['status']} [{len(causes)}]")
            else:
                cells.append(st["status"])
        lines.append(f"| {m} | {'yes' if r['has_attention'] else ''} | " + " | ".join(cells) + " |")
    lines += ["", "## Causes", "", *[f"{i + 1}. {c[2:]}" for i, c in enumerate(causes)], ""]
    OUT_MD.write_text("\n".join(lines))


def _save(results: dict, merge: bool) -> None:
    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() and merge else {}
    old.update(results)
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
