"""How long netsurgeon's trace, topology view and strip_bn take, and how that scales.

Table 1 times, for a few timm models (random weights, ``pretrained=False``):

* ``trace``     -- ``netsurgeon.trace(model)`` (it traces twice: train and eval mode);
* ``topology``  -- ``netsurgeon.topology(gm)`` on a fresh deep copy of the traced module;
* ``strip_bn``  -- ``apply_pass(gm, make_pass("strip_bn"))`` on a fresh deep copy
  (the pass rebuilds the topology itself, folds, then lints/DCEs/recompiles);
* ``total``     -- trace + topology + strip_bn of the same repeat.

Every deep copy is made outside the timed region. Each figure is the median of
``--repeats`` runs after one untimed warm-up run per model (the first call into torch
and fx pays one-off costs: lazy imports, kernel dispatch caches).

Table 2 splits strip_bn into its parts (measured in separate runs, by wrapping the
functions strip_bn calls): the topology rebuild, the batch-norm arithmetic (scale/shift
and the in-place multiply of every conv/linear weight), ``cleanup`` (lint, DCE,
recompile), and the rest (graph edits, pass bookkeeping).

Table 3 ("cost vs number of nodes") builds plain deep stacks with 16 channels, so that
weight arithmetic is negligible, at several depths, and reports microseconds per graph
node; a per-node cost that stays flat as depth grows (log-log exponent near 1) means
cost linear in the number of nodes.

Usage:
    python benchmarks/transform_speed.py                       # full run, prints Markdown
    python benchmarks/transform_speed.py --out /tmp/speed.md   # also writes it to a file
    python benchmarks/transform_speed.py --quick               # smoke run: 1 repeat, 2 models
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Iterator

import torch
import torch.nn as nn

import netsurgeon
import netsurgeon.passes.strip_bn as strip_bn_mod
import netsurgeon.pipeline as pipeline_mod
from netsurgeon.passes import make_pass
from netsurgeon.pipeline import apply_pass

try:
    import timm
except ImportError:  # pragma: no cover - timm is a dependency of the benchmark only
    timm = None

MODELS = ["resnet18", "resnet50", "resnet152", "efficientnet_b0", "vit_small_patch16_224", "convnext_tiny"]
QUICK_MODELS = ["resnet18", "resnet50"]
DEPTHS = [50, 100, 200, 400, 800]
QUICK_DEPTHS = [10, 20, 40]
GOAL_MODEL = "resnet152"
GOAL_RATIO = 2.0


# ---------------------------------------------------------------- timing helpers
def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _strip_bn(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    return apply_pass(gm, make_pass("strip_bn"))


def _one_run(model: nn.Module) -> dict[str, float]:
    """trace, topology (fresh copy), strip_bn (fresh copy) once; copies are not timed."""
    t_trace, gm = _timed(lambda: netsurgeon.trace(model))
    g1 = copy.deepcopy(gm)
    t_topo, _ = _timed(lambda: netsurgeon.topology(g1))
    g2 = copy.deepcopy(gm)
    t_strip, _ = _timed(lambda: _strip_bn(g2))
    del gm
    return {"trace": t_trace, "topology": t_topo, "strip_bn": t_strip, "total": t_trace + t_topo + t_strip}


@contextlib.contextmanager
def _instrumented(acc: dict[str, float]) -> Iterator[None]:
    """Wrap the functions strip_bn calls so their time adds up in ``acc``."""

    def wrap(module, attr: str, key: str):
        orig = getattr(module, attr)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - start

        setattr(module, attr, wrapper)
        return module, attr, orig

    saved = [wrap(strip_bn_mod, "Topology", "topology"),
             wrap(strip_bn_mod, "_bn_scale_shift", "arithmetic"),
             wrap(strip_bn_mod, "_fold_backward", "arithmetic"),
             wrap(strip_bn_mod, "_fold_forward", "arithmetic"),
             wrap(pipeline_mod, "cleanup", "cleanup")]
    try:
        yield
    finally:
        for module, attr, orig in saved:
            setattr(module, attr, orig)


def _strip_bn_split(gm: torch.fx.GraphModule) -> dict[str, float]:
    g = copy.deepcopy(gm)
    acc: dict[str, float] = {}
    with _instrumented(acc):
        total, out = _timed(lambda: _strip_bn(g))
    rec = netsurgeon.report(out).passes[-1]
    split = {"strip_bn": total, "topology": acc.get("topology", 0.0), "arithmetic": acc.get("arithmetic", 0.0),
             "cleanup": acc.get("cleanup", 0.0)}
    split["rest"] = total - split["topology"] - split["arithmetic"] - split["cleanup"]
    split["changes"] = len(rec.changes)
    split["folded"] = sum("folded into" in c.what for c in rec.changes)
    return split


def _median_runs(model: nn.Module, repeats: int) -> dict[str, float]:
    _one_run(model)  # warm-up, not counted
    runs = [_one_run(model) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _median_split(model: nn.Module, repeats: int) -> dict[str, float]:
    gm = netsurgeon.trace(model)
    runs = [_strip_bn_split(gm) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# ---------------------------------------------------------------- models
def _timm_model(name: str) -> nn.Module:
    if timm is None:
        raise SystemExit("timm is needed for the model table: pip install timm")
    return timm.create_model(name, pretrained=False)


def _chain(depth: int) -> nn.Module:
    """``depth`` x (Conv2d(16, 16, 3, padding=1) + BatchNorm2d + ReLU)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _resnet_stack(depth: int) -> nn.Module:
    """``depth // 2`` timm ResNet BasicBlocks at 16 channels (``depth`` conv layers, identity shortcuts)."""
    from timm.models.resnet import BasicBlock

    return nn.Sequential(*[BasicBlock(16, 16) for _ in range(max(1, depth // 2))])


FAMILIES: dict[str, Callable[[int], nn.Module]] = {
    "conv-bn-relu chain": _chain,
    "resnet BasicBlock stack": _resnet_stack,
}


# ---------------------------------------------------------------- formatting
def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _s(x: float) -> str:
    return f"{x:.3f}"


def _x(x: float) -> str:
    return f"{x:.2f}x"


def _loglog_exponent(nodes: list[int], secs: list[float]) -> float:
    """Least-squares slope of log(time) against log(nodes): 1.0 is linear."""
    xs, ys = [math.log(n) for n in nodes], [math.log(max(s, 1e-12)) for s in secs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def machine_facts() -> list[str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        affinity = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    import networkx

    return [
        f"- CPU: {cpu}; os.cpu_count() = {os.cpu_count()}, usable by this process = {affinity}",
        f"- torch threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"timm {getattr(timm, '__version__', 'n/a')}, networkx {networkx.__version__}, "
        f"netsurgeon {netsurgeon.__version__}",
        f"- platform: {platform.platform()}",
        "- load average at start (1/5/15 min): " + (" / ".join(f"{x:.2f}" for x in load) if load else "n/a"),
    ]


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median reported "
                                                               "(default 5; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--out", default=None, help="also write the Markdown report to this file")
    ap.add_argument("--quick", action="store_true", help="fast smoke run: 1 repeat, 2 models, small depths")
    ap.add_argument("--models", nargs="+", default=None, help=f"timm model names (default: {' '.join(MODELS)})")
    ap.add_argument("--depths", nargs="+", type=int, default=None,
                    help=f"conv-layer counts for the node-scaling table (default: {' '.join(map(str, DEPTHS))})")
    args = ap.parse_args(argv)

    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if repeats < 1:
        ap.error("--repeats must be at least 1")
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    depths = args.depths or (QUICK_DEPTHS if args.quick else DEPTHS)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    out: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        out.append(text)

    cmd = "python benchmarks/transform_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    emit("# netsurgeon transform speed")
    emit()
    emit(f"Command: `{cmd.strip()}`  ")
    emit(f"Repeats: median of {repeats} timed run(s) after 1 warm-up run; time.perf_counter; "
         f"deep copies made outside the timed regions.")
    emit()
    emit("Machine:")
    emit()
    for line in machine_facts():
        emit(line)
    emit()

    # ---- table 1: models
    results: dict[str, dict[str, float]] = {}
    splits: dict[str, dict[str, float]] = {}
    info: dict[str, tuple[int, float]] = {}
    for name in models:
        model = _timm_model(name).eval()
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        n_nodes = len(netsurgeon.trace(model).graph.nodes)
        info[name] = (n_nodes, n_params)
        results[name] = _median_runs(model, repeats)
        splits[name] = _median_split(model, repeats)
        del model
        gc.collect()
        print(f"  [{name} done]", file=sys.stderr, flush=True)

    emit("## Time per model (seconds, and ratio to the trace time)")
    emit()
    rows = []
    for name in models:
        r, (n_nodes, n_params) = results[name], info[name]
        t = r["trace"]
        rows.append([name, str(n_nodes), f"{n_params:.1f}", _s(t), f"{_s(r['topology'])} ({_x(r['topology'] / t)})",
                     f"{_s(r['strip_bn'])} ({_x(r['strip_bn'] / t)})", f"{_s(r['total'])} ({_x(r['total'] / t)})",
                     _x((r["topology"] + r["strip_bn"]) / t)])
    emit(_table(["model", "nodes", "params (M)", "trace s", "topology s (/trace)", "strip_bn s (/trace)",
                 "total s (/trace)", "(topology+strip_bn)/trace"], rows))
    emit()

    emit("## Where strip_bn spends its time (seconds, separate instrumented runs)")
    emit()
    rows = []
    for name in models:
        sp = splits[name]
        rows.append([name, str(int(sp["folded"])), str(int(sp["changes"])), _s(sp["strip_bn"]), _s(sp["topology"]),
                     _s(sp["arithmetic"]), _s(sp["cleanup"]), _s(sp["rest"])])
    emit(_table(["model", "BN folded", "BN changed", "strip_bn s", "topology rebuild s", "BN arithmetic s",
                 "cleanup s", "rest s"], rows))
    emit()
    emit("`BN arithmetic` = scale/shift in float64 + the in-place multiply of every folded conv/linear weight; "
         "`cleanup` = lint + dead-code elimination + recompile (apply_pass); `rest` = graph edits and bookkeeping.")
    emit()

    # ---- table 3: scaling
    emit("## Cost vs number of nodes (microseconds per graph node)")
    emit()
    rows = []
    exponents = []
    for family, build in FAMILIES.items():
        per: dict[str, list[float]] = {"trace": [], "topology": [], "strip_bn": [], "total": []}
        nodes_list: list[int] = []
        for depth in depths:
            model = build(depth).eval()
            n_nodes = len(netsurgeon.trace(model).graph.nodes)
            r = _median_runs(model, repeats)
            nodes_list.append(n_nodes)
            for k in per:
                per[k].append(r[k])
            rows.append([family, str(depth), str(n_nodes)] + [f"{r[k] / n_nodes * 1e6:.0f}" for k in per]
                        + [f"{r['total']:.3f}"])
            print(f"  [{family} depth {depth} done]", file=sys.stderr, flush=True)
        if len(depths) > 1:
            exps = {k: _loglog_exponent(nodes_list, per[k]) for k in per}
            growth = {k: (per[k][-1] / nodes_list[-1]) / (per[k][0] / nodes_list[0]) for k in per}
            exponents.append((family, nodes_list, exps, growth))
    emit(_table(["stack", "conv layers", "nodes", "trace us/node", "topology us/node", "strip_bn us/node",
                 "total us/node", "total s"], rows))
    emit()
    if exponents:
        emit("Linearity: log-log exponent of time vs nodes (1.00 = linear), and per-node cost at the largest depth "
             "divided by per-node cost at the smallest:")
        emit()
        rows = [[fam, f"{nl[0]}-{nl[-1]}"] + [f"{exps[k]:.2f} ({growth[k]:.2f}x)" for k in exps]
                for fam, nl, exps, growth in exponents]
        emit(_table(["stack", "nodes", "trace", "topology", "strip_bn", "total"], rows))
        emit()

    # ---- goal
    emit("## Goal check")
    emit()
    if GOAL_MODEL in results:
        r = results[GOAL_MODEL]
        ratio = (r["topology"] + r["strip_bn"]) / r["trace"]
        verdict = "MET" if ratio <= GOAL_RATIO else "MISSED"
        emit(f"- {GOAL_MODEL}: (topology + strip_bn) / trace = {ratio:.2f}x (goal <= {GOAL_RATIO:.0f}x): **{verdict}**")
        sp = splits[GOAL_MODEL]
        graph_only = r["topology"] + sp["strip_bn"] - sp["arithmetic"]
        emit(f"- {GOAL_MODEL}: without strip_bn's BN arithmetic (instrumented runs: strip_bn {sp['strip_bn']:.3f} s, "
             f"of which arithmetic {sp['arithmetic']:.3f} s): (topology + strip_bn - arithmetic) / trace = "
             f"{graph_only / r['trace']:.2f}x")
    else:
        emit(f"- {GOAL_MODEL} not measured in this run (add it with --models)")
    for fam, nl, exps, growth in exponents:
        worst = max(exps, key=lambda k: exps[k])
        emit(f"- {fam}, {nl[0]}-{nl[-1]} nodes: exponents " + ", ".join(f"{k} {v:.2f}" for k, v in exps.items())
             + f" (highest: {worst})")
    emit()

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")
        print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
