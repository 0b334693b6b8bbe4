"""Running a traced model for a measurement: eval mode that gives every submodule its own flag
back, and errors from unsuitable example inputs turned into :class:`ExampleInputError`."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import ExampleInputError, NetsurgeonError

__all__ = ["eval_mode", "example_run"]


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
