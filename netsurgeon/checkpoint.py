"""Checkpoints and conversion directories.

``convert`` builds a model, optionally loads a checkpoint, runs passes and writes
``DIR/model.safetensors``, ``DIR/recipe.json`` and ``DIR/report.md`` atomically (a
temporary directory renamed into place), with the modes a plain ``mkdir``/``open`` would
give under the process umask. ``force`` replaces an existing ``DIR`` only when it holds
nothing but those files. ``load`` rebuilds the GraphModule from the recipe and loads the
weights.

Example:
    >>> import tempfile, os, netsurgeon
    >>> out = os.path.join(tempfile.mkdtemp(), "r18")
    >>> _ = netsurgeon.convert("resnet18", ["strip_bn"], out, input_shape=(1, 3, 64, 64))
    >>> sorted(os.listdir(out))
    ['model.safetensors', 'recipe.json', 'report.md']
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ._fileio import umask as current_umask
from .errors import CheckpointError, NetsurgeonError, OutputExistsError
from .models import create_model, default_input_shape
from .passes.base import PassSpec, make_pass
from .pipeline import report, transform

__all__ = ["convert", "load", "load_state_dict_file", "check_state_dict", "RECIPE_VERSION"]

RECIPE_VERSION = 1
_FILES = ("model.safetensors", "recipe.json", "report.md")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only``), read-only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_listing(shapes)}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))


def _versions() -> dict[str, str]:
    import timm

    from . import __version__

    return {"netsurgeon": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": sys.version.split()[0]}


def _build(recipe: dict[str, Any], progress: Callable[[str], None], checkpoint: dict | None = None
           ) -> fx.GraphModule:
    seed = int(recipe["seed"])
    shape = tuple(recipe["input_shape"]) if recipe["input_shape"] else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        progress(f"building model {recipe['model']}")
        model = create_model(recipe["model"], **recipe.get("model_kwargs", {}))
        if checkpoint is not None:
            progress(f"loading checkpoint {checkpoint['path']}")
            sd = load_state_dict_file(checkpoint["path"])
            check_state_dict(model, sd, f"checkpoint {checkpoint['path']!r}")
            model.load_state_dict(sd)
        if shape is None:
            shape = default_input_shape(model)
            recipe["input_shape"] = list(shape) if shape else None
        example = (torch.randn(shape),) if shape else None
        passes = [(p["name"], p["options"]) for p in recipe["passes"]]
        progress(f"tracing and running passes: {', '.join(p['name'] for p in recipe['passes']) or '(none)'}")
        gm = transform(model, passes, example_inputs=example, inplace=True)
    return gm


def _check_replaceable(out: Path, target: Path) -> None:
    """Raise unless the existing directory ``target`` (``out`` resolved) can be swapped out: not
    the filesystem root, a mount point, the working directory or one of its ancestors, and
    holding only the files a conversion writes."""
    cwd = Path.cwd().resolve()
    if target == target.parent or os.path.ismount(target):
        raise OutputExistsError(f"output {str(out)!r} is the filesystem root or a mount point and cannot be "
                                f"replaced; choose a new directory for --out")
    if target == cwd or target in cwd.parents:
        raise OutputExistsError(f"output {str(out)!r} is the current directory or one of its parents and cannot "
                                f"be replaced; choose a new directory for --out, e.g. {str(out / 'converted')!r}")
    try:
        extra = sorted(name for name in os.listdir(target) if name not in _FILES or not (target / name).is_file())
    except OSError as exc:
        raise OutputExistsError(f"cannot read output {str(out)!r} to check what --force would replace: {exc}") from None
    if extra:
        raise OutputExistsError(f"output {str(out)!r} holds files that netsurgeon did not write ({_listing(extra)}); "
                                f"--force only replaces a directory holding nothing but {', '.join(_FILES)}: "
                                f"move them away or choose another --out")


def _prepare_out(out: Path, force: bool) -> None:
    target = out.resolve()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} exists and is not a directory")
    if out.exists():
        _check_replaceable(out, target)  # before --force, so the hint never leads to an unreplaceable --out
        if not force:
            raise OutputExistsError(f"output {str(out)!r} exists; pass --force (force=True) to replace it")
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise NetsurgeonError(f"cannot write {str(out)!r}: {str(parent)!r} is not a directory")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise NetsurgeonError(f"cannot create the output's parent directory {str(parent)!r}: {exc}") from None
    if not os.access(parent, os.W_OK):
        raise NetsurgeonError(f"output directory {str(parent)!r} is not writable")


def convert(model: str, passes: Sequence[PassSpec], out: str | os.PathLike, *, checkpoint: str | os.PathLike | None
            = None, input_shape: Sequence[int] | None = None, seed: int = 0, force: bool = False,
            model_kwargs: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None
            ) -> fx.GraphModule:
    """Build ``model``, load ``checkpoint``, apply ``passes`` and write ``out`` atomically.

    Args:
        model: timm model name or ``package.module:factory``.
        passes: pass specs, as for :func:`netsurgeon.transform`.
        out: output directory; must not exist unless ``force``.
        checkpoint: optional ``.safetensors``/``.pt`` state dict of the base model (never modified).
        input_shape: example input shape; default: the timm model's default input size.
        seed: seed of the random initialization and of the example input.
        force: replace an existing output directory, provided it holds only files a conversion
            writes (``model.safetensors``, ``recipe.json``, ``report.md``); anything else in it,
            or an ``out`` that is the working directory, one of its parents or a mount point,
            raises :class:`OutputExistsError` before any work is done.
        model_kwargs: passed to the model factory.
        progress: called with a message at each stage.

    Returns:
        The converted GraphModule (also written to ``out``).
    """
    progress = progress or (lambda msg: None)
    out = Path(out)
    _prepare_out(out, force)
    instances = [make_pass(p) for p in passes]
    recipe: dict[str, Any] = {
        "format": RECIPE_VERSION, "model": model, "model_kwargs": dict(model_kwargs or {}),
        "passes": [{"name": p.name, "options": _jsonable(p.options())} for p in instances],
        "input_shape": list(input_shape) if input_shape else None, "seed": int(seed), "versions": _versions(),
        "checkpoint": None,
    }
    ckpt = None
    if checkpoint is not None:
        cpath = Path(checkpoint)
        if not cpath.is_file():
            raise CheckpointError(f"checkpoint {str(cpath)!r} does not exist or is not a file")
        ckpt = {"path": str(cpath), "sha256": _sha256(cpath)}
        recipe["checkpoint"] = ckpt
    gm = _build(recipe, progress, ckpt)
    progress(f"writing {out}")
    _write_atomic(gm, recipe, out)
    return gm


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        else:
            raise NetsurgeonError(f"option {k}={v!r} cannot be stored in recipe.json (use a number, string or bool)")
    return out


def _write_atomic(gm: fx.GraphModule, recipe: dict[str, Any], out: Path) -> None:
    """Write the three files into a temporary sibling of ``out`` and rename it into place."""
    from safetensors.torch import save_model

    target = out.resolve()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise NetsurgeonError(f"cannot write into {str(target.parent)!r}: {exc}") from None
    try:
        save_model(gm, str(tmp / "model.safetensors"))
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        (tmp / "report.md").write_text(report(gm).to_markdown())
        umask = current_umask()  # mkdtemp makes a 0700 directory; give what mkdir/open would
        for name in _FILES:
            os.chmod(tmp / name, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            _check_replaceable(out, target)  # again: files may have appeared while converting
        _replace_dir(tmp, target)
    except NetsurgeonError:
        raise
    except OSError as exc:
        raise NetsurgeonError(f"cannot write output {str(out)!r}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``. An existing ``target`` is first renamed aside (onto an empty
    placeholder in the same directory) and deleted only after the new one is in place; if that
    fails it is renamed back, so no ``.old`` directory is left behind."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
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


def load(directory: str | os.PathLike) -> fx.GraphModule:
    """Rebuild a converted model from ``DIR/recipe.json`` and load ``DIR/model.safetensors``.

    Raises:
        CheckpointError: missing files, an unknown recipe format, or weights that do not match.
    """
    d = Path(directory)
    for name in ("recipe.json", "model.safetensors"):
        if not (d / name).is_file():
            raise CheckpointError(f"{str(d)!r} is not a netsurgeon conversion: {name} is missing")
    try:
        recipe = json.loads((d / "recipe.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{str(d / 'recipe.json')!r} is not valid JSON: {exc}") from None
    if recipe.get("format") != RECIPE_VERSION:
        raise CheckpointError(f"recipe format {recipe.get('format')!r} is not supported (expected {RECIPE_VERSION})")
    gm = _build(recipe, lambda msg: None, None)
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(gm, str(d / "model.safetensors"), strict=False)
    except Exception as exc:  # shape mismatch or unreadable file
        raise CheckpointError(f"cannot load {str(d / 'model.safetensors')!r} into the rebuilt model: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(f"weights in {str(d)!r} do not match the rebuilt model: missing {sorted(missing)[:8]}, "
                              f"unexpected {sorted(unexpected)[:8]}")
    return gm


