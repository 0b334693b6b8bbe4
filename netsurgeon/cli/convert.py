"""``netsurgeon convert``: apply passes to a model (and checkpoint) and write the result.

Example:
    $ netsurgeon convert resnet18 --passes strip_bn --set strip_bn.mode=remove --out out/resnet18

    >>> _parse_passes("strip_bn, normalize_sums", ["normalize_sums.shortcut_weight2=0.5"])
    [('strip_bn', {}), ('normalize_sums', {'shortcut_weight2': 0.5})]
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import netsurgeon

from ._common import _notice, _parse_shape, _progress, _UsageError

__all__ = ["add_parser", "_parse_passes", "_cmd_convert"]


def _parse_passes(text: str, sets: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise _UsageError("--passes is empty: give a comma-separated list, e.g. --passes strip_bn")
    classes = {n: netsurgeon.get_pass(n) for n in names}
    options: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in sets:
        key, eq, value = item.partition("=")
        pname, dot, opt = key.partition(".")
        if not eq or not dot or not pname or not opt:
            raise _UsageError(f"malformed --set {item!r}: expected PASS.OPTION=VALUE, e.g. strip_bn.mode=remove")
        if pname not in classes:
            raise _UsageError(f"--set {item!r} names pass {pname!r}, which is not in --passes ({', '.join(names)})")
        options[pname][opt] = netsurgeon.coerce_option(classes[pname], opt, value)
    return [(n, options[n]) for n in names]


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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``convert`` and its arguments on the ``netsurgeon`` subcommand parsers."""
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
