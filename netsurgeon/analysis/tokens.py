"""Token inputs: where a model's signal starts at an embedding lookup (docs/theory.md §3.10).

A language model's input is a sequence of token ids, which have no cosine. Its signal begins
at the embedding lookup ``E[ids]``: the analysis takes the looked-up rows of the input pair as
Gaussian features with the table's mean square ``q = mean(E²)`` and the pair cosine ``c_in``
(the rows of a random table are independent, so two different tokens give c = 0 and the same
token c = 1; ``c_in`` interpolates). The rule is approximate for that reason. Position
embeddings looked up from ``arange`` are constants, added as a shift (:mod:`.affine`).

Measured nodes downstream get Gaussian pairs injected at these lookups instead of token ids
(:func:`embedding_sources` names them for the engine).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .rules import APPROX, KERNEL_RULES, KernelContext, NodeKernel

__all__ = ["TOKEN_REASON", "embedding_sources", "integer_inputs"]

TOKEN_REASON = "token embeddings taken as Gaussian features with the table's mean square and cosine c_in"


def _embedding_rule(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """A lookup of integer ids: a source with ``q = mean(E²)`` and ``k = c q`` over the grid."""
    m = ctx.module
    if m is None or not inputs:
        return None
    q = float(m.weight.detach().double().pow(2).mean())  # a padding row (zeros) counts like the others
    grid = np.linspace(-1.0, 1.0, len(inputs[0].k))
    q_in = inputs[0].q if inputs[0].q > 0 else 1.0
    return NodeKernel(q, q, q * grid, q / q_in, APPROX, TOKEN_REASON)


KERNEL_RULES.add(nn.Embedding, _embedding_rule)


def integer_inputs(example_inputs: tuple[torch.Tensor, ...] | None) -> bool:
    """True when the model's first input holds integers (token ids)."""
    return bool(example_inputs) and isinstance(example_inputs[0], torch.Tensor) \
        and not example_inputs[0].is_floating_point() and not example_inputs[0].is_complex()


def embedding_sources(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``nn.Embedding`` calls whose ids come from a placeholder (through reshapes): where the
    signal of a token model starts."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Embedding):
            continue
        src = node.args[0] if node.args else None
        while isinstance(src, fx.Node) and src.op != "placeholder" and src.op in ("call_method", "call_function") \
                and getattr(src.target, "__name__", src.target) in ("view", "reshape", "long", "to", "contiguous",
                                                                    "flatten", "getitem"):
            src = src.args[0]
        if isinstance(src, fx.Node) and src.op == "placeholder":
            out.append(node)
    return out
