"""Running a traced model for a measurement: eval mode that gives every submodule its own flag
back, errors from unsuitable example inputs turned into :class:`ExampleInputError`, NaN/inf in
inputs or weights named before a run is compared, and shape propagation that raises without
printing."""
from __future__ import annotations

import contextlib
import traceback
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .._validate import non_finite, short_list
from ..errors import ExampleInputError, InvalidArgumentError, NetsurgeonError

__all__ = ["eval_mode", "example_run", "factories_traced", "has_proxy", "TORCH_FACTORIES", "propagate_shapes",
           "require_finite", "outputs_match", "overflow_error", "run_recording_shapes", "shapes_current", "user_line"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block, then restore each submodule's own train/eval
    flag (``module.train(was)`` would flatten mixed modes, such as a frozen batch norm in a
    model being fine-tuned, and traced modules share their submodules with the input model)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def user_line() -> str:
    """``file:line: code`` of the innermost frame outside torch and ``netsurgeon.graph``: the
    line of the model that a tracing decision was made for."""
    user = [f for f in traceback.extract_stack() if "/torch/" not in f.filename
            and "netsurgeon/graph" not in f.filename]
    return f"{user[-1].filename}:{user[-1].lineno}: {user[-1].line}" if user else "unknown line"


def _describe(inputs: Any) -> str:
    leaves = torch.utils._pytree.tree_leaves(inputs)
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, torch.Tensor)
                     else type(t).__name__ for t in leaves) or "none"


@contextlib.contextmanager
def example_run(what: str, inputs: Sequence[Any]) -> Iterator[None]:
    """Turn an error raised while running ``what`` on the example ``inputs`` into an
    :class:`ExampleInputError` that shows the input shapes and torch's message (chained)."""
    try:
        yield
    except NetsurgeonError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        cause = exc.__cause__ if exc.__cause__ is not None and "ShapeProp error" in str(exc) else exc
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ExampleInputError(f"{what} cannot run on the example inputs ({_describe(inputs)}): "
                                f"{type(cause).__name__}: {first}. Pass inputs of the shape and dtype the model "
                                f"expects (example_inputs=..., or --input-shape in the CLI)") from exc


class _ShapeRecorder(fx.Interpreter):
    """``torch.fx.passes.shape_prop.ShapeProp`` without its ``traceback.print_exc()``: a node
    that fails raises (with fx's "While executing" note) and prints nothing."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


_SHAPES_FOR = "ns_shapes_for"  # gm.meta key: what the recorded node shapes were recorded for


def _shape_key(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple:
    """What node shapes depend on: the code, every module's type and settings (``extra_repr``:
    channels, kernel sizes, strides), every parameter's and buffer's shape and dtype, and the
    inputs' shapes and dtypes. A pass that changes any of them invalidates recorded shapes."""
    modules = tuple((name, type(m).__qualname__, m.extra_repr()) for name, m in gm.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in gm.named_parameters()) + \
        tuple((name, tuple(t.shape), t.dtype) for name, t in gm.named_buffers())
    args = tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t)
                 for t in torch.utils._pytree.tree_leaves(tuple(inputs)))
    return gm.code, modules, tensors, args


def shapes_current(gm: fx.GraphModule, inputs: Sequence[Any]) -> bool:
    """Whether every node's recorded shape comes from a run of this very graph, modules and
    weights' shapes on inputs of these shapes (:func:`propagate_shapes`, :func:`run_recording_shapes`)."""
    return gm.meta.get(_SHAPES_FOR) == _shape_key(gm, inputs)


def run_recording_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> Any:
    """``gm(*inputs)`` (as called: the caller sets the mode and grad) through an interpreter that
    writes ``node.meta["tensor_meta"]`` on every tensor-valued node, and remembers what for, so that
    a topology of the same graph on inputs of the same shapes needs no run of its own."""
    inputs = tuple(inputs)
    key = _shape_key(gm, inputs)
    gm.meta.pop(_SHAPES_FOR, None)
    out = _ShapeRecorder(gm).run(*inputs)
    gm.meta[_SHAPES_FOR] = key
    return out


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Run ``gm`` on ``inputs`` in eval mode, without grad, writing ``node.meta["tensor_meta"]``
    (as ``ShapeProp`` does) on every tensor-valued node; nothing runs when the shapes recorded
    are current (:func:`shapes_current`: the trace's own check against eager records them).

    Raises:
        ExampleInputError: ``gm`` cannot run on ``inputs``; the only output is the exception.
    """
    inputs = tuple(inputs)
    if shapes_current(gm, inputs):
        return
    with eval_mode(gm), torch.no_grad(), example_run(gm.__class__.__name__, inputs):
        run_recording_shapes(gm, inputs)


def require_finite(what: str, model: nn.Module, inputs: Sequence[Any]) -> None:
    """Name NaN/inf in the example ``inputs`` or the weights of ``model`` before a run whose outputs
    are compared (NaN never equals itself, so such a run would look like a tracing error).

    Parameters are checked for NaN and inf, buffers for NaN only: ``-inf`` is a legitimate
    value of attention-mask buffers.

    Raises:
        ExampleInputError: an input holds NaN or inf (names which, with counts).
        InvalidArgumentError: a parameter or buffer holds them (state-dict names, with counts).
    """
    leaves = [t for t in torch.utils._pytree.tree_leaves(tuple(inputs)) if isinstance(t, torch.Tensor)]
    bad = non_finite((f"input {i} of shape {tuple(t.shape)}", t) for i, t in enumerate(leaves))
    if bad:
        raise ExampleInputError(f"the example inputs of {what} hold NaN or inf: {short_list(bad)}; pass finite "
                                f"inputs (the trace is checked by comparing outputs on them)")
    bad = non_finite(model.named_parameters()) + non_finite(model.named_buffers(), nan_only=True)
    if bad:
        raise InvalidArgumentError(f"{what} has NaN or inf in {len(bad)} parameter/buffer tensor(s): "
                                   f"{short_list(bad)}; load finite weights (a diverged training run or a "
                                   f"corrupt checkpoint?)")


def outputs_match(ref: Any, out: Any) -> bool:
    """Whether two outputs hold the same tensors, NaN matching NaN (``torch.equal`` says no)."""
    ref_t = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    out_t = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if len(ref_t) != len(out_t):
        return False
    for r, o in zip(ref_t, out_t):
        if r.shape != o.shape:
            return False
        if r.dtype == o.dtype and (r.is_floating_point() or r.is_complex()):
            if not bool(torch.isclose(r, o, rtol=0.0, atol=0.0, equal_nan=True).all()):
                return False
        elif not torch.equal(r, o):
            return False
    return True


def overflow_error(what: str, model: nn.Module, ref: Any, out: Any) -> ExampleInputError | None:
    """The error for outputs that differ where they hold NaN/inf (``require_finite`` passed, so the
    run itself produced them), or None when both are finite."""
    def count(x: Any) -> int:
        return sum(int((~torch.isfinite(t)).sum()) for t in torch.utils._pytree.tree_leaves(x)
                   if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()))

    bad_ref, bad_out = count(ref), count(out)
    if not (bad_ref or bad_out):
        return None
    inf_buffers = non_finite(model.named_buffers())
    buffers = f", buffers holding inf: {short_list(inf_buffers)}" if inf_buffers else ""
    return ExampleInputError(f"{what} gives NaN or inf on the example inputs ({bad_ref} value(s) in the eager "
                             f"outputs, {bad_out} in the traced ones), so the trace cannot be checked against "
                             f"it; inputs and parameters are finite{buffers}: the model overflows on these "
                             f"inputs; pass inputs of the scale and dtype it expects")


# torch functions whose argument parser rejects proxies before ``__torch_function__`` is consulted
# (``torch.ones(x.shape[0], n)``, ``torch.finfo(x.dtype)``): recorded as nodes while tracing
TORCH_FACTORIES = ("arange", "ones", "zeros", "full", "empty", "eye", "tensor", "as_tensor", "finfo", "iinfo")


def has_proxy(obj: Any) -> bool:
    found = False

    def look(x: Any) -> Any:
        nonlocal found
        found = found or isinstance(x, fx.Proxy)
        return x

    fx.node.map_aggregate(obj, look)
    return found


@contextlib.contextmanager
def factories_traced(tracer: fx.Tracer) -> Iterator[None]:
    """``torch.<factory>`` called with a proxy among its arguments becomes a node (its target the
    original function), as ``fx.wrap`` does for module-level functions: ``torch.ones(x.shape[0], n)``
    (Hugging Face attention masks, Gemma 4's patch grid) fails in torch's argument parser otherwise."""
    originals = {name: getattr(torch, name) for name in TORCH_FACTORIES if hasattr(torch, name)}

    def wrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
        def factory(*args: Any, **kwargs: Any) -> Any:
            if has_proxy((args, kwargs)):
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)
        return factory

    for name, fn in originals.items():
        setattr(torch, name, wrapped(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
