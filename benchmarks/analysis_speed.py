"""How long ``netsurgeon.analyze`` takes, and how that scales (issue 3, §5).

Table 1, timm models (random weights) and a 1000-layer MLP:

* ``trace``    -- ``netsurgeon.trace(model)``;
* ``analyze``  -- ``netsurgeon.analyze(gm)`` on the traced module (default options: 201
  input cosines, timm's default input size for the nodes that must be measured);
* ``measure``  -- the part of ``analyze`` spent measuring nodes without a kernel map
  (max pooling: locally on Gaussian fields; attention products: by running the network),
  timed by wrapping ``engine._measure_locally`` and ``engine._measure_nodes``;
* ``propagate`` -- analyze minus measure (the rules of docs/theory.md §3).

Table 2, MLPs ``Linear(256, 256) + act`` at depths 250, 500, 1000, 2000: analysis time
per node, for tanh (2-D Gauss–Hermite kernel maps), ReLU (closed form) and GELU.

Table 3, ``LocalMaps(name).c_map(grid)`` on a grid of 201 cosines in [-1, 1] (the accurate
local maps, not analyze's ``FAST`` rule) for six activations: smooth (tanh, gelu), kinked
(elu by quadrature; hardswish and softshrink, polynomial between their kinks, by the closed
form of ``netsurgeon.kernels.polynomial``) and slowly decaying (softsign). Goal: under 100 ms
per grid. This is the timing that tests/test_local_maps.py used to assert;
the test now counts activation calls instead (a grid is evaluated in one vectorized pass).

Table 4, every model of ``tests/zoo.py`` (issue 16 §6) built as the zoo builds it (timm,
random weights, the case's kwargs and input size, batch 2): ``netsurgeon.trace(model, x)``
and ``netsurgeon.analyze(gm, x)`` with the same ``x``, their ratio, and whether it is at most
3x (the goal). ``--zoo`` runs only this table.

Each figure is the median of ``--repeats`` runs after one untimed warm-up.

Usage:
    python benchmarks/analysis_speed.py                      # full run, prints Markdown
    python benchmarks/analysis_speed.py --out /tmp/a.md      # also writes it to a file
    python benchmarks/analysis_speed.py --quick              # smoke run
    python benchmarks/analysis_speed.py --threads 1 --cmap-only   # Table 3 only (seconds)
    python benchmarks/analysis_speed.py --threads 1 --zoo --repeats 3   # Table 4 only (minutes)
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

import netsurgeon
from harness import publish
from netsurgeon.analysis import engine
from netsurgeon.kernels import LocalMaps

MODELS = ["resnet50", "resnet152", "vit_small_patch16_224"]
DEPTHS = [250, 500, 1000, 2000]
ACTS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
GOAL_MLP_S = 2.0
GOAL_RATIO = 2.0
CMAP_ACTS = ["tanh", "gelu", "elu", "hardswish", "softshrink", "softsign"]
CMAP_POINTS = 201
GOAL_CMAP_MS = 100.0
GOAL_ZOO_RATIO = 3.0
ZOO_FILE = Path(__file__).resolve().parents[1] / "tests" / "zoo.py"


class _MeasureTimer:
    """Wraps ``engine._measure_nodes`` (running the network) and ``engine._measure_locally``
    (Gaussian fields through short chains) to add up the time spent measuring."""

    _NAMES = ("_measure_nodes", "_measure_locally")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._orig = {n: getattr(engine, n) for n in self._NAMES}

    def __enter__(self) -> "_MeasureTimer":
        for name, fn in self._orig.items():
            setattr(engine, name, self._timed(fn))
        return self

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def __exit__(self, *exc) -> None:
        for name, fn in self._orig.items():
            setattr(engine, name, fn)


def mlp(depth: int, act: Callable[[], nn.Module], width: int = 256) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), act())])


def _time_once(model: nn.Module) -> dict[str, float]:
    gc.collect()
    t0 = time.perf_counter()
    gm = netsurgeon.trace(model)
    t1 = time.perf_counter()
    with _MeasureTimer() as mt:
        a = netsurgeon.analyze(gm)
    t2 = time.perf_counter()
    statuses = [k.status for k in a.kernels.values()]
    return {"trace": t1 - t0, "analyze": t2 - t1, "measure": mt.seconds, "nodes": len(gm.graph.nodes),
            "measured": statuses.count("unsupported")}


def time_model(model: nn.Module, repeats: int) -> dict[str, float]:
    _time_once(model)  # warm-up
    runs = [_time_once(model) for _ in range(repeats)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["propagate"] = out["analyze"] - out["measure"]
    return out


def time_c_maps(repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds of ``LocalMaps(name).c_map`` on the 201-cosine grid, per activation."""
    grid = np.linspace(-1.0, 1.0, CMAP_POINTS)
    out = {}
    for name in CMAP_ACTS:
        maps = LocalMaps(name)
        maps.c_map(grid)  # warm-up; also computes the cached normalizer Q(1)
        runs = []
        for _ in range(repeats):
            gc.collect()
            start = time.perf_counter()
            maps.c_map(grid)
            runs.append(time.perf_counter() - start)
        out[name] = (statistics.median(runs), min(runs))
    return out


def c_map_report(repeats: int) -> tuple[list[str], str]:
    """Table 3 and its goal line."""
    times = time_c_maps(repeats)
    lines = [f"## C map on a grid of {CMAP_POINTS} cosines (`LocalMaps(name).c_map`, accurate rule)", "",
             "| activation | median ms | min ms |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {1e3 * med:.1f} | {1e3 * low:.1f} |" for name, (med, low) in times.items()]
    worst_name, (worst, _) = max(times.items(), key=lambda kv: kv[1][0])
    met = "MET" if 1e3 * worst < GOAL_CMAP_MS else "NOT MET"
    goal = (f"- C map on {CMAP_POINTS} cosines: slowest median {1e3 * worst:.1f} ms ({worst_name}) "
            f"(goal < {GOAL_CMAP_MS:.0f} ms for each activation): **{met}**")
    return lines, goal


def _header(repeats: int) -> list[str]:
    return ["# analysis_speed", "",
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
            f"cpus {os.cpu_count()}, load average at start {os.getloadavg()[0]:.2f}; median of {repeats} runs", ""]


def run_c_maps(repeats: int) -> str:
    table, goal = c_map_report(repeats)
    return "\n".join(_header(repeats) + table + ["", "## Goal check", "", goal]) + "\n"


def _exponent(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def run(models: list[str], depths: list[int], repeats: int, zoo_models: list[str] | None = None,
        zoo: bool = True) -> str:
    import timm

    lines = _header(repeats) + [
             "| model | nodes | measured nodes | trace s | analyze s | propagate s | measure s | analyze/trace "
             "| propagate/trace |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    results: dict[str, dict[str, float]] = {}
    for name in models:
        model = timm.create_model(name, pretrained=False).eval()
        results[name] = r = time_model(model, repeats)
        lines.append(f"| {name} | {r['nodes']:.0f} | {r['measured']:.0f} | {r['trace']:.3f} | {r['analyze']:.3f} | "
                     f"{r['propagate']:.3f} | {r['measure']:.3f} | {r['analyze'] / r['trace']:.2f}x | "
                     f"{r['propagate'] / r['trace']:.2f}x |")
    goal_mlp = time_model(mlp(1000, nn.Tanh), repeats)
    lines.append(f"| MLP 1000 x (Linear(256,256) + Tanh) | {goal_mlp['nodes']:.0f} | {goal_mlp['measured']:.0f} | "
                 f"{goal_mlp['trace']:.3f} | {goal_mlp['analyze']:.3f} | {goal_mlp['propagate']:.3f} | "
                 f"{goal_mlp['measure']:.3f} | {goal_mlp['analyze'] / goal_mlp['trace']:.2f}x | "
                 f"{goal_mlp['propagate'] / goal_mlp['trace']:.2f}x |")
    lines += ["", "## Cost vs depth (MLP, Linear(256, 256) + activation)", "",
              "| activation | depth | nodes | trace s | analyze s | analyze us/node |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    exps = []
    for act_name, act in ACTS.items():
        ns, ts = [], []
        for d in depths:
            r = time_model(mlp(d, act), repeats)
            ns.append(r["nodes"])
            ts.append(r["analyze"])
            lines.append(f"| {act_name} | {d} | {r['nodes']:.0f} | {r['trace']:.3f} | {r['analyze']:.3f} | "
                         f"{1e6 * r['analyze'] / r['nodes']:.0f} |")
        if len(set(ns)) >= 2:
            exps.append((act_name, _exponent(ns, ts), ts[-1] / ns[-1] / (ts[0] / ns[0])))
    if exps:
        lines += ["", "Log-log exponent of analyze time against node count (1.00 = linear), and per-node cost at "
                  "the largest depth over the smallest:", ""]
        lines += [f"- {a}: exponent {e:.2f}, per-node ratio {r:.2f}x" for a, e, r in exps]
    else:
        lines += ["", "One depth only: no exponent (give `--depths` at least two values)."]
    cmap_table, cmap_goal = c_map_report(repeats)
    lines += [""] + cmap_table
    zoo_table, zoo_goal = zoo_report(repeats, zoo_models) if zoo else ([], "")
    if zoo:
        lines += [""] + zoo_table
    total_mlp = goal_mlp["trace"] + goal_mlp["analyze"]
    lines += ["", "## Goal check", "",
              f"- 1000-layer tanh MLP: analyze {goal_mlp['analyze']:.3f} s, trace + analyze {total_mlp:.3f} s "
              f"(goal < {GOAL_MLP_S} s): **{'MET' if total_mlp < GOAL_MLP_S else 'NOT MET'}**"]
    if "resnet152" in results:
        r = results["resnet152"]
        lines.append(f"- resnet152: analyze / trace = {r['analyze'] / r['trace']:.2f}x (goal <= {GOAL_RATIO}x): "
                     f"**{'MET' if r['analyze'] / r['trace'] <= GOAL_RATIO else 'NOT MET'}**; without measuring "
                     f"its max-pool node (propagation only) {r['propagate'] / r['trace']:.2f}x")
    lines.append(cmap_goal)
    if zoo:
        lines.append(zoo_goal)
    return "\n".join(lines) + "\n"


def zoo_cases(names: list[str] | None = None) -> list[Any]:
    """The cases of ``tests/zoo.py`` (loaded from its file: the tests are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("netsurgeon_test_zoo", ZOO_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return [c for c in module.ZOO if not names or c.name in names]


def _time_zoo_once(model: nn.Module, x: torch.Tensor, leaves: tuple[str, ...]) -> dict[str, float]:
    gc.collect()
    t0 = time.perf_counter()
    gm = netsurgeon.trace(model, x, leaf_modules=leaves)
    t1 = time.perf_counter()
    with _MeasureTimer() as mt:
        a = netsurgeon.analyze(gm, x)
    t2 = time.perf_counter()
    statuses = [k.reason for k in a.kernels.values() if k.status == "unsupported"]
    return {"trace": t1 - t0, "analyze": t2 - t1, "measure": mt.seconds, "nodes": len(gm.graph.nodes),
            "measured": sum("measured" in r for r in statuses)}


def zoo_report(repeats: int, names: list[str] | None = None) -> tuple[list[str], str]:
    """Table 4 and its goal line."""
    import timm

    lines = [f"## Every model of tests/zoo.py (input as the zoo builds it, batch 2; goal analyze <= "
             f"{GOAL_ZOO_RATIO:g}x trace)", "",
             "| model | input | nodes | measured nodes | trace s | analyze s | measure s | analyze/trace | "
             f"<= {GOAL_ZOO_RATIO:g}x |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    misses = []
    ratios = []
    for case in zoo_cases(names):
        model = timm.create_model(case.name, pretrained=False, **case.kwargs).eval()
        x = torch.randn(2, 3, case.size, case.size, generator=torch.Generator().manual_seed(1))
        _time_zoo_once(model, x, case.leaf_modules)  # warm-up
        runs = [_time_zoo_once(model, x, case.leaf_modules) for _ in range(repeats)]
        r = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        ratio = statistics.median(run["analyze"] / run["trace"] for run in runs)
        ratios.append(ratio)
        met = ratio <= GOAL_ZOO_RATIO
        if not met:
            misses.append(f"{case.name} ({ratio:.2f}x)")
        lines.append(f"| {case.name} | {case.size}px | {r['nodes']:.0f} | {r['measured']:.0f} | {r['trace']:.3f} | "
                     f"{r['analyze']:.3f} | {r['measure']:.3f} | {ratio:.2f}x | {'yes' if met else '**no**'} |")
        print(lines[-1], file=sys.stderr, flush=True)  # progress: the table takes minutes
    worst = max(ratios) if ratios else float("nan")
    goal = (f"- tests/zoo.py: {len(ratios) - len(misses)} of {len(ratios)} models analysed in at most "
            f"{GOAL_ZOO_RATIO:g}x their trace time (worst {worst:.2f}x): **{'MET' if not misses else 'NOT MET'}**"
            + (f"; over: {', '.join(misses)}" if misses else ""))
    return lines, goal


def run_zoo(repeats: int, names: list[str] | None = None) -> str:
    table, goal = zoo_report(repeats, names)
    return "\n".join(_header(repeats) + table + ["", "## Goal check", "", goal]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--depths", nargs="*", type=int, default=DEPTHS)
    p.add_argument("--quick", action="store_true", help="1 repeat, resnet50 only, depths 50 and 100")
    p.add_argument("--cmap-only", action="store_true", help=f"only the C-map table ({CMAP_POINTS}-cosine grid)")
    p.add_argument("--zoo", action="store_true", help="only the tests/zoo.py table (Table 4)")
    p.add_argument("--zoo-models", nargs="*", default=None, help="restrict Table 4 to these zoo models")
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.models, args.depths = 1, ["resnet50"], [50, 100]
    if args.cmap_only:
        report = run_c_maps(args.repeats)
    elif args.zoo:
        report = run_zoo(args.repeats, args.zoo_models)
    else:
        report = run(args.models, args.depths, args.repeats, args.zoo_models,
                     zoo=not args.quick or args.zoo_models is not None)  # --quick: no zoo unless named
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
