"""What the ``netsurgeon`` commands share: the usage error, progress and notice lines,
``--input-shape`` parsing, and the one line (and the details behind it) an error prints.

Example:
    >>> _parse_shape("1,3,224,224")
    (1, 3, 224, 224)
    >>> _one_line(ValueError("first line\\nsecond line"))
    'first line (+1 more lines with --verbose)'
"""
from __future__ import annotations

import sys
import time

from netsurgeon import NetsurgeonError

__all__ = ["_UsageError", "_progress", "_parse_shape", "_notice", "_one_line", "_details"]


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
    return shape


def _notice(message: str) -> None:
    """Things netsurgeon did on its own (recovering an interrupted output): said even with --quiet."""
    print(f"netsurgeon: note: {message}", file=sys.stderr, flush=True)


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
