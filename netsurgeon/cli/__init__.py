"""The ``netsurgeon`` command line: ``convert``, ``inspect``, ``passes``.

Uses only the public API. Errors print one line and exit with status 2. Each command lives
in its own module (``convert.py``, ``inspect.py``, ``passes.py``) with the arguments it adds;
``_common.py`` holds what they share.

Example:
    $ netsurgeon convert resnet18 --passes strip_bn --out out/resnet18
    $ netsurgeon inspect resnet50
    $ netsurgeon passes
"""
from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from typing import Sequence

import netsurgeon
from netsurgeon import NetsurgeonError, PassOptionError

from . import convert, inspect, passes
from ._common import _details, _one_line
from .convert import _parse_passes  # noqa: F401  (tests/test_pass_options.py imports it from here)

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (argparse prints the whole usage first)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"netsurgeon: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one line, without the source path and code line."""
    first = (str(message).strip().splitlines() or [""])[0]
    print(f"netsurgeon: warning: {first}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="netsurgeon", description="Surgery on neural networks.")
    parser.add_argument("--version", action="version", version=f"netsurgeon {netsurgeon.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    convert.add_parser(sub)
    inspect.add_parser(sub)
    passes.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    with warnings.catch_warnings():
        if not verbose:
            warnings.showwarning = _warning_line
        return _run(args, verbose)


def _run(args: argparse.Namespace, verbose: bool) -> int:
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
