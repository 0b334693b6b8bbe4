"""``recipe.json``: what a conversion directory says about how its model was built.

A recipe is data from someone else (conversion directories are shared like checkpoints),
so :func:`parse_recipe` checks every field before anything is built, and nothing in it
can run code unless the caller trusts it:

* ``model`` is a timm registry name (``resnet18``, ``resnet18.a1_in1k``). A
  ``package.module:factory`` spec imports and calls code, so it is refused unless
  ``trust_code=True`` (CLI ``--trust-code``), before anything is imported.
* ``model_kwargs`` may not hold keys that make timm read files or the network
  (:data:`UNTRUSTED_KWARG_PATTERNS`: ``pretrained``, ``pretrained_cfg*``,
  ``checkpoint_path``, anything naming a file, path, url, dir, cache, hub or download),
  at any depth, unless trusted.
* The example input is capped at :data:`MAX_INPUT_ELEMENTS` elements, checked before
  it is allocated; the model build is capped at :data:`MAX_MODEL_ELEMENTS` elements
  (see :func:`netsurgeon.models.create_model`).
* ``files`` records the sha256 of ``model.safetensors`` and ``report.md``; :func:`netsurgeon.load`
  refuses weights that do not match unless ``verify=False``.

Example:
    >>> r = parse_recipe({"format": 2, "model": "resnet18", "model_kwargs": {}, "passes": [],
    ...                   "input_shape": [1, 3, 32, 32], "seed": 0, "checkpoint": None, "versions": {},
    ...                   "files": {}})
    >>> r.model, r.input_shape
    ('resnet18', (1, 3, 32, 32))
    >>> parse_recipe(dict(r.to_json(), model="os:system"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    netsurgeon.errors.UntrustedCodeError: recipe names the factory 'os:system': loading it would import ...
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ._validate import printable
from .errors import RecipeError, UntrustedCodeError

__all__ = ["Recipe", "parse_recipe", "read_recipe", "check_input_shape", "check_seed", "check_model_kwargs",
           "RECIPE_VERSION", "READABLE_VERSIONS", "MAX_INPUT_ELEMENTS", "MAX_MODEL_ELEMENTS",
           "MAX_RECIPE_BYTES", "MAX_PASSES", "UNTRUSTED_KWARG_PATTERNS", "MAX_SEED"]

RECIPE_VERSION = 2
"""The format this netsurgeon writes. 2 added ``files`` (sha256 of the weights and report)."""
READABLE_VERSIONS = (1, 2)
MAX_INPUT_ELEMENTS = 1 << 26
"""Largest example input, in elements (67,108,864: 256 MiB in float32, e.g. 1x3x4096x4096 fits)."""
MAX_MODEL_ELEMENTS = 1 << 31
"""Largest total of tensor elements a model build may allocate (about 2.1e9: 8 GiB in float32)."""
MAX_RECIPE_BYTES = 1 << 20
MAX_PASSES = 32
"""Most passes a recipe may list (each may grow the model; their allocations share the build cap)."""
MAX_SEED = (1 << 64) - 1
UNTRUSTED_KWARG_PATTERNS = ("pretrained", "pretrained_cfg*", "checkpoint*", "*file*", "*path*", "*url*", "*dir*",
                            "*cache*", "*hub*", "*download*")
"""``model_kwargs`` keys (at any depth, case-insensitive) refused from an untrusted recipe: each makes
timm (or a factory) read files or the network."""

_FIELDS = ("format", "model", "model_kwargs", "passes", "input_shape", "seed", "checkpoint", "versions", "files")
_V1_FIELDS = tuple(f for f in _FIELDS if f != "files")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIMM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_MAX_DIMS = 8


@dataclass(frozen=True)
class Recipe:
    """A validated ``recipe.json``. ``files`` maps a file name to ``{"sha256": hex, "bytes": n}``."""

    format: int
    model: str
    model_kwargs: dict[str, Any]
    passes: tuple[tuple[str, dict[str, Any]], ...]
    input_shape: tuple[int, ...] | None
    seed: int
    checkpoint: dict[str, str] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_factory(self) -> bool:
        """True when ``model`` is a ``package.module:factory`` spec (importing it runs code)."""
        return ":" in self.model

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "model": self.model, "model_kwargs": self.model_kwargs,
                "passes": [{"name": n, "options": o} for n, o in self.passes],
                "input_shape": list(self.input_shape) if self.input_shape else None, "seed": self.seed,
                "checkpoint": self.checkpoint, "versions": self.versions, "files": self.files}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_seed(seed: Any, where: str = "seed", error: type[Exception] = RecipeError) -> int:
    """``seed`` as an int in ``[0, 2**64 - 1]`` (the range ``torch.manual_seed`` takes)."""
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise error(f"{where} must be a whole number from 0 to 2**64 - 1; got {seed!r}")
    return seed


def check_input_shape(shape: Any, where: str = "input_shape", error: type[Exception] = RecipeError
                      ) -> tuple[int, ...]:
    """``shape`` as a tuple of 1 to 8 positive ints whose product is at most :data:`MAX_INPUT_ELEMENTS`.

    Checked before anything is allocated, so a huge shape from a file or the command line is a
    clear error instead of an exhausted machine.
    """
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= _MAX_DIMS:
        raise error(f"{where} must be a list of 1 to {_MAX_DIMS} positive whole numbers; got {shape!r}")
    if not all(_is_int(v) and v > 0 for v in shape):
        raise error(f"{where} must hold positive whole numbers only; got {list(shape)!r}")
    elements = math.prod(shape)
    if elements > MAX_INPUT_ELEMENTS:
        raise error(f"{where} {'x'.join(map(str, shape))} has {elements:,} elements, more than the "
                          f"{MAX_INPUT_ELEMENTS:,} netsurgeon allows for an example input; use a smaller shape")
    return tuple(shape)


def _denied_keys(value: Any, prefix: str = "") -> list[str]:
    found = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            path = f"{prefix}{k}"
            if any(fnmatch.fnmatch(str(k).lower(), p) for p in UNTRUSTED_KWARG_PATTERNS):
                found.append(path)
            found += _denied_keys(v, path + ".")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _denied_keys(v, f"{prefix}[{i}].")
    return found


def check_model_kwargs(kwargs: Any, trust_code: bool, where: str = "model_kwargs") -> dict[str, Any]:
    """A dict with string keys; untrusted, none of its keys (at any depth) may match
    :data:`UNTRUSTED_KWARG_PATTERNS`."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise RecipeError(f"{where} must be an object with string keys; got {type(kwargs).__name__}")
    denied = _denied_keys(kwargs)
    if denied and not trust_code:
        raise UntrustedCodeError(f"{where} sets {', '.join(map(printable, denied))}, which would make the model factory read files "
                                 f"or the network; refused for an untrusted recipe (pass trust_code=True, CLI "
                                 f"--trust-code, only if you trust where it came from)")
    return kwargs


def _check_model(model: Any, trust_code: bool) -> str:
    if not isinstance(model, str) or not model:
        raise RecipeError(f"recipe field 'model' must be a non-empty string; got {model!r}")
    if ":" in model:
        if not trust_code:
            what = ("the factory" if re.fullmatch(r"[A-Za-z_][\w.]*:[\w.]+", model) else
                    "the model source")  # hf-hub:, local-dir: make timm download or read files
            raise UntrustedCodeError(f"recipe names {what} {model!r}: loading it would import and call code or read "
                                     f"files or the network; refused (pass trust_code=True, CLI --trust-code, only if "
                                     f"you trust where the recipe came from)")
        return model
    if not _TIMM_NAME.fullmatch(model):
        raise RecipeError(f"recipe field 'model' must be a timm model name (letters, digits, '_', '.', '-') or, "
                          f"trusted, 'package.module:factory'; got {model!r}")
    return model


def _check_passes(passes: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    if not isinstance(passes, list):
        raise RecipeError(f"recipe field 'passes' must be a list of {{\"name\", \"options\"}} objects; "
                          f"got {type(passes).__name__}")
    if len(passes) > MAX_PASSES:
        raise RecipeError(f"recipe field 'passes' lists {len(passes)} passes; a recipe holds at most {MAX_PASSES}")
    out = []
    for i, p in enumerate(passes):
        where = f"passes[{i}]"
        if not isinstance(p, dict) or set(p) != {"name", "options"}:
            raise RecipeError(f"recipe field '{where}' must be an object with exactly 'name' and 'options'; got {p!r}")
        if not isinstance(p["name"], str) or not isinstance(p["options"], dict):
            raise RecipeError(f"recipe field '{where}' needs a string 'name' and an object 'options'")
        out.append((p["name"], dict(p["options"])))
    return tuple(out)


def _check_checkpoint(ckpt: Any) -> dict[str, str] | None:
    if ckpt is None:
        return None
    if (not isinstance(ckpt, dict) or set(ckpt) != {"path", "sha256"} or not isinstance(ckpt["path"], str)
            or not isinstance(ckpt["sha256"], str) or not _HEX64.fullmatch(ckpt["sha256"])):
        raise RecipeError("recipe field 'checkpoint' must be null or {\"path\": string, \"sha256\": 64 hex digits}")
    return dict(ckpt)


def _check_files(files: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(files, dict):
        raise RecipeError("recipe field 'files' must be an object mapping file names to {sha256, bytes}")
    for name, entry in files.items():
        if name not in ("model.safetensors", "report.md"):
            raise RecipeError(f"recipe field 'files' names {name!r}; only model.safetensors and report.md are recorded")
        if (not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"} or not isinstance(entry["sha256"], str)
                or not _HEX64.fullmatch(entry["sha256"]) or not _is_int(entry["bytes"]) or entry["bytes"] < 0):
            raise RecipeError(f"recipe field 'files.{name}' must be {{\"sha256\": 64 hex digits, \"bytes\": n}}")
    return files


def parse_recipe(data: Any, trust_code: bool = False) -> Recipe:
    """Validate a decoded ``recipe.json`` field by field.

    Args:
        data: the decoded JSON.
        trust_code: allow a ``package.module:factory`` model and file-reading ``model_kwargs``.

    Raises:
        RecipeError: a missing, unknown, mistyped or out-of-range field (named), or a format newer than
            this netsurgeon reads.
        UntrustedCodeError: the recipe would import code or read files and ``trust_code`` is False.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"recipe must be a JSON object; got a JSON {type(data).__name__}")
    fmt = data.get("format")
    if not _is_int(fmt):
        raise RecipeError(f"recipe field 'format' must be a whole number; got {fmt!r}")
    if fmt > RECIPE_VERSION:
        raise RecipeError(f"recipe format {fmt} was written by a newer netsurgeon (this one reads formats "
                          f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade netsurgeon")
    if fmt not in READABLE_VERSIONS:
        raise RecipeError(f"recipe format {fmt} is not one netsurgeon wrote (readable: "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    expected = _FIELDS if fmt >= 2 else _V1_FIELDS
    unknown = sorted(set(data) - set(expected))
    if unknown:
        raise RecipeError(f"recipe has unknown field(s) {', '.join(map(repr, unknown))} for format {fmt}")
    for name in expected:
        if name not in data:
            raise RecipeError(f"recipe field {name!r} is missing")
    versions = data["versions"]
    if not isinstance(versions, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items()):
        raise RecipeError("recipe field 'versions' must be an object of strings")
    shape = data["input_shape"]
    return Recipe(format=fmt, model=_check_model(data["model"], trust_code),
                  model_kwargs=check_model_kwargs(data["model_kwargs"], trust_code, "recipe field 'model_kwargs'"),
                  passes=_check_passes(data["passes"]),
                  input_shape=None if shape is None else check_input_shape(shape, "recipe field 'input_shape'"),
                  seed=check_seed(data["seed"], "recipe field 'seed'"), checkpoint=_check_checkpoint(data["checkpoint"]),
                  versions=dict(versions), files=_check_files(data["files"]) if fmt >= 2 else {})


def read_recipe(path: str | os.PathLike, trust_code: bool = False) -> Recipe:
    """Read and validate ``path`` (at most :data:`MAX_RECIPE_BYTES`, UTF-8 JSON)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{str(path)!r} is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{str(path)!r} is not UTF-8 text (byte {exc.start}); a recipe is UTF-8 JSON") from None
    except OSError as exc:
        raise RecipeError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{str(path)!r} is not valid JSON: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{str(path)!r} nests too deeply to be a recipe") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise RecipeError(f"{str(path)!r} holds a value JSON cannot give here: {exc}") from None
    return parse_recipe(data, trust_code)
