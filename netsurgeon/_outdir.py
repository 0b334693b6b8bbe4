"""Conversion output directories: written in a hidden staging directory, claimed without
clobbering, replaced only when netsurgeon wrote them, and recovered after a kill.

The protocol (POSIX; the locks are ``flock`` locks, released by the kernel when a process dies):

* A run stages its files in ``.NAME.netsurgeon-tmp-XXXXXXXX`` next to ``NAME`` and holds a lock on that
  directory for as long as it lives. A staging directory whose lock is free belongs to a
  dead run and is removed by the next run that writes ``NAME``.
* The final step holds a lock on the parent directory. Without ``force`` the staging
  directory is renamed onto ``NAME`` only if ``NAME`` does not exist (``renameat2`` with
  ``RENAME_NOREPLACE`` where the kernel has it), so of two runs racing for one ``NAME`` the
  second fails with :class:`OutputExistsError`. With ``force`` the old ``NAME`` is renamed
  to ``.NAME.netsurgeon-old-XXXXXXXX``, the new one into place, and the old one deleted.
* A run killed between those two renames leaves ``.NAME.netsurgeon-old-XXXXXXXX`` and no ``NAME``; the next
  run (under the same lock, so no swap is in flight) renames it back and says so. An
  ``.old`` directory next to an existing ``NAME`` is a finished swap's leftover and is removed.
* ``force`` replaces only what netsurgeon wrote: an empty directory, or one holding only
  ``model.safetensors``, ``recipe.json`` and ``report.md`` where ``recipe.json`` is a valid
  netsurgeon recipe whose recorded sha256 matches each of the other files.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ._validate import short_list
from .errors import NetsurgeonError, OutputExistsError, RecipeError

try:
    import fcntl
except ImportError:  # not POSIX: no locks (single-writer use only)
    fcntl = None  # type: ignore[assignment]

__all__ = ["FILES", "sha256_file", "prepare", "staging", "commit", "not_netsurgeon_output"]

FILES = ("model.safetensors", "recipe.json", "report.md")
_SHORT = 40  # bytes of NAME kept in staging names, so they fit where NAME does


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



def _short(name: str) -> str:
    raw = os.fsencode(name)
    if len(raw) <= _SHORT:
        return name
    return os.fsdecode(raw[:24]).rstrip("\udcff") + "~" + hashlib.sha256(raw).hexdigest()[:8]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (released on exit or when the process dies)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _owner_gone(directory: Path) -> bool:
    """True when no process holds the staging lock on ``directory``."""
    if fcntl is None:
        return False
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _only_conversion_files(directory: Path, staging: bool = False) -> bool:
    """Whether ``directory`` holds nothing but a conversion's files (and, in a staging directory,
    the ``.tmp*`` file safetensors writes before renaming it to ``model.safetensors``)."""
    def ours(name: str) -> bool:
        path = directory / name
        return ((name in FILES or (staging and name.startswith(".tmp"))) and path.is_file()
                and not path.is_symlink())

    return all(ours(n) for n in os.listdir(directory))


def not_netsurgeon_output(directory: Path) -> str | None:
    """Why ``directory`` is not (entirely) netsurgeon's output, or None when it is or is empty."""
    from .recipe import read_recipe

    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    foreign = [n for n in entries if n not in FILES or (directory / n).is_symlink() or not (directory / n).is_file()]
    if foreign:
        return f"holds files that netsurgeon did not write ({short_list(foreign)})"
    if not entries:
        return None
    if "recipe.json" not in entries:
        return f"holds {', '.join(entries)} but no recipe.json recording that netsurgeon wrote them"
    try:
        recipe = read_recipe(directory / "recipe.json", trust_code=True)  # read as data only; nothing is built
    except RecipeError as exc:
        return f"has a recipe.json that is not a netsurgeon recipe ({exc})"
    if len(entries) != len(FILES):  # netsurgeon writes all three, and never a directory with fewer
        return (f"holds {', '.join(entries)}, not the {len(FILES)} files a conversion writes "
                f"({', '.join(FILES)})")
    for name in entries:
        if name == "recipe.json":
            continue
        entry = recipe.files.get(name)
        if entry is None:
            return (f"has a {name} that its recipe.json records no sha256 for (a format-{recipe.format} recipe); "
                    f"netsurgeon cannot tell it wrote it")
        if os.path.getsize(directory / name) != entry["bytes"] or sha256_file(directory / name) != entry["sha256"]:
            return f"has a {name} that differs from the one netsurgeon wrote (sha256 recorded in recipe.json)"
    return None


def _check_replaceable(out: Path, target: Path) -> None:
    """Raise unless the existing ``target`` (``out`` resolved) may be replaced by ``force``."""
    cwd = Path.cwd().resolve()
    if target == target.parent or os.path.ismount(target):
        raise OutputExistsError(f"output {str(out)!r} is the filesystem root or a mount point and cannot be "
                                f"replaced; choose a new directory for --out")
    if target == cwd or target in cwd.parents:
        raise OutputExistsError(f"output {str(out)!r} is the current directory or one of its parents and cannot "
                                f"be replaced; choose a new directory for --out, e.g. {str(out / 'converted')!r}")
    if target.is_symlink() or not target.is_dir():
        raise OutputExistsError(f"output {str(out)!r} exists and is not a directory")
    why = not_netsurgeon_output(target)
    if why:
        raise OutputExistsError(f"output {str(out)!r} {why}; --force only replaces an empty directory or a "
                                f"conversion netsurgeon wrote: move it away or choose another --out")


def _leftover(short: str, entry: str) -> str | None:
    """``"tmp"`` or ``"old"`` when ``entry`` is exactly a name this module gives a staging or
    set-aside directory of the output ``short`` (``mkdtemp``'s 8-character suffix), else None."""
    m = re.fullmatch(rf"\.{re.escape(short)}\.netsurgeon-(tmp|old)-[a-z0-9_]{{8}}", entry)
    return m.group(1) if m else None


def _recover(target: Path, notice: Callable[[str], None]) -> None:
    """Finish what killed runs left next to ``target``; call with the parent locked."""
    parent, short = target.parent, _short(target.name)
    olds = []
    for entry in sorted(os.listdir(parent)):
        path = parent / entry
        kind = _leftover(short, entry)
        if kind is None or not path.is_dir() or path.is_symlink():
            continue
        if kind == "tmp":
            if not _owner_gone(path):
                continue  # a live run's staging directory
            if _only_conversion_files(path, staging=True):
                shutil.rmtree(path)
                notice(f"removed {entry}: a partial output of {target.name} left by an interrupted run")
            else:
                notice(f"left {entry} alone: an interrupted run's staging directory that holds files netsurgeon "
                       f"did not write; remove it yourself")
        else:
            olds.append(path)
    for old in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True):
        why = not_netsurgeon_output(old)
        if why:
            notice(f"left {old.name} alone: it {why}")
        elif not os.path.lexists(target):
            os.rename(old, target)
            notice(f"restored {target.name} from {old.name}: a --force replacement was interrupted before the new "
                   f"output was in place, so the previous output is back")
        else:
            shutil.rmtree(old)
            notice(f"removed {old.name}: the previous output of {target.name}, left by a replacement that was "
                   f"interrupted after the new output was in place")


def prepare(out: Path, force: bool, notice: Callable[[str], None]) -> None:
    """Check ``out`` before any work: its name fits, its parent is a writable directory, runs that
    were killed are cleaned up, and an existing ``out`` is refused without ``force`` or when
    netsurgeon did not write it."""
    target = out.resolve()
    parent = target.parent
    name_max = 255
    if parent.is_dir():
        with contextlib.suppress(OSError, ValueError):
            name_max = os.pathconf(parent, "PC_NAME_MAX")
    if len(os.fsencode(target.name)) > name_max:
        raise NetsurgeonError(f"output name {target.name[:40]!r}... is {len(os.fsencode(target.name))} bytes long; "
                              f"this file system allows at most {name_max}: choose a shorter --out")
    if parent.exists() and not parent.is_dir():
        raise NetsurgeonError(f"cannot write {str(out)!r}: {str(parent)!r} is not a directory")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise NetsurgeonError(f"cannot create the output's parent directory {str(parent)!r}: "
                                  f"{exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NetsurgeonError(f"output directory {str(parent)!r} is not writable")
    with _locked(parent):
        _recover(target, notice)
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir():
            raise OutputExistsError(f"output {str(out)!r} exists and is not a directory")
        _check_replaceable(out, target)  # before --force, so the hint never leads to an unreplaceable --out
        if not force:
            raise OutputExistsError(f"output {str(out)!r} exists; pass --force (force=True) to replace it")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A locked, empty staging directory next to ``out``; removed on exit unless committed."""
    target = out.resolve()
    fd = -1
    try:
        with _locked(target.parent):  # so no concurrent recovery sees it before it is locked
            tmp = Path(tempfile.mkdtemp(prefix=f".{_short(target.name)}.netsurgeon-tmp-", dir=target.parent))
            if fcntl is not None:
                fd = os.open(tmp, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        raise NetsurgeonError(f"cannot write into {str(target.parent)!r}: {exc.strerror or exc}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when committed
        if fd >= 0:
            os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path, out: Path) -> None:
    """Rename ``src`` to ``dst``, failing with :class:`OutputExistsError` if ``dst`` exists."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise OutputExistsError(f"output {str(out)!r} was created by another run while this one converted; "
                                    f"pass --force (force=True) to replace it")
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: no NOREPLACE here; the lock still holds
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise OutputExistsError(f"output {str(out)!r} was created by another run while this one converted; "
                                f"pass --force (force=True) to replace it")
    os.rename(src, dst)


def _swap(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp``: the old one is renamed aside first and deleted only once the
    new one is in place; if that fails it is renamed back."""
    old = Path(tempfile.mkdtemp(prefix=f".{_short(target.name)}.netsurgeon-old-", dir=target.parent))
    try:
        os.rename(target, old)  # onto an empty directory: replaces it
    except BaseException:
        old.rmdir()
        raise
    try:
        os.rename(tmp, target)
    except BaseException:
        try:
            os.rename(old, target)
        except OSError as exc:
            raise NetsurgeonError(f"cannot put the previous output back in {str(target)!r}: {exc}; "
                                  f"it is kept in {str(old)!r}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished staging directory ``tmp`` to ``out`` (see the module docstring)."""
    target = out.resolve()
    for name in os.listdir(tmp):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    with _locked(target.parent):
        if os.path.lexists(target):
            if not force:
                raise OutputExistsError(f"output {str(out)!r} was created by another run while this one converted; "
                                        f"pass --force (force=True) to replace it")
            _check_replaceable(out, target)  # again: files may have appeared while converting
            _swap(tmp, target)
        else:
            _rename_noreplace(tmp, target, out)
    _fsync_dir(target.parent)
