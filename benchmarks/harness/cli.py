"""What every benchmark script shares: the machine record, the torch thread count, the sweep options."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

__all__ = ["environment", "torch_threads", "log", "new_parser", "add_output_args", "output_paths", "command_line",
           "add_sweep_args", "finish_sweep_args"]


def environment(threads: int) -> dict[str, Any]:
    """The machine facts a benchmark record states: CPU model and count, torch threads and
    version, Python version, and the process's nice value."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "nice": os.nice(0) if hasattr(os, "nice") else None}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (None: unchanged), then restore the old value.

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def log(message: str) -> None:
    """Progress line of a benchmark run, on stderr (stdout carries the Markdown)."""
    print(message, file=sys.stderr, flush=True)


def new_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its description is the first paragraph of ``doc`` (the
    script's docstring), kept as written."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_args(p: argparse.ArgumentParser, out_dir: Path, md_name: str, threads: int = 1, why: str = "") -> None:
    """``--threads`` (default ``threads``; ``why`` follows the default in the help), ``--out-dir``
    (default ``out_dir``) and ``--md-out`` (default ``OUT_DIR/md_name``)."""
    p.add_argument("--threads", type=int, default=threads, help=f"torch.set_num_threads (default {threads}{why})")
    p.add_argument("--out-dir", type=Path, default=out_dir, help=f"output directory (default {out_dir})")
    p.add_argument("--md-out", type=Path, help=f"Markdown file (default OUT_DIR/{md_name})")


def output_paths(args: argparse.Namespace, md_name: str) -> tuple[Path, Path]:
    """``(out_dir, md_path)`` of :func:`add_output_args`'s options; ``out_dir`` is created."""
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir, args.md_out or out_dir / md_name


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as run, for the record: ``python benchmarks/<script>`` and the arguments
    (``argv``, or ``sys.argv[1:]`` when None)."""
    given = list(sys.argv[1:] if argv is None else argv)
    return f"python benchmarks/{script}" + (" " + " ".join(given) if given else "")


def add_sweep_args(p: argparse.ArgumentParser, configs: Sequence[str], *, steps: int, lrs: Sequence[float],
                   batch_size: int = 64, eval_every: int = 50, train_subset: str = "all", test_subset: str = "all",
                   quick: str = "4 steps, batch 16, 128 train images, 1 seed, 1 lr") -> None:
    """The options every learning-rate-sweep benchmark shares (``--quick``, ``--configs``, the
    budget, the seeds and the data subsets); the defaults given here only fill the help texts,
    the scripts' budgets hold the values."""
    p.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
    p.add_argument("--configs", nargs="+", choices=list(configs), default=list(configs),
                   help="configurations to run")
    p.add_argument("--steps", type=int, help=f"training steps (default {steps})")
    p.add_argument("--batch-size", type=int, help=f"default {batch_size}")
    p.add_argument("--lrs", type=float, nargs="+", help=f"lr grid (default {' '.join(map(str, lrs))})")
    p.add_argument("--optimizer", choices=("sgd", "kfac"), default="sgd",
                   help="sgd (momentum 0.9; default) or kfac (netsurgeon's K-FAC, harness.optimizers.KFAC_OPTIONS)")
    p.add_argument("--kfac-damping", type=float, default=1e-2, help="K-FAC's damping (default 0.01)")
    p.add_argument("--eval-every", type=int, help=f"test-set evaluation interval in steps (default {eval_every})")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default 3; --quick 1)")
    p.add_argument("--select-seeds", type=int, default=1, help="seeds used in the lr sweep (default 1)")
    p.add_argument("--train-subset", type=int,
                   help=f"fixed random subset of the training images (default {train_subset})")
    p.add_argument("--test-subset", type=int, help=f"fixed random subset of the test images (default {test_subset})")


def finish_sweep_args(p: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None, script: str,
                      base: Any, **extra: Any) -> argparse.Namespace:
    """Complete the options of :func:`add_sweep_args`: the seed counts (``--quick``: 1), the
    command line as run (``args.command``), and ``args.budget``, the dataclass ``base`` with
    every given option (and ``extra`` override that is not None) replacing its field."""
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.select_seeds = min(args.select_seeds, args.seeds)
    if args.seeds < 1 or args.select_seeds < 1:
        p.error("need --seeds >= 1 and --select-seeds >= 1")
    args.command = command_line(script, argv)
    if not args.kfac_damping > 0:
        p.error(f"--kfac-damping must be > 0, got {args.kfac_damping:g}")
    from .optimizers import optimizer_spec
    args.optimizer_spec = optimizer_spec(args.optimizer, damping=args.kfac_damping if args.optimizer == "kfac" else None)
    args.optimizer_text = ("SGD (momentum 0.9)" if args.optimizer == "sgd" else
                           f"K-FAC (damping {args.kfac_damping:g}, harness.optimizers.KFAC_OPTIONS)")
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lrs": tuple(args.lrs) if args.lrs else None,
                 "eval_every": args.eval_every, "train_subset": args.train_subset, "test_subset": args.test_subset,
                 **extra}
    args.budget = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    return args
