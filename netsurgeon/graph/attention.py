"""``nn.MultiheadAttention`` written out with its own parameters, so attention is in the graph.

fx keeps modules of ``torch.nn`` as leaves; ``nn.MultiheadAttention`` then hides its projections
and its attention matrix from the analysis and the passes. :func:`write_out_multihead_attention`
replaces each call by ``F.linear`` (in-projection), a head split, the attention the module computes
(``F.scaled_dot_product_attention`` with ``need_weights=False``, its dropout rate following the mode
through a :class:`~netsurgeon.layers.ModeConstant`; ``softmax(q kᵀ / sqrt(d) + mask)``, dropout and
``@ v`` otherwise, the weights being unused), a head merge and ``F.linear`` (out-projection) computed
sequence-first as the module does, reading the module's parameters: the same function, and the same
dropout masks. A call it cannot write out (separate
q/k/v weights, ``bias_k``, ``add_zero_attn``, attention weights used) stays a leaf, with the reason.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ModeConstant

__all__ = ["write_out_multihead_attention"]

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


def _obstacle(m: nn.MultiheadAttention, b: dict[str, Any], node: fx.Node) -> str | None:
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return "separate q/k/v projection weights, bias_k/bias_v or add_zero_attn"
    for key in ("attn_mask", "key_padding_mask"):
        if b.get(key) is not None and not isinstance(b.get(key), fx.Node):
            return f"a constant {key}"
    for u in node.users:
        if not (u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)) or \
                (u.args[1] == 1 and u.users):
            return "its attention weights are used"
    return None


def _mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, dtype: torch.dtype
          ) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (bool: True = masked; float: added) as one additive mask
    ``[B or 1, 1, T, S]`` for ``scaled_dot_product_attention``."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)

    out = None
    if attn_mask is not None:
        out = additive(attn_mask)
        if out.dim() == 2:
            out = out[None, None]
    if key_padding_mask is not None:
        pad = additive(key_padding_mask)[:, None, None, :]
        out = pad if out is None else out + pad
    return out


def write_out_multihead_attention(gm: fx.GraphModule) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Write out every ``nn.MultiheadAttention`` call of ``gm`` (see the module docstring).

    Returns:
        ``[(node, what was done)]`` and ``{node: why it stays a leaf}``.
    """
    done: list[tuple[str, str]] = []
    kept: dict[str, str] = {}
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            continue
        m = gm.get_submodule(node.target)
        b = dict(zip(_MHA_ARGS, node.args))
        b.update(node.kwargs)
        why = _obstacle(m, b, node)
        if why is not None:
            kept[node.name] = why
            continue
        if m.in_proj_weight.dim() != 2 or b["query"] is None:
            kept[node.name] = "unexpected parameters"
            continue
        holder = f"{node.target}_dropout".replace(".", "_")
        while hasattr(gm, holder):
            holder += "_"
        gm.add_submodule(holder, nn.Dropout(float(m.dropout)) if b.get("need_weights", True)
                         else ModeConstant(float(m.dropout), 0.0))
        heads, e = m.num_heads, m.embed_dim
        with g.inserting_before(node):
            def batch_first(x: fx.Node) -> fx.Node:
                return x if m.batch_first else g.call_method("transpose", (x, 0, 1))

            w = g.get_attr(f"{node.target}.in_proj_weight")
            bias = g.get_attr(f"{node.target}.in_proj_bias") if m.in_proj_bias is not None else None
            if b["query"] is b["key"] is b["value"]:
                qkv = g.call_function(F.linear, (batch_first(b["query"]), w, bias))
                chunks = g.call_method("chunk", (qkv, 3), {"dim": -1})
                parts = [g.call_function(operator.getitem, (chunks, i)) for i in range(3)]
            else:  # cross-attention: the rows of the one in-projection weight, per input
                parts = []
                for i, key in enumerate(("query", "key", "value")):
                    wi = g.call_function(operator.getitem, (w, slice(i * e, (i + 1) * e)))
                    bi = g.call_function(operator.getitem, (bias, slice(i * e, (i + 1) * e))) if bias is not None \
                        else None
                    parts.append(g.call_function(F.linear, (batch_first(b[key]), wi, bi)))
            q, k, v = (g.call_method("transpose", (g.call_method("unflatten", (t, -1, (heads, m.head_dim))), 1, 2))
                       for t in parts)
            mask = None
            if b.get("attn_mask") is not None or b.get("key_padding_mask") is not None:
                mask = g.call_function(_mask, (b.get("attn_mask"), b.get("key_padding_mask"), torch.float32))
            if b.get("need_weights", True):  # its weights path: softmax(q kᵀ / sqrt(d) + mask), dropout, @ v
                s = g.call_function(torch.matmul, (g.call_function(operator.mul, (q, float(m.head_dim) ** -0.5)),
                                                   g.call_method("transpose", (k, -2, -1))))
                if mask is not None:
                    s = g.call_function(operator.add, (s, mask))
                w = g.call_function(F.softmax, (s,), {"dim": -1})
                if m.dropout > 0:
                    w = g.call_module(holder, (w,))
                y = g.call_function(torch.matmul, (w, v))
            else:
                p = g.call_module(holder, ())
                y = g.call_function(F.scaled_dot_product_attention, (q, k, v), {"attn_mask": mask, "dropout_p": p})
            # sequence-first, as nn.MultiheadAttention computes it: the output has its memory layout, so a
            # dropout after it draws the same mask
            y = g.call_method("flatten", (g.call_method("permute", (y, 2, 0, 1, 3)), -2))
            ow = g.get_attr(f"{node.target}.out_proj.weight")
            ob = g.get_attr(f"{node.target}.out_proj.bias") if m.out_proj.bias is not None else None
            out = g.call_function(F.linear, (y, ow, ob))
            if m.batch_first:
                out = g.call_method("transpose", (out, 0, 1))
        for u in list(node.users):
            if u.args[1] == 0:
                u.replace_all_uses_with(out)
            g.erase_node(u)
        g.erase_node(node)
        done.append((node.name, f"wrote out nn.MultiheadAttention {node.target} ({heads} heads) with "
                                f"scaled_dot_product_attention"))
    if done:
        gm.recompile()
    return done, kept
