"""``orthogonal_init``: scaled uniform orthogonal weights (DKS, arXiv:2110.01765; docs/theory.md §4.7).

Every linear layer gets ``W = g · O``: ``O`` a Haar-random ``[out, in]`` matrix (PyTorch's
layout) with orthonormal rows when ``out ≤ in`` and orthonormal columns when
``out > in``, and ``g = gain · max(1, sqrt(out / in))``. Every conv gets a
delta-orthogonal kernel: only the centre tap is non-zero and holds such a matrix per
group, ``[out/groups, in/groups]``. Biases are zero.

Why that ``g`` (``q = ||h||² / dim``, per location for convs):

* ``out > in``: orthonormal columns give ``||W x|| = g ||x||``, so
  ``q_out = g² ||x||² / out = g² (in / out) q_in`` and ``g² = out / in`` gives
  ``q_out = q_in`` exactly, for every input.
* ``out ≤ in``: orthonormal rows give ``E ||W x||² = ||W||_F² q_in = out · q_in`` for
  isotropic ``x``, so ``q_out = q_in`` in expectation with ``g = 1``.

Either way ``σw² = fan_in · mean(W²) = 1`` (docs/theory.md §3.1). A conv whose stride equals its
kernel and that does not pad (a patchify stem, a ViT patch embedding) applies a linear
map to disjoint patches; it gets an orthogonal ``[out/groups, in/groups · prod(kernel)]``
matrix instead (the rule above with ``in`` the patch size). Other even kernels have no
centre tap and are reported as skipped, as are transposed convs and layers whose
forward transforms the weight (timm's weight-standardized ``StdConv2d``).

``conv="full"`` gives every conv that ``[out/groups, in/groups · prod(kernel)]`` orthogonal
matrix over its whole window instead: ``q`` is kept in expectation as for a linear layer, but
the kernel maps are no longer exact (neighbouring locations mix; the analysis says so). It uses
the off-centre taps from the start, which trained the CNN of ``benchmarks/train_deep.py``
faster under DKS (``docs/benchmarks.md``).

Example:
    >>> import torch, torch.nn as nn, netsurgeon
    >>> gm = netsurgeon.transform(nn.Sequential(nn.Linear(10, 40)), [("orthogonal_init", {"seed": 0})])
    >>> w = gm.get_submodule("0").weight  # expanding 10 -> 40: gain 2, W^T W = 4 I
    >>> bool(((w.T @ w) - 4 * torch.eye(10)).abs().max() < 1e-5)
    True
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import Topology, op_info
from ..ops import layer_forward, linear_parameters, pads_same, plain_layer
from ..layers import ShapedAttention
from ..report import PassRecord, Preservation
from .base import Pass, register_pass

__all__ = ["OrthogonalInit", "orthogonal_blocks", "constant_layers"]


def orthogonal_blocks(groups: int, rows: int, cols: int, gain: float, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """``[groups, rows, cols]`` Haar-random matrices with orthonormal rows or columns, times ``gain``.

    Same construction as ``torch.nn.init.orthogonal_`` (QR of a Gaussian matrix, signs
    fixed by ``diag(R)``), batched over groups, in float64.
    """
    a = torch.randn(groups, max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.diagonal(r, dim1=-2, dim2=-1).sign().unsqueeze(-2)
    return gain * (q if rows >= cols else q.transpose(-1, -2))


def _obstacle(m: nn.Module) -> str | None:
    """Why ``m``'s weight cannot be given an orthogonal init, or None."""
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return "lazy module whose weight is not materialized yet"
    if getattr(m, "transposed", False):
        return "transposed conv: a centre-tap kernel would leave the strided gaps of its output empty"
    fwd = layer_forward(m)
    if fwd is not None and fwd.standardizes_weight:
        return (f"{type(m).__name__} standardizes its weight in forward, which would undo the orthogonal init; "
                f"replace it by a plain conv first")
    if not plain_layer(m, as_is=True):
        return f"{type(m).__name__} overrides forward, so its weight may not be used as it is"
    return None


def _layout(m: nn.Module, conv: str = "delta") -> tuple[str, int, int] | str:
    """``(scheme, rows, cols)`` of the per-group matrix, or why no scheme applies."""
    if isinstance(m, nn.Linear):
        return "orthogonal", m.out_features, m.in_features
    rows, cols = m.out_channels // m.groups, m.in_channels // m.groups
    if conv == "full":
        return "full-orthogonal", rows, cols * math.prod(m.kernel_size)
    if all(k % 2 == 1 for k in m.kernel_size):
        return "delta-orthogonal", rows, cols
    no_pad = m.padding == "valid" or (not isinstance(m.padding, str) and all(p == 0 for p in m.padding))
    if (tuple(m.stride) == tuple(m.kernel_size) and no_pad and all(d == 1 for d in m.dilation)
            and not pads_same(m)):
        return "patch-orthogonal", rows, cols * math.prod(m.kernel_size)
    return (f"kernel {tuple(m.kernel_size)} has even sides and overlapping windows: no centre tap for "
            f"conv='delta' (conv='full' initializes it)")


def _fill(w: torch.Tensor, bias: torch.Tensor | None, groups: int, scheme: str, rows: int, cols: int,
          gain: float, generator: torch.Generator | None) -> float:
    """Write the orthogonal weight into ``w`` and zero ``bias``; return the gain used."""
    g = gain * max(1.0, math.sqrt(rows / cols))
    blocks = orthogonal_blocks(groups, rows, cols, g, generator).to(w.device, w.dtype)
    with torch.no_grad():
        if scheme == "delta-orthogonal":
            w.zero_()
            w[(slice(None), slice(None)) + tuple(k // 2 for k in w.shape[2:])] = blocks.reshape(w.shape[:2])
        else:
            w.copy_(blocks.reshape(w.shape))
        if bias is not None:
            bias.zero_()
    return g


def constant_layers(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """``{path: its call nodes}`` of the ``nn.Linear`` / conv modules every call of which reads constants only
    (no model input reaches them): their outputs are input-independent terms."""
    topo = Topology(gm)
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return {path: nodes for path, nodes in calls.items()
            if isinstance(gm.get_submodule(path), (nn.Linear, nn.modules.conv._ConvNd))
            and not any(topo.graph.nodes[a.name]["signal"] for n in nodes for a in n.all_input_nodes)}


@register_pass
@dataclasses.dataclass
class OrthogonalInit(Pass):
    """Scaled uniform orthogonal init of every linear layer, delta-orthogonal of every conv.

    Covers ``nn.Linear`` / ``nn.Conv{1,2,3}d`` modules (also inside opaque leaves), timm's
    ``Linear`` and ``Conv2dSame``, and ``F.linear`` / ``addmm`` nodes whose weight is a parameter
    (what tracing leaves of a linear subclass with its own forward, or of Hugging Face's ``Conv1D``).

    Args:
        gain: an extra factor on top of the shape gain ``max(1, sqrt(out/in))``; must be
            positive. Default: 1.0.
        seed: seed of a private generator (the global RNG is left alone); None draws
            from the global RNG. Default: None.
        conv: ``"delta"`` (centre tap only; exact kernel maps) or ``"full"`` (orthogonal over
            the whole window). Default: "delta".
    """

    name = "orthogonal_init"
    summary = "scaled uniform orthogonal weights (delta-orthogonal convs), zero biases"
    preserves = Preservation.NONE
    gain: float = 1.0
    seed: Optional[int] = None
    conv: Literal["delta", "full"] = "delta"

    def validate(self) -> None:
        super().validate()
        self._require("gain", 0.0 < self.gain < math.inf, "be positive and finite")
        self._require("seed", self.seed is None or -2**63 <= self.seed < 2**64, "be None or an int in [-2**63, 2**64)")

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        Topology(gm)
        names: dict[str, str] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                names.setdefault(node.target, node.name)
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        done: set[int] = set()  # ids of initialized weights
        for path, m in gm.named_modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and self._init_module(
                    path, m, names.get(path, path), generator, record):
                done.add(id(m.weight))
        self._init_functional(gm, done, generator, record)
        self._zero_constant_layers(gm, record)
        self._keep_zeroed_queries(gm, record)
        record.note(f"initialized {len(record.changes)} layer(s), skipped {len(record.skipped)}; seed {self.seed}")
        return gm

    @staticmethod
    @torch.no_grad()
    def _zero_constant_layers(gm: fx.GraphModule, record: PassRecord) -> None:
        """A layer whose every call reads constants only (not the input: XCiT's and EdgeNeXt's Fourier position
        encoding projected by a conv, Swin V2's relative-position MLP) makes an input-independent term, a bias
        of the kernel theory: zero, like every bias here, so that adding it leaves q unchanged (with orthogonal
        weights the Fourier encoding would add 0.5 to q at every token)."""
        for path, nodes in constant_layers(gm).items():
            m = gm.get_submodule(path)
            m.weight.zero_()
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            record.change(nodes[0].name, f"{type(m).__name__} {path} reads constants only (not the input): zeroed",
                          "its output is an input-independent term, a bias of the kernel theory (zero at init)")

    @staticmethod
    @torch.no_grad()
    def _keep_zeroed_queries(gm: fx.GraphModule, record: PassRecord) -> None:
        """Query rows that ``attention_shaping`` zeroed stay zero: the attention pattern depends on them."""
        for path, m in gm.named_modules():
            for weight, axis, rows, bias in getattr(m, "zeroed_query", ()) if isinstance(m, ShapedAttention) else ():
                idx = torch.as_tensor(rows, device=weight.device)
                weight.index_fill_(axis, idx, 0.0)
                if bias is not None:
                    bias.index_fill_(0, idx, 0.0)
                record.note(f"kept the {len(rows)} query rows {path} zeroes at zero")

    def _init_module(self, path: str, m: nn.Module, node_name: str, generator: torch.Generator | None,
                     record: PassRecord) -> bool:
        why = _obstacle(m)
        layout = _layout(m, self.conv) if why is None else why
        if isinstance(layout, str):
            record.skip(node_name, f"{type(m).__name__} {path}: {layout}")
            return False
        scheme, rows, cols = layout
        groups = getattr(m, "groups", 1)
        g = _fill(m.weight, getattr(m, "bias", None), groups, scheme, rows, cols, float(self.gain), generator)
        per_group = f" per group ({groups} groups)" if groups > 1 else ""
        record.change(node_name, f"{scheme} {list(m.weight.shape)}, gain {g:.4g}{per_group}, zero bias",
                      f"[{rows}, {cols}] orthogonal matrix: q_out = q_in")
        return True

    def _init_functional(self, gm: fx.GraphModule, done: set[int], generator: torch.Generator | None,
                         record: PassRecord) -> None:
        """Functional dense layers with parameter weights (``F.linear``, ``addmm``: what tracing leaves of
        a linear subclass with its own forward or of Hugging Face's ``Conv1D``) are initialized; other
        functional layers are named."""
        for node in gm.graph.nodes:
            info = op_info(node)
            if not info.kind.traits.weighted or node.op == "call_module":
                continue
            dense = linear_parameters(gm, node)
            if dense is not None and id(dense[0]) in done:
                continue
            if dense is None:
                record.skip(node.name, f"functional {info.name}: only F.linear / addmm with a parameter weight are "
                                       f"initialized; left as is ({node.format_node()})")
                continue
            w, bias, out_axis = dense
            view = w if out_axis == 0 else w.t()  # [out, in]; a transposed view writes into w
            g = _fill(view, bias, 1, "orthogonal", *view.shape, float(self.gain), generator)
            done.add(id(w))
            record.change(node.name, f"orthogonal {list(view.shape)} (functional linear), gain {g:.4g}, zero bias",
                          f"[{view.shape[0]}, {view.shape[1]}] orthogonal matrix: q_out = q_in")
