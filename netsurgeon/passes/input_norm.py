"""``input_norm``: a :class:`~netsurgeon.layers.LocationNorm` after every tensor input, so that
``q = 1`` at every input location (Deep Kernel Shaping's input normalization, docs/theory.md §4.7).

Token ids have no scale to normalize: a language model's signal starts at its embedding lookup,
so there the norm goes over the features (the last axis) of each token, after the lookup and the
embeddings added to it (positions, token types) and dropout: once, where the kernel theory starts.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PassOptionError
from ..graph import Topology
from ..analysis.tokens import embedding_sources
from ..graph.running import eval_mode
from ..graph.state import has_trace, trace_info
from ..layers import LocationNorm
from ..report import PassRecord, Preservation
from .base import Pass, register_pass

__all__ = ["InputNorm"]


@register_pass
@dataclasses.dataclass
class InputNorm(Pass):
    """Insert a :class:`~netsurgeon.layers.LocationNorm` right after every tensor input.

    Each location's channel vector is scaled to norm ``sqrt(channels)``, so ``q = 1`` at
    every input location (DKS, docs/theory.md §4.7). The op registry classifies the module as
    an RMS norm without gain, which the analysis maps to ``q = 1``, ``c`` unchanged.

    Args:
        dim: the channel dimension of the inputs; ``-1`` for channels-last. An input that has
            no such dimension (in its example, or the model's default input shape) is an error,
            not a skip. Default: 1.
        eps: added to the per-location mean square; positive, so that an all-zero
            location gives 0 rather than 0/0. Default: 1e-6.
    """

    name = "input_norm"
    summary = "normalize every input location's channel vector to norm sqrt(channels) (q = 1)"
    preserves = Preservation.NONE
    dim: int = 1
    eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        self._require("eps", 0.0 < self.eps < math.inf, "be positive and finite")

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        topo = Topology(gm)
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        targets = []
        for i, node in enumerate(inputs):
            example = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
            why = self._obstacle(node, topo, example)
            if why is None:
                self._check_dim(gm, node, i, example, example_inputs is not None)
                targets.append(node)
            else:
                record.skip(node.name, why)
        tokens = [self._token_start(gm, topo, e) for e in embedding_sources(gm)] \
            if any(self._is_ids(n, i, example_inputs) for i, n in enumerate(inputs)) else []
        scales = _mean_squares(gm, tokens, example_inputs) if tokens else {}
        for node in dict.fromkeys(tokens):
            path = _free_attr(gm, "input_norm")
            # eps relative to the embeddings' mean square (tables are often initialized with std 0.02)
            eps = self.eps * scales.get(node, 1.0)
            gm.add_submodule(path, LocationNorm(-1, eps))
            with gm.graph.inserting_after(node):
                norm = gm.graph.call_module(path, (node,))
            node.replace_all_uses_with(norm, delete_user_cb=lambda user: user is not norm)
            record.change(node.name, f"inserted {path} = LocationNorm(dim=-1, eps={eps:.3g}) after the token "
                                     f"embeddings (eps = {self.eps:g} x their mean square)",
                          "q = 1 at every token, where a token model's signal starts")
        for node in targets:
            path = _free_attr(gm, "input_norm" if len(targets) == 1 else f"input_norm_{node.name}")
            gm.add_submodule(path, LocationNorm(self.dim, self.eps))
            with gm.graph.inserting_before(first):
                norm = gm.graph.call_module(path, (node,))
            node.replace_all_uses_with(norm, delete_user_cb=lambda user: user is not norm)
            record.change(node.name, f"inserted {path} = LocationNorm(dim={self.dim}, eps={self.eps:g})",
                          "q = 1 at every input location")
        return gm

    @staticmethod
    def _is_ids(node: fx.Node, i: int, example_inputs: tuple[torch.Tensor, ...] | None) -> bool:
        example = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
        return example is not None and not example.is_floating_point() and not example.is_complex()

    @staticmethod
    def _token_start(gm: fx.GraphModule, topo: Topology, lookup: fx.Node) -> fx.Node:
        """The last node of ``lookup`` + constant embeddings (positions, token types) + dropout/casts."""
        signal = lambda n: isinstance(n, fx.Node) and topo.graph.nodes[n.name]["signal"]  # noqa: E731
        cur = lookup
        while len(cur.users) == 1:
            u = next(iter(cur.users))
            others = [a for a in u.all_input_nodes if a is not cur]
            adds = u.op == "call_function" and u.target in (operator.add, torch.add) and not any(map(signal, others))
            drop = u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.Dropout)
            cast = u.op == "call_method" and u.target in ("to", "contiguous", "float")
            if not (adds or drop or cast):
                break
            cur = u
        return cur

    def _obstacle(self, node: fx.Node, topo: Topology, example: torch.Tensor | None) -> str | None:
        if not topo.graph.nodes[node.name]["signal"]:
            return f"not a tensor input (default {node.args[0]!r})"
        if not node.users:
            return "input not used"
        if all(u.op == "call_module" and isinstance(topo.gm.get_submodule(u.target), LocationNorm)
               for u in node.users):
            return "already followed by a LocationNorm"
        if example is not None and not example.is_floating_point():
            return f"example input has dtype {example.dtype} (indices, not features)"
        return None

    def _check_dim(self, gm: fx.GraphModule, node: fx.Node, index: int, example: torch.Tensor | None,
                   given: bool) -> None:
        """Raise :class:`PassOptionError` when the input has no dimension ``dim``: the option cannot
        apply, which skipping would hide (the norm would be missing, or fail at the first call)."""
        if example is not None:
            shape, source = tuple(example.shape), "example input"
        else:
            shape = trace_info(gm).input_shape if has_trace(gm) and index == 0 and not given else None
            source = "default input shape"
        if shape is not None and not -len(shape) <= self.dim < len(shape):
            raise PassOptionError(f"{self.name}.dim={self.dim!r} does not apply to input {node.name!r}: its "
                                  f"{source} {shape} has {len(shape)} dims, so dim must lie in "
                                  f"[{-len(shape)}, {len(shape) - 1}]")


def _mean_squares(gm: fx.GraphModule, nodes: list[fx.Node], inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, float]:
    """The mean square of each node's value on the example inputs (one eval-mode run)."""
    wanted, out = set(nodes), {}

    class _Reader(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            value = super().run_node(n)
            if n in wanted and isinstance(value, torch.Tensor) and value.is_floating_point():
                out[n] = max(float(value.detach().double().pow(2).mean()), 1e-30)
            return value

    with eval_mode(gm), torch.no_grad():
        _Reader(gm).run(*inputs)
    return out


def _free_attr(gm: nn.Module, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... when taken."""
    candidate, i = name, 0
    while hasattr(gm, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate
