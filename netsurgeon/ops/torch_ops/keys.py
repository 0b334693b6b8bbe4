"""The op keys (``OpInfo.attrs["op_key"]``) that the classification rules of this package give
ops whose kernel and DKS rules live with the analyses (``netsurgeon/analysis/op_rules.py``):
``RuleTable.for_op`` finds a rule registered under the same key.

Example:
    >>> PAD
    'op:pad'
"""
from __future__ import annotations

__all__ = ["FOLD", "INSTANCE_NORM", "INTERPOLATE", "NORM_ACT", "NORMALIZE", "PAD", "TUPLE_ITEM", "TUPLE_OUTPUT",
           "UNFOLD"]

PAD = "op:pad"  # F.pad and the nn.*Pad* modules: attrs mode, value, pad
INTERPOLATE = "op:interpolate"  # F.interpolate / F.upsample* and nn.Upsample*: attrs mode, size, scale_factor
NORMALIZE = "op:normalize"  # F.normalize: attrs p, dim
UNFOLD = "op:unfold"  # F.unfold / nn.Unfold: attrs kernel_size, dilation, padding, stride
FOLD = "op:fold"  # F.fold / nn.Fold: attrs output_size, kernel_size, dilation, padding, stride
TUPLE_OUTPUT = "op:tuple_output"  # an op whose value is a tuple (LSTM, topk, x.max(dim)...): attrs nested
TUPLE_ITEM = "op:tuple_item"  # a tensor taken from such a tuple with ``getitem``
INSTANCE_NORM = "op:instance_norm"  # nn.InstanceNorm*, timm's filter response norms: per channel, over locations
NORM_ACT = "op:norm_act"  # a norm+activation composite (timm's GroupNormAct...): the activation is its ``.act``
