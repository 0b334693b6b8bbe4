"""``netsurgeon passes``: list the passes and their options.

Example:
    $ netsurgeon passes
    dks: Deep Kernel Shaping: γ(φ(αx+β)+δ) at every activation, ξ derived from the graph (zeta=1.5)
        dks.zeta (default 1.5): float
    ...
"""
from __future__ import annotations

import argparse
import dataclasses

import netsurgeon

__all__ = ["add_parser", "_cmd_passes"]


def _cmd_passes(args: argparse.Namespace) -> int:
    for name in netsurgeon.list_passes():
        cls = netsurgeon.get_pass(name)
        print(f"{name}: {cls.summary}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            print(f"    {name}.{f.name} (default {default!r}): {f.type}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``passes`` on the ``netsurgeon`` subcommand parsers."""
    p = sub.add_parser("passes", help="list the passes and their options")
    p.set_defaults(func=_cmd_passes)
