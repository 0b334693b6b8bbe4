"""``transform``: trace a model, then run passes, each followed by lint, DCE and recompile.

Example:
    >>> import timm, torch, netsurgeon
    >>> gm = netsurgeon.transform(timm.create_model("resnet18"), passes=["strip_bn"])
    >>> sum(isinstance(m, torch.nn.BatchNorm2d) for m in gm.modules())
    0
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ._validate import require_bool
from .errors import InvalidArgumentError
from .graph import trace
from .graph.state import get_report, has_report, set_report, trace_info
from .passes.base import Pass, PassSpec, make_pass
from .passes.runner import apply_pass, as_inputs, cleanup
from .report import Report

__all__ = ["transform", "apply_pass", "report", "cleanup"]


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
    gm = trace(model, as_inputs(example_inputs), leaf_modules=leaf_modules, concrete_args=concrete_args)
    info = trace_info(gm)
    if not has_report(gm):
        rep = Report(model=info.model_class)
        if info.auto_leaves:
            rep.trace_notes.append("kept as leaves (their code reads self.training, or timm marks them not "
                                   "traceable): " + ", ".join(info.auto_leaves))
        if info.untraceable_leaves:
            rep.trace_notes.append("kept as leaves because tracing failed inside them (they run their own code; "
                                   "analyses treat them as opaque ops): " + "; ".join(info.untraceable_leaves))
        if info.specialized:
            rep.trace_notes.append("control flow decided on the example inputs (the module is specialized to "
                                   "inputs that take the same branches): " + "; ".join(info.specialized))
        if info.mode_dropouts:
            rep.trace_notes.append("functional dropout made mode-aware: " + ", ".join(info.mode_dropouts))
        set_report(gm, rep)
    rep = get_report(gm)
    done = [p.name for p in rep.passes]
    for p in instances:
        gm = apply_pass(gm, p, example_inputs, previous=done)
        done.append(p.name)
    return gm


def report(gm: fx.GraphModule) -> Report:
    """The report of every pass applied to ``gm`` (see :class:`netsurgeon.report.Report`)."""
    return get_report(gm)
