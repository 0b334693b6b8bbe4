"""Small graph-editing helpers shared by passes (no pass logic here)."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph.running import propagate_shapes

if TYPE_CHECKING:
    from ..report import PassRecord

__all__ = ["call_sites", "set_submodule", "bypass", "composite_parts", "replace_with_parts", "shapes_from",
           "report_hidden"]


def call_sites(gm: fx.GraphModule) -> Counter:
    """How many ``call_module`` nodes call each submodule path."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` (replacing what is there)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, leaf, module)


def bypass(node: fx.Node, replacement: fx.Node) -> None:
    """Route every user of ``node`` to ``replacement`` and erase ``node``."""
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)


def composite_parts(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """The parts of a norm+activation composite (timm ``BatchNormAct2d``, ``LayerNormAct2d``) that
    stay when its norm goes: its dropout and its activation, in order (identities left out)."""
    parts = []
    for name in ("drop", "act"):
        sub = getattr(m, name, None)
        if isinstance(sub, nn.Module) and not isinstance(sub, nn.Identity):
            parts.append((name, sub))
    return parts


def replace_with_parts(gm: fx.GraphModule, node: fx.Node, source: fx.Node, parts: list[tuple[str, nn.Module]]
                       ) -> list[str]:
    """Replace a composite module call by calls to some of its parts, in order.

    The parts are re-registered under the composite's own path (``path.act``), so
    their parameters keep their state-dict names. With no parts, ``node`` is bypassed.

    Returns:
        The paths of the parts now called.
    """
    path = node.target
    if not parts:
        bypass(node, source)
        return []
    holder = nn.Module()
    for name, m in parts:
        holder.add_module(name, m)
    set_submodule(gm, path, holder)
    current = source
    with gm.graph.inserting_before(node):
        for name, _ in parts:
            current = gm.graph.call_module(f"{path}.{name}", (current,))
            current.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
    bypass(node, current)
    return [f"{path}.{n}" for n, _ in parts]


def shapes_from(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...] | None) -> dict[str, tuple[int, ...]]:
    """Output shape of every tensor-valued node, from one eval-mode run (empty without inputs)."""
    if example_inputs is None:
        return {}
    propagate_shapes(gm, example_inputs)
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


def report_hidden(gm: fx.GraphModule, record: "PassRecord", kinds: tuple[type, ...], what: str) -> None:
    """Record as skipped, by path, every ``kinds`` module inside an opaque leaf module that
    tracing kept whole: the pass cannot reach it (``what`` says what it would have done)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path in sorted(called):
        leaf = gm.get_submodule(path)
        for sub_name, sub in leaf.named_modules():
            if sub_name and isinstance(sub, kinds):
                record.skip(f"{path}.{sub_name}", f"inside the opaque module {path} ({type(leaf).__name__}), "
                                                 f"which tracing kept as a leaf; {what}")
