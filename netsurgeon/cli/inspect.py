"""``netsurgeon inspect``: the topology summary of a model or a conversion directory, and on
request its blocks, Q/C-map analysis and plot, and DOT / GraphML exports.

Output paths are checked before any work (:func:`_check_output_files`) and written through
the library's atomic writers, an OS error reported as one line (:func:`_write`).

Example:
    $ netsurgeon inspect resnet50 --blocks
    $ netsurgeon inspect out/resnet18 --cmap cmap.png --dot graph.dot
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

import netsurgeon

from ._common import _parse_shape, _progress, _UsageError

__all__ = ["add_parser", "_cmd_inspect", "_check_output_files", "_write", "_example"]


def _shape_error(message: str) -> _UsageError:
    return _UsageError(message.replace("input shape", "--input-shape", 1))


def _example(shape: tuple[int, ...]) -> tuple:
    try:
        return netsurgeon.example_inputs(shape, seed=0)
    except netsurgeon.InvalidArgumentError as exc:
        raise _shape_error(str(exc)) from None


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


def _write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(path)`` (the library writes atomically), an OS error as one line."""
    try:
        write(path)
    except OSError as exc:
        raise _UsageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def _cmd_inspect(args: argparse.Namespace) -> int:
    progress = _progress(args.quiet)
    outputs = _check_output_files(args)
    if os.path.isdir(args.model):
        progress(f"loading conversion {args.model}")
        model = netsurgeon.load(args.model, trust_code=args.trust_code)
        recipe = netsurgeon.read_recipe(Path(args.model) / "recipe.json", trust_code=args.trust_code)
        shape = _parse_shape(args.input_shape) or recipe.input_shape
    else:
        if args.trust_code:
            raise _UsageError("--trust-code applies to a conversion directory (MODEL is a timm name or your own "
                              "package.module:factory here, which is already yours to run)")
        progress(f"building model {args.model}")
        model = netsurgeon.create_model(args.model)
        shape = _parse_shape(args.input_shape) or netsurgeon.default_input_shape(model)
    example = _example(shape) if shape is not None else None
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
        _write(outputs["cmap"], analysis.save_cmaps)
        print(f"wrote {args.cmap}")
    if "dot" in outputs:
        _write(outputs["dot"], topo.write_dot)
        print(f"wrote {args.dot}")
    if "graphml" in outputs:
        _write(outputs["graphml"], topo.to_graphml)
        print(f"wrote {args.graphml}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``inspect`` and its arguments on the ``netsurgeon`` subcommand parsers."""
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
