"""Typed access to what netsurgeon keeps on a GraphModule.

Everything lives under one key of ``gm.meta`` (:data:`META_KEY`); nothing outside this module
reads or writes that dict. Each reader fails with a "run X first" hint, like :func:`op_info`.

* :func:`trace_info` - how the model was traced (:class:`TraceInfo`), written by ``trace``.
* :func:`default_inputs` - the one definition of the example batch used when a caller gives none.
* :func:`derivation` / :func:`set_derivation` - what a pass derived (dks's targets, ...).
* :func:`get_report` / :func:`set_report` - the pass report.
* :func:`nodes_by_name` - the graph's nodes keyed by name.

Example:
    >>> import torch, netsurgeon
    >>> gm = netsurgeon.trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> trace_info(gm).model_class
    'Sequential'
    >>> sorted(nodes_by_name(gm))
    ['_0', '_1', 'input_1', 'output']
    >>> derivation(gm, "dks")
    Traceback (most recent call last):
    ...
    netsurgeon.errors.MissingAnalysisError: Sequential has no 'dks' derivation: run the dks pass first
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from ..errors import InvalidArgumentError, MissingAnalysisError
from ..models import example_inputs
from ..report import Report

__all__ = ["META_KEY", "trace_info", "has_trace", "set_trace_info", "default_inputs", "random_batch", "derivation",
           "set_derivation", "get_report", "has_report", "set_report", "nodes_by_name", "copy_state", "recipe", "set_recipe"]

META_KEY = "netsurgeon"  # the one key under which netsurgeon keeps data in gm.meta
_TRACE, _REPORT = "trace", "report"
_DEFAULT_INPUT_SEED = 0


def _store(gm: fx.GraphModule) -> dict[str, Any]:
    return gm.meta.setdefault(META_KEY, {})


def has_trace(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` came from :func:`netsurgeon.trace`."""
    return _TRACE in gm.meta.get(META_KEY, {})


def trace_info(gm: fx.GraphModule):
    """How ``gm`` was traced (a :class:`~netsurgeon.graph.tracer.TraceInfo`)."""
    try:
        return gm.meta[META_KEY][_TRACE]
    except KeyError:
        raise MissingAnalysisError(f"{type(gm).__name__} was not traced by netsurgeon: run netsurgeon.trace(model) "
                                   f"first") from None


def set_trace_info(gm: fx.GraphModule, info: Any) -> None:
    """Start ``gm``'s state afresh with its trace record (anything stored before is dropped)."""
    gm.meta[META_KEY] = {_TRACE: info}


def default_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...] | None:
    """A standard-normal batch of the traced model's known input shape (timm ``pretrained_cfg``,
    or the example inputs given to ``trace``), drawn from its own generator seeded 0 so that the
    global RNG is untouched and every caller sees the same tensor; None when the shape is unknown."""
    shape = getattr(gm.meta.get(META_KEY, {}).get(_TRACE), "input_shape", None)
    return None if shape is None else (random_batch(shape),)


def random_batch(shape: Sequence[int]) -> torch.Tensor:
    """A standard-normal tensor of ``shape`` from a generator seeded 0 (the global RNG is untouched):
    :func:`netsurgeon.example_inputs`, the one definition."""
    return example_inputs(shape, seed=_DEFAULT_INPUT_SEED)[0]


def derivation(gm: fx.GraphModule, name: str) -> Any:
    """What the pass ``name`` derived on ``gm`` (e.g. dks's targets and constants)."""
    try:
        return gm.meta[META_KEY][name]
    except KeyError:
        raise MissingAnalysisError(f"{type(gm).__name__} has no {name!r} derivation: run the {name} pass "
                                   f"first") from None


def set_derivation(gm: fx.GraphModule, name: str, value: Any) -> None:
    """Store what the pass ``name`` derived (read back with :func:`derivation`)."""
    if name in (_TRACE, _REPORT, "recipe"):
        raise InvalidArgumentError(f"{name!r} is reserved for netsurgeon's own state; store a pass's "
                                   f"derivation under the pass name")
    _store(gm)[name] = value


def get_report(gm: fx.GraphModule, create_for: str | None = None) -> Report:
    """The report stored on ``gm``; creates an empty one when ``create_for`` is given."""
    store = _store(gm)
    if _REPORT not in store:
        if create_for is None:
            raise MissingAnalysisError(f"{type(gm).__name__} has no netsurgeon report: it was not produced by "
                                       f"netsurgeon.transform (or a pass), or it went through torch.save/torch.load, "
                                       f"which drops GraphModule.meta; to keep the report, save with "
                                       f"netsurgeon.convert (report.md, recipe.json) and rebuild with netsurgeon.load")
        store[_REPORT] = Report(model=create_for)
    return store[_REPORT]


def has_report(gm: fx.GraphModule) -> bool:
    return _REPORT in gm.meta.get(META_KEY, {})


def set_report(gm: fx.GraphModule, report: Report) -> None:
    _store(gm)[_REPORT] = report


def copy_state(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Give ``dst`` every entry of ``src``'s state that it lacks (a pass returned a new module)."""
    if dst is src:
        return
    store = _store(dst)
    for k, v in src.meta.get(META_KEY, {}).items():
        store.setdefault(k, v)


def set_recipe(gm: fx.GraphModule, recipe: Any) -> None:
    """Record the recipe ``gm`` was rebuilt from (:func:`netsurgeon.load`)."""
    _store(gm)["recipe"] = recipe


def recipe(gm: fx.GraphModule) -> Any:
    """The :class:`~netsurgeon.recipe.Recipe` ``gm`` was rebuilt from."""
    try:
        return gm.meta[META_KEY]["recipe"]
    except KeyError:
        raise MissingAnalysisError(f"{type(gm).__name__} was not rebuilt from a conversion: use "
                                   f"netsurgeon.load(DIR)") from None


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """``{node.name: node}`` for the graph as it is now (recompute after editing the graph)."""
    return {n.name: n for n in gm.graph.nodes}
