"""The one pass runner: apply a pass, then lint, dead-code elimination, recompile, re-classify,
and store its record in the report. Imports nothing above the passes package.

A failure inside a pass keeps its type: an :class:`~netsurgeon.errors.UnsupportedNodeError`
raised by a pass reaches the caller as an instance of both that class and
:class:`~netsurgeon.errors.PassError`, with the pass context added to its message (as einops
adds the pattern to its errors), so ``except UnsupportedNodeError`` and ``except PassError``
both work. Errors that are not netsurgeon's (a bug, a torch error) become a plain
:class:`PassError` chained to the original.

Example:
    >>> import torch, netsurgeon
    >>> from netsurgeon.errors import PassError, UnsupportedNodeError
    >>> try:
    ...     netsurgeon.transform(torch.nn.Linear(2, 2), ["dks"])
    ... except UnsupportedNodeError as e:
    ...     print(isinstance(e, PassError), str(e).split(":")[0])
    True pass 'dks' failed (passes run before it
"""
from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

import torch
import torch.fx as fx

from ..errors import NetsurgeonError, PassError, PassOptionError
from ..graph.state import copy_state, get_report, has_trace, set_report, trace_info
from ..graph.topology import classify_nodes
from ..ops import is_inplace
from ..report import PassRecord, Preservation

__all__ = ["apply_pass", "cleanup", "as_inputs", "in_pass_context", "PassLike"]

class PassLike(Protocol):
    """What the runner needs of a pass (:class:`netsurgeon.passes.Pass` provides it)."""

    name: str

    def options(self) -> dict[str, Any]: ...

    def preservation(self) -> Preservation: ...

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule: ...


def _is_impure(node: fx.Node) -> bool:
    """DCE guard: fx treats ``x.add_(y)`` with an unused result as dead; it is not."""
    return is_inplace(node) or node.is_impure()


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint, eliminate dead code (keeping in-place ops), drop unused submodules, recompile,
    and classify every node again (a pass may have swapped the module behind a node)."""
    gm.graph.lint()
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.delete_all_unused_submodules()
    gm.recompile()
    classify_nodes(gm)
    return gm


def as_inputs(example_inputs: Sequence[torch.Tensor] | torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
    """``example_inputs`` as a tuple (a lone tensor is wrapped), or None."""
    if example_inputs is None:
        return None
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


_CONTEXT_CLASSES: dict[type, type] = {}


def _with_pass_error(cls: type[NetsurgeonError]) -> type:
    """``cls`` that is also a :class:`PassError` (one class per original type, made once; its
    instances pickle, e.g. across multiprocessing workers, by rebuilding through this function)."""
    if cls not in _CONTEXT_CLASSES:
        def reduce(self: BaseException) -> tuple:
            return _rebuild, (cls, self.args, dict(self.__dict__))

        _CONTEXT_CLASSES[cls] = type(cls.__name__, (cls, PassError), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__reduce__": reduce})
    return _CONTEXT_CLASSES[cls]


def _rebuild(cls: type[NetsurgeonError], args: tuple, state: dict) -> BaseException:
    """Unpickle an error made by :func:`in_pass_context`."""
    combined = _with_pass_error(cls)
    err = combined.__new__(combined)
    err.args = args
    err.__dict__.update(state)
    return err


def in_pass_context(exc: BaseException, name: str, previous: Sequence[str]) -> PassError:
    """The error to raise for ``exc`` escaping pass ``name``: its own type plus :class:`PassError`,
    the message prefixed with the pass and the passes before it, ``nodes``/``details`` kept."""
    context = f"pass {name!r} failed (passes run before it: {', '.join(previous) if previous else 'none'})"
    if isinstance(exc, NetsurgeonError) and not isinstance(exc, PassError):
        cls = _with_pass_error(type(exc))
        new = cls.__new__(cls)
        new.__dict__.update(exc.__dict__)
        new.args = (f"{context}: {exc}",)
        new.nodes = tuple(getattr(exc, "nodes", ()))
        new.details = tuple(getattr(exc, "details", ()))
        new.pass_name = name
        return new
    if isinstance(exc, PassError):
        return exc
    err = PassError(f"{context}: {type(exc).__name__}: {exc}")
    err.pass_name = name
    return err


def apply_pass(gm: fx.GraphModule, p: PassLike, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
               *, previous: Sequence[str] = ()) -> fx.GraphModule:
    """Run one pass on a netsurgeon GraphModule, record it in the report, clean up.

    Raises:
        PassOptionError: an option value the model or its inputs rule out (``input_norm.dim`` beyond
            the input's dims), as the pass raised it.
        PassError: any other failure; names the pass and ``previous``, keeps the original's type
            (see the module docstring), chains it (``__cause__``) and keeps its ``nodes`` and ``details``.
    """
    rep = get_report(gm, create_for=trace_info(gm).model_class if has_trace(gm) else type(gm).__name__)
    record = PassRecord(p.name, p.options(), p.preservation())
    start = time.perf_counter()
    try:
        out = p.run(gm, record, as_inputs(example_inputs))
        if not isinstance(out, fx.GraphModule):
            raise PassError(f"pass {p.name} returned {type(out).__name__}, not a GraphModule")
        out = cleanup(out)
    except PassOptionError:
        raise  # the message names the pass, the option and its value already
    except Exception as exc:
        raise in_pass_context(exc, p.name, previous) from exc
    record.seconds = time.perf_counter() - start
    rep.passes.append(record)
    set_report(out, rep)
    copy_state(gm, out)
    return out
