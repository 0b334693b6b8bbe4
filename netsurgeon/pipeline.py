"""``transform``: trace a model, then run passes, each followed by lint, DCE and recompile.

Example:
    >>> import timm, torch, netsurgeon
    >>> gm = netsurgeon.transform(timm.create_model("resnet18"), passes=["strip_bn"])
    >>> sum(isinstance(m, torch.nn.BatchNorm2d) for m in gm.modules())
    0
"""
from __future__ import annotations

import copy
import operator
import time
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ._validate import require_bool
from .errors import InvalidArgumentError, NetsurgeonError, PassError, PassOptionError
from .graph import META_KEY, Topology, trace
from .passes.base import Pass, PassSpec, get_report, make_pass
from .report import PassRecord, Report

__all__ = ["transform", "apply_pass", "report", "cleanup"]

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem,
                      operator.ior, operator.iand}


def _is_impure(node: fx.Node) -> bool:
    """DCE guard: fx treats ``x.add_(y)`` with an unused result as dead; it is not."""
    if node.op == "call_method" and isinstance(node.target, str):
        t = node.target
        if t.endswith("_") and not t.endswith("__"):
            return True
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
    return node.is_impure()


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint, eliminate dead code (keeping in-place ops), drop unused submodules, recompile,
    and classify every node again (a pass may have swapped the module behind a node)."""
    gm.graph.lint()
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.delete_all_unused_submodules()
    gm.recompile()
    Topology(gm)  # refreshes op_info(node) on every node
    return gm


def _inputs(example_inputs: Sequence[torch.Tensor] | torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
    if example_inputs is None:
        return None
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def apply_pass(gm: fx.GraphModule, p: Pass, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
               *, previous: Sequence[str] = ()) -> fx.GraphModule:
    """Run one pass on a netsurgeon GraphModule, record it in the report, clean up.

    Raises:
        PassOptionError: an option value the model or its inputs rule out (``input_norm.dim`` beyond
            the input's dims), as the pass raised it.
        PassError: any other failure; names the pass and ``previous``, chains the original error
            (``__cause__``) and copies its ``nodes`` and ``details`` when it has them.
    """
    rep = get_report(gm, create_for=gm.meta.get(META_KEY, {}).get("trace").model_class
                     if gm.meta.get(META_KEY, {}).get("trace") else type(gm).__name__)
    record = PassRecord(p.name, p.options(), p.preservation())
    start = time.perf_counter()
    try:
        out = p.run(gm, record, _inputs(example_inputs))
        if not isinstance(out, fx.GraphModule):
            raise PassError(f"pass {p.name} returned {type(out).__name__}, not a GraphModule")
        out = cleanup(out)
    except PassOptionError:
        raise  # the message names the pass, the option and its value already
    except Exception as exc:
        before = ", ".join(previous) if previous else "none"
        ours = isinstance(exc, NetsurgeonError)
        msg = str(exc) if ours else f"{type(exc).__name__}: {exc}"
        raise PassError(f"pass {p.name!r} failed (passes run before it: {before}): {msg}",
                        nodes=getattr(exc, "nodes", ()) if ours else (),
                        details=getattr(exc, "details", ()) if ours else ()) from exc
    record.seconds = time.perf_counter() - start
    rep.passes.append(record)
    out.meta.setdefault(META_KEY, {})["report"] = rep
    if out is not gm:
        for k, v in gm.meta.get(META_KEY, {}).items():
            out.meta[META_KEY].setdefault(k, v)
    return out


def transform(model: nn.Module, passes: Sequence[PassSpec] = (), example_inputs: Sequence[torch.Tensor]
              | torch.Tensor | None = None, inplace: bool = False, leaf_modules: Sequence[str] = (),
              concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` and apply ``passes`` in order.

    Args:
        model: any ``nn.Module`` (or a GraphModule from an earlier transform).
        passes: each a name (``"strip_bn"``), ``(name, {options})`` or a Pass instance.
        example_inputs: inputs some passes need for shapes; also used to check the trace.
        inplace: when False (default) the model is deep-copied first and never mutated.
        leaf_modules: submodule paths to keep opaque when tracing (see :func:`netsurgeon.trace`).
        concrete_args: values of ``forward`` arguments that drive control flow, fixed for the trace
            (see :func:`netsurgeon.trace`).

    Returns:
        A ``torch.fx.GraphModule``; :func:`report` gives what each pass did.

    Raises:
        InvalidArgumentError: ``passes`` is not a list of pass specs (e.g. None or a dict).
        InvalidArgumentError: ``inplace`` is not a bool.
        UnknownPassError, PassOptionError: a bad pass spec (before anything runs), or an option value
            the model's inputs rule out (when that pass runs).
        TraceError: the model cannot be traced.
        PassError: a pass failed; names the pass and those that ran before it (``nodes`` and
            ``details`` list the nodes it could not handle, if any).
    """
    if isinstance(passes, (str, Pass)) or (isinstance(passes, tuple) and len(passes) == 2
                                           and isinstance(passes[0], str) and isinstance(passes[1], dict)):
        passes = [passes]
    if not isinstance(passes, Iterable) or isinstance(passes, Mapping):
        raise InvalidArgumentError(f"passes must be a list of pass names, (name, {{options}}) pairs or Pass "
                                   f"instances, e.g. ['strip_bn', ('normalize_sums', {{'shortcut_weight2': 0.8}})]; "
                                   f"got {passes!r}")
    require_bool("transform", "inplace", inplace)
    instances = [make_pass(s) for s in passes]  # validate every spec before any work
    if not inplace:
        model = copy.deepcopy(model)
    gm = trace(model, _inputs(example_inputs), leaf_modules=leaf_modules, concrete_args=concrete_args)
    info = gm.meta[META_KEY]["trace"]
    rep = gm.meta[META_KEY].get("report")
    if rep is None:
        rep = Report(model=info.model_class)
        if info.auto_leaves:
            rep.trace_notes.append("kept as leaves (their code reads self.training): " + ", ".join(info.auto_leaves))
        if info.specialized:
            rep.trace_notes.append("control flow decided on the example inputs (the module is specialized to "
                                   "inputs that take the same branches): " + "; ".join(info.specialized))
        if info.mode_dropouts:
            rep.trace_notes.append("functional dropout made mode-aware: " + ", ".join(info.mode_dropouts))
        gm.meta[META_KEY]["report"] = rep
    done = [p.name for p in rep.passes]
    for p in instances:
        gm = apply_pass(gm, p, example_inputs, previous=done)
        done.append(p.name)
    return gm


def report(gm: fx.GraphModule) -> Report:
    """The report of every pass applied to ``gm`` (see :class:`netsurgeon.report.Report`)."""
    return get_report(gm)
