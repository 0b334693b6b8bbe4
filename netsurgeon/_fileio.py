"""Atomic file output shared by the CLI, checkpoints and benchmarks: files appear whole or
not at all, with the modes a plain ``open``/``mkdir`` would give."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["umask", "write_atomic"]


def umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write`` on a temporary file next to ``path`` (same extension, so writers that pick
    the format from it still do), give it the mode ``open`` would, and rename it onto ``path``.
    On any error ``path`` is left as it was and the temporary file is removed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
