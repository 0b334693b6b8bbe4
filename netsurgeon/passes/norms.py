"""``remove_norms``: delete per-example normalization layers (LayerNorm, RMSNorm; GroupNorm on request).

The normalization-free transformer of He et al. (arXiv:2302.10322) keeps no LayerNorm: with
every sum weighted (``normalize_sums``) or every skip removed (``remove_skips``), orthogonal
weights and reshaped activations, q stays 1 without them (docs/theory.md §3). This pass is to
per-example norms what ``strip_bn(mode="remove")`` is to batch norms:

- a norm module (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, timm's ``LayerNorm2d``,
  ``RmsNorm``...) is bypassed, its affine gain and bias with it (at initialization they are 1
  and 0); a norm+activation composite (timm ``LayerNormAct2d``, ``GroupNormAct``) keeps its
  dropout and activation under its own path;
- a functional ``F.layer_norm`` / ``F.rms_norm`` / ``F.group_norm`` is bypassed too;
- batch norms are left to ``strip_bn``, and any other norm family is left and reported.

Each removal is reported by node. The network then sees its inputs' scale: run ``input_norm``
(q = 1 at the input, where the kernel theory starts) before the shaping passes.
"""
from __future__ import annotations

import dataclasses
import torch
import torch.fx as fx

from ..graph import Topology, op_info
from ..ops import NormFamily, OpKind
from ..report import PassRecord, Preservation
from ._edit import bypass, composite_parts, replace_with_parts
from .base import Pass, register_pass

__all__ = ["RemoveNorms"]

_FAMILIES = {str(f): f for f in (NormFamily.LAYER, NormFamily.RMS, NormFamily.GROUP, NormFamily.INSTANCE)}


@register_pass
@dataclasses.dataclass
class RemoveNorms(Pass):
    """Delete per-example normalization layers for a normalization-free network.

    Options:
        families: the norm families to remove, among ``"layer"``, ``"rms"``, ``"group"`` and
            ``"instance"``. Default: ``("layer", "rms")``, the norms of transformers.
    """

    name = "remove_norms"
    summary = "delete LayerNorm and RMSNorm layers (GroupNorm, InstanceNorm on request); composites keep their act"
    preserves = Preservation.NONE
    families: tuple[str, ...] = ("layer", "rms")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.families, list):  # from a JSON recipe or the CLI
            self.families = tuple(self.families)
        self._require("families", isinstance(self.families, tuple) and len(self.families) > 0
                      and all(isinstance(f, str) and f in _FAMILIES for f in self.families),
                      f"be a non-empty tuple of {', '.join(map(repr, _FAMILIES))} (batch norms: strip_bn)")

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        Topology(gm)
        wanted = {_FAMILIES[f] for f in self.families}
        norms = [n for n in gm.graph.nodes if op_info(n).kind is OpKind.NORM and op_info(n).norm is not None]
        removed = 0
        for node in norms:
            family = op_info(node).norm.family
            if family not in wanted:
                if family is not NormFamily.BATCH:
                    record.skip(node.name, f"{family} norm: not in families={self.families!r}")
                continue
            source = node.args[0] if node.args else node.kwargs.get("input")
            if not isinstance(source, fx.Node):
                record.skip(node.name, "its input is not a node of the graph")
                continue
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                kept = replace_with_parts(gm, node, source, composite_parts(module))
                what = f"removed {type(module).__name__}" + (f", kept {', '.join(kept)}" if kept else "")
            else:
                bypass(node, source)
                what = f"removed functional {family} norm"
            record.change(node.name, what, "normalization-free network (run input_norm for q = 1 at the input)")
            removed += 1
        if not removed:
            record.note(f"no {' or '.join(self.families)} norm in the model")
        return gm
