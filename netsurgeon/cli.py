"""The ``netsurgeon`` command line: ``convert``, ``inspect``, ``passes``.

Uses only the public API. Errors print one line and exit with status 2.

Example:
    $ netsurgeon convert resnet18 --passes strip_bn --out out/resnet18
    $ netsurgeon inspect resnet50
    $ netsurgeon passes
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import netsurgeon
from netsurgeon._fileio import write_atomic
from netsurgeon.errors import NetsurgeonError, PassOptionError
from netsurgeon.models import create_model, default_input_shape
from netsurgeon.passes import coerce_option, get_pass, list_passes
from netsurgeon.recipe import check_input_shape

__all__ = ["main", "build_parser"]


class _UsageError(NetsurgeonError):
    pass


def _progress(quiet: bool):
    start = time.perf_counter()

    def report(msg: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return report


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise _UsageError(f"malformed --input-shape {text!r}: expected comma-separated integers like 1,3,224,224") from None
    if not shape or any(v <= 0 for v in shape):
        raise _UsageError(f"malformed --input-shape {text!r}: every dimension must be a positive integer")
    return check_input_shape(shape, "--input-shape", _UsageError)


def _notice(message: str) -> None:
    """Things netsurgeon did on its own (recovering an interrupted output): said even with --quiet."""
    print(f"netsurgeon: note: {message}", file=sys.stderr, flush=True)


def _parse_passes(text: str, sets: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise _UsageError("--passes is empty: give a comma-separated list, e.g. --passes strip_bn")
    classes = {n: get_pass(n) for n in names}
    options: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in sets:
        key, eq, value = item.partition("=")
        pname, dot, opt = key.partition(".")
        if not eq or not dot or not pname or not opt:
            raise _UsageError(f"malformed --set {item!r}: expected PASS.OPTION=VALUE, e.g. strip_bn.mode=remove")
        if pname not in classes:
            raise _UsageError(f"--set {item!r} names pass {pname!r}, which is not in --passes ({', '.join(names)})")
        options[pname][opt] = coerce_option(classes[pname], opt, value)
    return [(n, options[n]) for n in names]


def _cmap_formats() -> set[str]:
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def _check_output_files(args: argparse.Namespace) -> dict[str, Path]:
    """Validate inspect's ``--cmap/--dot/--graphml`` paths before any work: an existing directory,
    no existing file unless ``--force``, distinct paths, and a plot format matplotlib writes."""
    outputs = {flag: Path(getattr(args, flag)) for flag in ("cmap", "dot", "graphml") if getattr(args, flag)}
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        where = f"--{flag} {str(path)!r}"
        if path.resolve() in seen:
            raise _UsageError(f"{where} is also given to --{seen[path.resolve()]}: give each output its own file")
        seen[path.resolve()] = flag
        if flag == "cmap":
            ext = path.suffix.lower().lstrip(".")
            formats = _cmap_formats()
            if ext not in formats:
                raise _UsageError(f"{where}: unsupported plot format {ext or '(no extension)'!r}; "
                                  f"use one of {', '.join(sorted(formats))} (e.g. cmap.png)")
        parent = path.absolute().parent
        if not parent.is_dir():
            raise _UsageError(f"{where}: directory {str(parent)!r} does not exist (create it first)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise _UsageError(f"{where}: directory {str(parent)!r} is not writable")
        if path.is_dir():
            raise _UsageError(f"{where} is a directory; give a file name")
        if path.exists() and not args.force:
            raise _UsageError(f"{where} exists; pass --force to overwrite it")
    return outputs


def _write_file_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write`` on a temporary file next to ``path`` (same extension, so writers that pick
    the format from it still do), give it the mode ``open`` would, and rename it onto ``path``."""
    try:
        write_atomic(path, write)
    except OSError as exc:
        raise _UsageError(f"cannot write {str(path)!r}: {exc}") from None


def _cmd_convert(args: argparse.Namespace) -> int:
    progress = _progress(args.quiet)
    passes = _parse_passes(args.passes, args.set or [])
    if os.path.isdir(args.model) and os.path.isfile(os.path.join(args.model, "recipe.json")):
        raise _UsageError(f"MODEL {args.model!r} is a conversion directory; convert starts from a timm name or "
                          f"package.module:factory (look at a conversion with: netsurgeon inspect {args.model})")
    gm = netsurgeon.convert(args.model, passes, args.out, checkpoint=args.checkpoint,
                            input_shape=_parse_shape(args.input_shape), seed=args.seed, force=args.force,
                            progress=progress, notice=_notice)
    rep = netsurgeon.report(gm)
    changes = sum(len(p.changes) for p in rep.passes)
    print(f"wrote {args.out}: {len(rep.passes)} pass(es), {changes} change(s), function {rep.preservation.text}")
    for p in rep.passes:
        print(f"  {p.name}: {len(p.changes)} changed, {len(p.skipped)} skipped")
    print(f"  details: {args.out}/report.md")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    progress = _progress(args.quiet)
    outputs = _check_output_files(args)
    if os.path.isdir(args.model):
        progress(f"loading conversion {args.model}")
        model = netsurgeon.load(args.model, trust_code=args.trust_code)
        shape = _parse_shape(args.input_shape) or model.meta["netsurgeon"]["recipe"].input_shape
    else:
        if args.trust_code:
            raise _UsageError("--trust-code applies to a conversion directory (MODEL is a timm name or your own "
                              "package.module:factory here, which is already yours to run)")
        progress(f"building model {args.model}")
        model = create_model(args.model)
        shape = _parse_shape(args.input_shape) or default_input_shape(model)
    example = None
    if shape is not None:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            example = (torch.randn(shape),)
    progress("tracing")
    gm = netsurgeon.trace(model)
    topo = netsurgeon.topology(gm, example)
    print(topo.summary())
    if args.blocks and topo.blocks:
        print(topo.format_blocks())
    if "cmap" in outputs:
        progress("analysing kernel maps")
        analysis = netsurgeon.analyze(gm, example, empirical_batch=2)
        table = analysis.table()
        print(table if len(table) <= 60 else analysis.summary())
        figure = analysis.plot_cmaps()
        _write_file_atomic(outputs["cmap"], lambda tmp: figure.savefig(tmp, dpi=120))
        print(f"wrote {args.cmap}")
    if "dot" in outputs:
        _write_file_atomic(outputs["dot"], topo.write_dot)
        print(f"wrote {args.dot}")
    if "graphml" in outputs:
        _write_file_atomic(outputs["graphml"], topo.to_graphml)
        print(f"wrote {args.graphml}")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    for name in list_passes():
        cls = get_pass(name)
        print(f"{name}: {cls.summary}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            print(f"    {name}.{f.name} (default {default!r}): {f.type}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netsurgeon", description="Surgery on neural networks.")
    parser.add_argument("--version", action="version", version=f"netsurgeon {netsurgeon.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="apply passes to a model (and checkpoint) and write the result")
    c.add_argument("model", help="timm model name (random init) or package.module:factory")
    c.add_argument("--checkpoint", help="state dict of the base model (.safetensors, .pt, .pth); never modified")
    c.add_argument("--passes", required=True, help="comma-separated pass names, e.g. strip_bn")
    c.add_argument("--set", action="append", metavar="PASS.OPTION=VALUE", help="set a pass option (repeatable)")
    c.add_argument("--out", required=True, help="output directory (model.safetensors, recipe.json, report.md)")
    c.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: the model's)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random init and example input (default 0)")
    c.add_argument("--force", action="store_true",
                   help="replace an existing output directory, atomically; refused if it holds anything besides "
                        "model.safetensors, recipe.json and report.md, or if it is the current directory or one "
                        "of its parents")
    c.add_argument("--quiet", action="store_true", help="no progress messages")
    c.add_argument("--verbose", action="store_true",
                   help="on an error, print every node a refusal names and, for an internal error, the traceback")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("inspect", help="print the topology summary of a model")
    i.add_argument("model", help="timm model name, package.module:factory, or a conversion directory "
                                 "(written by convert; read as data, see --trust-code)")
    i.add_argument("--trust-code", action="store_true",
                   help="allow a conversion directory whose recipe.json names a package.module:factory (imported "
                        "and called) or model arguments that read files; only for directories you trust")
    i.add_argument("--input-shape", help="example input shape for node shapes")
    i.add_argument("--blocks", action="store_true",
                   help="list every residual block and concatenation, one line each; long branches and merges "
                        "of many branches are shortened to their first and last entries (full paths: "
                        "netsurgeon.topology(model).blocks in Python)")
    i.add_argument("--cmap", help="analyse Q/C maps, print the per-node table (or a summary) and save "
                                  "the C-map plot to this file (.png, .pdf, .svg, ...: format from the extension)")
    i.add_argument("--dot", help="write the graph as Graphviz DOT to this file")
    i.add_argument("--graphml", help="write the graph as GraphML to this file")
    i.add_argument("--force", action="store_true",
                   help="overwrite existing --cmap/--dot/--graphml files (without it they are refused, as for "
                        "convert --out); files are written atomically and their directory must exist")
    i.add_argument("--quiet", action="store_true", help="no progress messages")
    i.add_argument("--verbose", action="store_true",
                   help="on an error, print every node a refusal names and, for an internal error, the traceback")
    i.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("passes", help="list the passes and their options")
    p.set_defaults(func=_cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    try:
        return args.func(args)
    except (NetsurgeonError, PassOptionError) as exc:
        print(f"netsurgeon: error: {_one_line(exc)}", file=sys.stderr)
        if verbose:
            for line in _details(exc):
                print(f"  {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netsurgeon: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("netsurgeon: error: out of memory; use a smaller --input-shape or a smaller model", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, or a resource torch reports as RuntimeError: one line, traceback on --verbose
        text = _one_line(exc)
        if "allocate" in text or isinstance(exc, getattr(__import__("torch"), "OutOfMemoryError", ())):
            print(f"netsurgeon: error: out of memory ({text}); use a smaller --input-shape or a smaller model",
                  file=sys.stderr)
            return 2
        if verbose:
            traceback.print_exc()
        print(f"netsurgeon: internal error: {type(exc).__name__}: {text} (a bug in netsurgeon or in the model; "
              f"rerun with --verbose for the traceback)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if len(lines) <= 1 else f"{lines[0]} (+{len(lines) - 1} more lines with --verbose)"


def _details(exc: BaseException) -> list[str]:
    """Everything behind the one line: the full message and the nodes a refusal names."""
    seen: list[str] = str(exc).splitlines()[1:]
    cause: BaseException | None = exc
    while cause is not None:
        details = getattr(cause, "details", None) or getattr(cause, "nodes", None)
        if details:
            return seen + [str(d) for d in details]
        cause = cause.__cause__
    return seen


if __name__ == "__main__":
    sys.exit(main())
