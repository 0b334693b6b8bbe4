"""``rms_norm`` and ``modulus``: the consistency paper's minimal normalization and modulus
units (docs/theory.md §8.3–§8.4)."""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..graph import Topology
from ..graph.state import nodes_by_name
from ..kernels import activation_entry
from ..layers import MinimalRMSNorm, Modulus
from ..ops import NormFamily, OpKind
from ..report import PassRecord, Preservation
from ._edit import replace_with_parts, set_submodule
from .base import Pass, register_pass

__all__ = ["RMSNormPass", "ModulusPass"]


def _relu_family(name: str) -> bool:
    """A rectifier the modulus unit replaces (ReLU, leaky ReLU, PReLU, ReLU6): the activation
    registry's ``relu_family`` trait."""
    entry = activation_entry(name)
    return entry is not None and entry.relu_family


@register_pass
@dataclasses.dataclass
class RMSNormPass(Pass):
    """Every batch norm becomes :class:`~netsurgeon.layers.MinimalRMSNorm` (division by a
    moving-average scalar RMS; no centering, no affine). A norm+act composite keeps its
    activation after the new norm.

    Options:
        momentum: weight of the new batch in the moving average, in [0, 1]. Default: 0.1.
    """

    name = "rms_norm"
    summary = "replace batch norms by the minimal RMS normalization (moving-average scalar RMS, no affine)"
    preserves = Preservation.NONE

    momentum: float = 0.1

    def validate(self) -> None:
        super().validate()
        self._require("momentum", 0.0 <= self.momentum <= 1.0, "lie in [0, 1]")

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        topo = Topology(gm)
        nodes = nodes_by_name(gm)
        done: set[str] = set()
        for name in topo.nodes_of(OpKind.NORM):
            spec = topo.info(name).norm
            node = nodes[name]
            if spec is None or spec.family is not NormFamily.BATCH:
                continue
            if node.op != "call_module":
                record.skip(name, "functional batch norm: no module to replace")
                continue
            if node.target in done:
                continue
            done.add(node.target)
            m = gm.get_submodule(node.target)
            new = MinimalRMSNorm(self.momentum, float(getattr(m, "eps", 1e-5)))
            if spec.composite:
                parts = [("norm", new)] + [(n, c) for n, c in m.named_children() if n in ("drop", "act")]
                replace_with_parts(gm, node, node.args[0], parts)
                record.change(name, f"{type(m).__name__} -> MinimalRMSNorm + its activation")
            else:
                set_submodule(gm, node.target, new)
                record.change(name, f"{type(m).__name__} -> MinimalRMSNorm")
        if not done:
            record.note("no batch norm module in the model")
        return gm


@register_pass
@dataclasses.dataclass
class ModulusPass(Pass):
    """ReLU-family activations become the modulus unit ``|x|``."""

    name = "modulus"
    summary = "replace ReLU-family activations by the modulus unit |x|"
    preserves = Preservation.NONE

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        topo = Topology(gm)
        nodes = nodes_by_name(gm)
        count = 0
        for name in topo.nodes_of(OpKind.ACTIVATION):
            spec = topo.info(name).activation
            if spec is None or not _relu_family(spec.name):
                continue
            node = nodes[name]
            path = f"ns_modulus_{count}"
            gm.add_module(path, Modulus())
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(path, (node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            record.change(name, f"{spec} -> |x|")
            count += 1
        for name in topo.nodes_of(OpKind.NORM):
            act = topo.info(name).norm.activation if topo.info(name).norm is not None else None
            if act is not None and _relu_family(act.name):
                record.skip(name, f"{act.name} inside the norm+act composite; run strip_bn or rms_norm first")
        if not count:
            record.note("no ReLU-family activation")
        return gm
