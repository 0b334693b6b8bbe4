"""``identity_residual`` and ``identity_reparam``: identity at initialization (docs/theory.md §7).

``identity_residual`` works on the residual blocks of the topology view:

* ``zero_last``: zero the last linear op of every branch, or the last norm's gain and bias
  when a norm ends the branch; what follows must keep zero at zero (dropout, scaling,
  reshapes, activations with φ(0) = 0), else the block is reported.
* ``skipinit`` (alias ``rezero``): every branch times a learnable scalar starting at 0.
* ``fixup``: no batch norm (refused otherwise, naming ``strip_bn``); branch layers He-initialized
  and scaled by ``L^(-1/(2m-2))``, the last one zero, a scalar bias before every branch
  layer and activation, a scalar multiplier per branch (at 1) followed by a scalar bias,
  the classifier zero with a scalar bias before it (the stem gets none).
* ``hardt_ma``: no batch norm; branch layers ``N(0, σ²)`` with ``σ = 1/(k² c)`` (k the kernel
  size, c the output channels); the classifier becomes a fixed random projection (buffers).

``identity_reparam`` rewrites every shape-preserving Linear/Conv as ``W = I + V`` with
``torch.nn.utils.parametrize`` (``state_dict`` holds ``V``): ``init="zero"`` makes it the
identity (V = 0, bias 0); ``init="convert"`` sets ``V = W - I`` (exactly function-preserving).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from .._validate import short_list
from ..errors import UnsupportedNodeError
from ..graph import BlockKind, Topology
from ..graph.state import nodes_by_name
from ..kernels import get_activation
from ..layers.identity import AddIdentity, FixedLinear, ScalarBias, ScalarGate
from ..ops import NormFamily, OpKind, PLAIN_LAYER_TYPES, plain_layer, pool_type
from ..report import PassRecord, Preservation
from ._edit import set_submodule
from .base import Pass, register_pass

__all__ = ["IdentityResidual", "IdentityReparam"]

_LAYERS = PLAIN_LAYER_TYPES


def _zero_preserving(topo: Topology, name: str) -> bool:
    """Does the node map an all-zero input to zero?"""
    d = topo.graph.nodes[name]
    kind, info = d["kind"], d["info"]
    if kind.traits.unchanged:
        return True
    if kind is OpKind.POOL:
        kind = pool_type(info)
        return kind is not None and kind.per_channel
    if kind is OpKind.AFFINE:
        return "factor" in info.attrs or info.attrs.get("op") == "mul"
    if kind is OpKind.ACTIVATION and info.activation is not None:
        try:
            return float(get_activation(info.activation.name, **dict(info.activation.params)).phi(0.0)) == 0.0
        except ValueError:
            return False
    return False


def _insert_before(gm: fx.GraphModule, node: fx.Node, arg: fx.Node, path: str, module: nn.Module) -> fx.Node:
    """Route ``node``'s input ``arg`` through a new module call; returns the new node."""
    gm.add_module(path, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (arg,))
    node.replace_input_with(arg, new)
    return new


def _classifier(topo: Topology) -> str | None:
    """The last Linear module node on the way to the output, if it is a plain Linear."""
    out = [n for n, d in topo.graph.nodes(data=True) if d["kind"] is OpKind.OUTPUT]
    linear = [n for n in topo.nodes_of(OpKind.LINEAR) if topo.graph.nodes[n]["node_op"] == "call_module"]
    return linear[-1] if linear and out else None


def _batch_norms(topo: Topology) -> list[str]:
    return [n for n in topo.nodes_of(OpKind.NORM) if topo.info(n).norm is not None
            and topo.info(n).norm.family is NormFamily.BATCH]


@register_pass
@dataclasses.dataclass
class IdentityResidual(Pass):
    """Make every residual block the identity at initialization (or, for ``hardt_ma``, nearly).

    Options:
        mode: ``"zero_last"`` (default), ``"skipinit"``, ``"rezero"`` (= skipinit), ``"fixup"``,
            ``"hardt_ma"``.
        seed: seed of the re-initializations (fixup, hardt_ma), an int in [-2**63, 2**64);
            None uses the global RNG. Default: None.
    """

    name = "identity_residual"
    summary = "identity at init: zero_last, skipinit/rezero, fixup, hardt_ma on every residual block"
    preserves = Preservation.NONE

    mode: Literal["zero_last", "skipinit", "rezero", "fixup", "hardt_ma"] = "zero_last"
    seed: int | None = None

    def validate(self) -> None:
        super().validate()
        self._require("seed", self.seed is None or -2**63 <= self.seed < 2**64, "be None or an int in [-2**63, 2**64)")

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        topo = Topology(gm)
        if self.mode in ("fixup", "hardt_ma"):
            bns = _batch_norms(topo)
            if bns:
                raise UnsupportedNodeError(f"identity_residual mode={self.mode!r} needs a network without batch norm; "
                                           f"run strip_bn (mode=remove) first. {len(bns)} batch norm(s): "
                                           f"{short_list(bns)}", nodes=bns)
        gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        blocks = [b for b in topo.blocks if b.kind is BlockKind.RESIDUAL]
        for b in topo.blocks:
            if b.kind is not BlockKind.RESIDUAL:
                record.skip(b.merge, f"{b.kind} merge, not a residual block")
        if not blocks:
            record.note("no residual block")
        nodes = nodes_by_name(gm)
        for i, b in enumerate(blocks):
            add = nodes[b.merge]
            for j, (branch, layers) in enumerate(zip(b.branches, b.branch_layers)):
                operand = nodes[b.operands[1 + j]]
                tag = f"{b.merge}_{j}" if len(b.branches) > 1 else b.merge
                if self.mode in ("skipinit", "rezero"):
                    _insert_before(gm, add, operand, f"ns_skipinit_{tag}", ScalarGate(0.0))
                    record.change(b.merge, f"branch {operand.name} times a learnable scalar (0 at init)")
                elif self.mode == "zero_last":
                    self._zero_last(gm, topo, b.merge, branch, record)
                elif self.mode == "fixup":
                    self._fixup(gm, topo, b.merge, add, operand, branch, layers, len(blocks), tag, gen, record)
                else:
                    self._hardt_ma(gm, b.merge, layers, gen, record)
        if self.mode in ("fixup", "hardt_ma"):
            self._classifier(gm, topo, record)
        return gm

    def _zero_last(self, gm: fx.GraphModule, topo: Topology, merge: str, branch: list[str],
                   record: PassRecord) -> None:
        for k in range(len(branch) - 1, -1, -1):
            name = branch[k]
            d = topo.graph.nodes[name]
            if (d["kind"].traits.weighted or d["kind"] is OpKind.NORM) and d["node_op"] == "call_module":
                m = gm.get_submodule(d["target"])
                if getattr(m, "weight", None) is None:
                    record.skip(merge, f"branch ends with {name} ({type(m).__name__}) without a gain to zero")
                    return
                with torch.no_grad():
                    m.weight.zero_()
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
                what = "gain and bias" if d["kind"] is OpKind.NORM else "weight and bias"
                record.change(merge, f"zeroed the {what} of {name}, the branch's last linear op")
                return
            if not _zero_preserving(topo, name):
                record.skip(merge, f"{name} ({d['info'].describe()}) follows the branch's last linear op and does "
                                   f"not keep zero at zero")
                return
        record.skip(merge, "the branch has no linear op or norm")

    def _fixup(self, gm: fx.GraphModule, topo: Topology, merge: str, add: fx.Node, operand: fx.Node,
               branch: list[str], layers: list[str], n_blocks: int, tag: str, gen: torch.Generator | None,
               record: PassRecord) -> None:
        plain = [n for n in layers if topo.graph.nodes[n]["node_op"] == "call_module"
                 and isinstance(gm.get_submodule(topo.graph.nodes[n]["target"]), _LAYERS)]
        if not plain or len(plain) != len(layers):
            record.skip(merge, "branch layers are not plain Linear/Conv modules")
            return
        m_layers = len(plain)
        scale = n_blocks ** (-1.0 / (2 * m_layers - 2)) if m_layers > 1 else 1.0
        for k, name in enumerate(plain):
            mod = gm.get_submodule(topo.graph.nodes[name]["target"])
            with torch.no_grad():
                if k == len(plain) - 1:
                    mod.weight.zero_()
                else:
                    fan_in = math.prod(mod.weight.shape[1:])
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in) * scale)
                if mod.bias is not None:
                    mod.bias.zero_()
        nodes = nodes_by_name(gm)
        for k, name in enumerate(n for n in branch if topo.graph.nodes[n]["kind"].traits.weighted
                                 or topo.graph.nodes[n]["kind"] is OpKind.ACTIVATION):
            node = nodes[name]
            sig = next(a for a in node.all_input_nodes if topo.graph.nodes[a.name]["signal"])
            _insert_before(gm, node, sig, f"ns_fixup_bias_{tag}_{k}", ScalarBias())
        gated = _insert_before(gm, add, operand, f"ns_fixup_scale_{tag}", ScalarGate(1.0))
        _insert_before(gm, add, gated, f"ns_fixup_bias_{tag}_out", ScalarBias())  # the reference's bias2b
        record.change(merge, f"fixup: {m_layers} branch layer(s) He-initialized x {scale:.4g} (L = {n_blocks}), last "
                             f"zeroed, scalar biases before every branch layer and activation and after the "
                             f"multiplier, and a scalar multiplier added")

    def _hardt_ma(self, gm: fx.GraphModule, merge: str, layers: list[str], gen: torch.Generator | None,
                  record: PassRecord) -> None:
        topo_nodes = nodes_by_name(gm)
        done = []
        for name in layers:
            node = topo_nodes[name]
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _LAYERS):
                record.skip(name, "not a plain Linear/Conv module")
                continue
            mod = gm.get_submodule(node.target)
            k = math.prod(mod.weight.shape[2:]) if mod.weight.dim() > 2 else 1
            sigma = 1.0 / (k * mod.weight.shape[0])  # 1/(k² c): k² = kernel area, c = output channels
            with torch.no_grad():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * sigma)
                if mod.bias is not None:
                    mod.bias.zero_()
            done.append(f"{name} (σ = {sigma:.3g})")
        record.change(merge, "hardt_ma: N(0, σ²) with σ = 1/(k² c): " + ", ".join(done))

    def _classifier(self, gm: fx.GraphModule, topo: Topology, record: PassRecord) -> None:
        name = _classifier(topo)
        if name is None:
            record.note("no Linear classifier found")
            return
        target = topo.graph.nodes[name]["target"]
        mod = gm.get_submodule(target)
        if self.mode == "fixup":
            with torch.no_grad():
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
            node = next(n for n in gm.graph.nodes if n.name == name)
            _insert_before(gm, node, node.args[0], "ns_fixup_bias_classifier", ScalarBias())
            record.change(name, "fixup: classifier zeroed, a scalar bias added before it")
        else:
            set_submodule(gm, target, FixedLinear(mod.weight, mod.bias))
            record.change(name, "hardt_ma: classifier turned into a fixed random projection (buffers, not trained)")


def _identity_like(m: nn.Module) -> torch.Tensor | None:
    """``I`` for a shape-preserving Linear/Conv (same channels, stride 1, same padding, odd kernel)."""
    w = m.weight
    if isinstance(m, nn.Linear):
        return torch.eye(w.shape[0], dtype=w.dtype, device=w.device) if m.in_features == m.out_features else None
    if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or m.transposed or m.in_channels != m.out_channels:
        return None
    if any(s != 1 for s in m.stride) or any(k % 2 == 0 for k in m.kernel_size):
        return None
    same = m.padding == "same" or all(p == d * (k - 1) // 2 for p, d, k in zip(m.padding, m.dilation, m.kernel_size))
    if not same:
        return None
    eye = torch.zeros_like(w)
    nn.init.dirac_(eye, groups=m.groups)
    return eye.detach()


@register_pass
@dataclasses.dataclass
class IdentityReparam(Pass):
    """``W = I + V`` for every shape-preserving Linear/Conv (Dirac kernel for convs).

    Options:
        init: ``"zero"`` (V = 0 and bias 0: the identity) or ``"convert"`` (V = W - I: exact).
    """

    name = "identity_reparam"
    summary = "W = I + V for every shape-preserving Linear/Conv (init=zero: identity; init=convert: exact)"

    init: Literal["zero", "convert"] = "convert"

    def preservation(self) -> Preservation:
        return Preservation.EXACT if self.init == "convert" else Preservation.NONE

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        topo = Topology(gm)
        seen: set[str] = set()
        for name in topo.nodes_of(OpKind.LINEAR) + topo.nodes_of(OpKind.CONV):
            d = topo.graph.nodes[name]
            if d["node_op"] != "call_module" or d["target"] in seen:
                continue
            seen.add(d["target"])
            m = gm.get_submodule(d["target"])
            if not plain_layer(m):
                record.skip(name, f"{type(m).__name__} is not a plain Linear/Conv")
                continue
            eye = _identity_like(m)
            if eye is None:
                record.skip(name, "not shape-preserving (channels, stride 1, same padding, odd kernel)")
                continue
            with torch.no_grad():
                if self.init == "zero":
                    m.weight.copy_(eye)
                    if m.bias is not None:
                        m.bias.zero_()
            parametrize.register_parametrization(m, "weight", AddIdentity(eye))  # stores V = W - I
            record.change(name, f"W = I + V ({'V = 0, bias 0: identity' if self.init == 'zero' else 'V = W - I'})")
        return gm

