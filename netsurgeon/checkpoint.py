"""Checkpoints and conversion directories.

``convert`` builds a model, optionally loads a checkpoint, runs passes and writes
``DIR/model.safetensors``, ``DIR/recipe.json`` and ``DIR/report.md`` atomically (a staging
directory renamed into place, see :mod:`netsurgeon._outdir`), with the modes a plain
``mkdir``/``open`` would give under the process umask. ``recipe.json`` records the sha256 of the
other two files. ``force`` replaces an existing ``DIR`` only when netsurgeon wrote it. ``load``
checks every recipe field (:mod:`netsurgeon.recipe`), verifies the weights' hash, rebuilds the
GraphModule and loads the weights; it imports or calls nothing a recipe names unless
``trust_code=True``.

Example:
    >>> import tempfile, os, netsurgeon
    >>> out = os.path.join(tempfile.mkdtemp(), "r18")
    >>> _ = netsurgeon.convert("resnet18", ["strip_bn"], out, input_shape=(1, 3, 64, 64))
    >>> sorted(os.listdir(out))
    ['model.safetensors', 'recipe.json', 'report.md']
    >>> import torch.fx
    >>> isinstance(netsurgeon.load(out), torch.fx.GraphModule)
    True
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from . import _outdir
from ._fileio import umask as current_umask
from ._version import __version__
from ._validate import non_finite, require_bool, short_list
from .errors import CheckpointError, InvalidArgumentError, ModelSpecError, NetsurgeonError, PassError, RecipeError
from .graph.state import set_recipe
from .models import AllocationGuard, create_model, default_input_shape
from .passes.base import PassSpec, make_pass
from .pipeline import report, transform
from .recipe import (MAX_MODEL_ELEMENTS, RECIPE_VERSION, Recipe, check_input_shape, check_model_kwargs, check_seed,
                     read_recipe)

__all__ = ["convert", "load", "load_state_dict_file", "check_state_dict", "RECIPE_VERSION"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _pickle_refusal(path: Path, exc: BaseException) -> CheckpointError:
    """One line for a torch file that holds pickled objects besides tensors."""
    text = _ANSI.sub("", str(exc))
    found = _GLOBAL.search(text)
    what = f" (e.g. {found.group(1)})" if found else ""
    return CheckpointError(
        f"checkpoint {str(path)!r} contains pickled Python objects{what}; netsurgeon loads only tensors and never "
        f"unpickles. Only if you trust the file, convert it once to safetensors: python -c \"import torch; "
        f"from safetensors.torch import save_file; sd = torch.load('{path}', weights_only=False); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, 'model.safetensors')\" "
        f"(take sd['state_dict'] first if the file nests it)")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only``), read-only."""
    path = Path(path)
    if path.is_dir():
        hint = (" (a netsurgeon conversion: its weights belong to the converted model; load it with "
                "netsurgeon.load)" if (path / "recipe.json").is_file() else "")
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory{hint}; give a .safetensors, .pt or .pth file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: pickled objects
        raise _pickle_refusal(path, exc) from None
    except Exception as exc:  # unreadable or not a checkpoint at all
        text = _ANSI.sub("", str(exc)).strip().splitlines()
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(exc).__name__}: "
                              f"{text[0] if text else ''}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd



def _dtype_kind(dtype: torch.dtype) -> str:
    return "floating" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
    """Check ``sd`` against ``model`` before loading it.

    Raises :class:`CheckpointError` listing missing, unexpected and mis-shaped keys, tensors of
    another kind than the model's (an int64 tensor for a float weight is refused, never cast) and
    tensors holding NaN or inf. Returns notes on the float tensors that loading will convert (e.g.
    float16 to float32), for the report.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    kinds = [f"{k} {str(sd[k].dtype).removeprefix('torch.')} vs model {str(own[k].dtype).removeprefix('torch.')}"
             for k in own if k in sd and _dtype_kind(sd[k].dtype) != _dtype_kind(own[k].dtype)]
    if missing or unexpected or shapes or kinds:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {short_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {short_list(shapes)}")
        if kinds:
            parts.append(f"dtype mismatches, refused rather than cast ({len(kinds)}): {short_list(kinds)}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    bad = non_finite(sd.items())
    if bad:
        raise CheckpointError(f"{source} holds non-finite values in {len(bad)} tensor(s): {short_list(bad, 5)}; "
                              f"netsurgeon needs finite weights (check how the checkpoint was saved)")
    converted: dict[str, list[str]] = {}
    for k, v in sd.items():
        if v.dtype != own[k].dtype and v.is_floating_point():
            converted.setdefault(f"{str(v.dtype).removeprefix('torch.')} to "
                                 f"{str(own[k].dtype).removeprefix('torch.')}", []).append(k)
    return [f"{source}: {len(keys)} tensor(s) converted from {how} ({short_list(keys, 3)})"
            for how, keys in converted.items()]


def _versions() -> dict[str, str]:
    import timm

    return {"netsurgeon": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": sys.version.split()[0]}


def _build(recipe: Recipe, progress: Callable[[str], None], checkpoint: str | None = None,
           max_model_elements: int | None = MAX_MODEL_ELEMENTS, untrusted: bool = False
           ) -> tuple[fx.GraphModule, Recipe]:
    """Build, load ``checkpoint``, trace and transform as ``recipe`` says; returns the GraphModule and
    the recipe with its input shape filled in. ``untrusted`` (a recipe from a file): the passes'
    allocations count against the same cap as the build's, and a factory that fails on the
    recipe's arguments is a :class:`RecipeError`."""
    guard = AllocationGuard(max_model_elements, f"the model of recipe {recipe.model!r}") \
        if max_model_elements is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), guard:
        gm, shape, notes = _build_guarded(recipe, progress, checkpoint, untrusted, guard)
    report(gm).trace_notes.extend(notes)
    return gm, Recipe(**{**vars(recipe), "input_shape": shape})


def _build_guarded(recipe: Recipe, progress: Callable[[str], None], checkpoint: str | None, untrusted: bool,
                   guard: Any) -> tuple[fx.GraphModule, tuple[int, ...] | None, list[str]]:
    shape = recipe.input_shape
    torch.manual_seed(recipe.seed)
    progress(f"building model {recipe.model}")
    try:
        model = create_model(recipe.model, **recipe.model_kwargs)
    except NetsurgeonError:
        raise
    except Exception as exc:  # a factory failing on arguments from a file: the file's fault
        if not untrusted:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RecipeError(f"recipe fields 'model'/'model_kwargs': building {recipe.model!r} with "
                          f"{recipe.model_kwargs!r} failed: {type(exc).__name__}: {first}") from None
    if not untrusted and isinstance(guard, AllocationGuard):
        guard.max_elements = None  # your own conversion: the cap covers the build, not your checkpoint or passes
    notes: list[str] = []
    if checkpoint is not None:
        progress(f"loading checkpoint {checkpoint}")
        sd = load_state_dict_file(checkpoint)
        notes = check_state_dict(model, sd, f"checkpoint {checkpoint!r}")
        model.load_state_dict(sd)
    if shape is None:
        shape = default_input_shape(model)
        if shape is not None:
            shape = check_input_shape(list(shape), f"the default input shape of {recipe.model}",
                                      InvalidArgumentError)
    example = (torch.randn(shape),) if shape else None
    progress(f"tracing and running passes: {', '.join(n for n, _ in recipe.passes) or '(none)'}")
    gm = transform(model, list(recipe.passes), example_inputs=example, inplace=True)
    return gm, shape, notes


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


def _default_notice(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def convert(model: str, passes: Sequence[PassSpec], out: str | os.PathLike, *, checkpoint: str | os.PathLike | None
            = None, input_shape: Sequence[int] | None = None, seed: int = 0, force: bool = False,
            model_kwargs: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
            notice: Callable[[str], None] | None = None, max_model_elements: int | None = MAX_MODEL_ELEMENTS
            ) -> fx.GraphModule:
    """Build ``model``, load ``checkpoint``, apply ``passes`` and write ``out`` atomically.

    Args:
        model: timm model name or ``package.module:factory`` (imported and called: it is your own code).
        passes: pass specs, as for :func:`netsurgeon.transform`.
        out: output directory; must not exist unless ``force``.
        checkpoint: optional ``.safetensors``/``.pt`` state dict of the base model (never modified; a
            file inside ``out`` is refused). Tensors of another kind than the model's (int for float)
            or holding NaN/inf are refused; float16/bfloat16/float64 ones are converted, with a line
            in the report.
        input_shape: example input shape, at most :data:`netsurgeon.recipe.MAX_INPUT_ELEMENTS` elements;
            default: the timm model's default input size.
        seed: seed of the random initialization and of the example input, 0 to 2**64 - 1. Default: 0.
        force: replace an existing output directory, provided netsurgeon wrote it (an empty directory, or
            the three files of a conversion whose hashes match its ``recipe.json``); anything else, or an
            ``out`` that is the working directory, one of its parents or a mount point, raises
            :class:`OutputExistsError` before any work is done. Default: False.
        model_kwargs: passed to the model factory.
        progress: called with a message at each stage.
        notice: called with a message when the output directory had to be recovered from a killed run
            (default: :func:`warnings.warn`).
        max_model_elements: cap on the tensor elements the model build allocates (None: no cap).
            Default: :data:`netsurgeon.recipe.MAX_MODEL_ELEMENTS`.

    Returns:
        The converted GraphModule (also written to ``out``).
    """
    progress = progress or (lambda msg: None)
    notice = notice or _default_notice
    require_bool("convert", "force", force)
    seed = check_seed(seed, "seed", InvalidArgumentError)
    shape = check_input_shape(list(input_shape), "input_shape", InvalidArgumentError) if input_shape else None
    model_kwargs = check_model_kwargs(dict(model_kwargs or {}), trust_code=True)
    out = Path(out)
    _outdir.prepare(out, force, notice)
    ckpt = None
    if checkpoint is not None:
        cpath = Path(checkpoint)
        if cpath.exists() and cpath.resolve().is_relative_to(out.resolve()):
            raise CheckpointError(f"checkpoint {str(cpath)!r} lies inside the output {str(out)!r} that this "
                                  f"conversion would replace; copy it elsewhere first or choose another --out")
        load_state_dict_file(cpath) if cpath.is_dir() else None  # a directory: one clear line
        if not cpath.is_file():
            raise CheckpointError(f"checkpoint {str(cpath)!r} does not exist or is not a file")
        ckpt = {"path": str(cpath), "sha256": _outdir.sha256_file(cpath)}
    instances = [make_pass(p) for p in passes]
    recipe = Recipe(format=RECIPE_VERSION, model=model, model_kwargs=model_kwargs,
                    passes=tuple((p.name, _jsonable(p.options())) for p in instances), input_shape=shape, seed=seed,
                    checkpoint=ckpt, versions=_versions())
    gm, recipe = _build(recipe, progress, str(checkpoint) if checkpoint is not None else None, max_model_elements)
    progress(f"writing {out}")
    _write(gm, recipe, out, force)
    return gm


def _write(gm: fx.GraphModule, recipe: Recipe, out: Path, force: bool) -> None:
    """Write the three files into a staging directory next to ``out`` and move it into place."""
    from safetensors.torch import save_model

    with _outdir.staging(out) as tmp:
        try:
            try:
                save_model(gm, str(tmp / "model.safetensors"))
            except OSError:
                raise
            except Exception as exc:  # safetensors reports a full disk as SafetensorError, not OSError
                raise OSError(_ANSI.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else
                              type(exc).__name__) from None
            (tmp / "report.md").write_text(report(gm).to_markdown())
            files = {name: {"sha256": _outdir.sha256_file(tmp / name), "bytes": os.path.getsize(tmp / name)}
                     for name in ("model.safetensors", "report.md")}
            recipe = Recipe(**{**vars(recipe), "files": files})
            (tmp / "recipe.json").write_text(json.dumps(recipe.to_json(), indent=2) + "\n")
            umask = current_umask()  # mkdtemp makes a 0700 directory; give what mkdir/open would
            for name in _outdir.FILES:
                os.chmod(tmp / name, 0o666 & ~umask)
            os.chmod(tmp, 0o777 & ~umask)
            _outdir.commit(tmp, out, force)
        except NetsurgeonError:
            raise
        except OSError as exc:
            reason = exc.strerror or str(exc)
            hint = "; free some space or choose another --out" if exc.errno == 28 or "space" in reason else ""
            raise NetsurgeonError(f"cannot write output {str(out)!r}: {reason}{hint}") from None


def load(directory: str | os.PathLike, *, trust_code: bool = False, verify: bool = True,
         max_model_elements: int | None = MAX_MODEL_ELEMENTS) -> fx.GraphModule:
    """Rebuild a converted model from ``DIR/recipe.json`` and load ``DIR/model.safetensors``.

    A conversion directory is data: every recipe field is checked before anything is built
    (:func:`netsurgeon.recipe.parse_recipe`), and nothing it names is imported or called.

    Args:
        directory: a directory written by :func:`convert`.
        trust_code: allow a recipe that names a ``package.module:factory`` (imported and called) or
            model arguments that read files (``pretrained``, ``checkpoint_path``, ...). Only for
            directories whose origin you trust, like Hugging Face's ``trust_remote_code``. Default: False.
        verify: check ``model.safetensors`` against the sha256 in ``recipe.json``. Default: True.
        max_model_elements: cap on the tensor elements the model build allocates (None: no cap).

    Raises:
        CheckpointError: missing files or weights that do not match the recipe or the rebuilt model.
        RecipeError: a recipe field that is missing, mistyped or out of range (named).
        UntrustedCodeError: the recipe would run code or read files, and ``trust_code`` is False.
    """
    require_bool("load", "trust_code", trust_code)
    require_bool("load", "verify", verify)
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{str(d)!r} is not a directory; load() takes a directory written by convert")
    for name in ("recipe.json", "model.safetensors"):
        if (d / name).is_symlink():
            raise CheckpointError(f"{str(d / name)!r} is a symbolic link; a conversion directory holds its own "
                                  f"files (netsurgeon reads no file that data points to)")
        if not (d / name).is_file():
            raise CheckpointError(f"{str(d)!r} is not a netsurgeon conversion: {name} is missing")
    recipe = read_recipe(d / "recipe.json", trust_code)
    for i, (name, options) in enumerate(recipe.passes):  # every field checked before anything is built
        try:
            make_pass((name, options))
        except NetsurgeonError as exc:
            raise RecipeError(f"recipe field 'passes[{i}]': {exc}") from None
    weights = d / "model.safetensors"
    if verify:
        entry = recipe.files.get("model.safetensors")
        if entry is None:
            raise CheckpointError(f"{str(d / 'recipe.json')!r} records no sha256 of model.safetensors (format "
                                  f"{recipe.format}, from an older netsurgeon); pass verify=False to load it unchecked")
        if os.path.getsize(weights) != entry["bytes"] or _outdir.sha256_file(weights) != entry["sha256"]:
            raise CheckpointError(f"{str(weights)!r} is not the file its recipe.json records (sha256 differs): the "
                                  f"weights were replaced or damaged; pass verify=False to load them anyway")
    try:
        gm, _ = _build(recipe, lambda msg: None, None, max_model_elements, untrusted=True)
    except ModelSpecError as exc:  # the recipe's model, its arguments, or passes that grow it past the cap
        field = "passes" if isinstance(exc, PassError) else "model_kwargs" if recipe.model_kwargs else "model"
        raise RecipeError(f"recipe field {field!r}: {exc}") from None
    from safetensors.torch import load_file

    try:
        sd = load_file(str(weights))
    except Exception as exc:  # unreadable file
        raise CheckpointError(f"cannot read {str(weights)!r}: {type(exc).__name__}: {exc}") from None
    check_state_dict(gm, sd, f"{str(weights)!r}")
    gm.load_state_dict(sd)
    set_recipe(gm, recipe)
    return gm
