"""What kind of operation a graph node is: the vocabulary of the topology view.

The kinds follow the propagation rules of MATH.md §3: each kind has (or lacks) a
Q/C map, so the analysis and the passes dispatch on :class:`OpKind` alone.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OpKind", "OpInfo", "ActivationSpec", "NormSpec"]


class OpKind(str, enum.Enum):
    """Kinds of graph nodes. ``str`` valued so they print and serialize plainly."""

    INPUT = "input"
    OUTPUT = "output"
    CONSTANT = "constant"  # get_attr: a parameter or buffer read directly
    LINEAR = "linear"
    CONV = "conv"
    NORM = "norm"
    ACTIVATION = "activation"
    ADD = "add"  # sum or weighted sum of two or more signals
    AFFINE = "affine"  # a signal scaled or shifted by constants (layer scale, pos-embed)
    CONCAT = "concat"
    POOL = "pool"
    RESHAPE = "reshape"  # flatten, view, permute, slicing, split ...
    IDENTITY = "identity"  # nn.Identity, dropout, drop-path, clone, dtype casts
    MULTIPLY = "multiply"  # product of two signals (attention, SE gates, GLU)
    META = "meta"  # shape/size queries: no tensor flows through
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ActivationSpec:
    """An elementwise activation: its canonical name and parameters.

    Args:
        name: canonical name, e.g. ``"relu"``, ``"leaky_relu"``, ``"gelu_tanh"``.
        params: the function's parameters, e.g. ``{"negative_slope": 0.01}``.
        transform: ``(α, β, γ, δ)`` when the op computes ``γ (φ(α x + β) + δ)`` (DKS/TAT).
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    transform: tuple[float, float, float, float] | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params)
        base = f"{self.name}({inner})" if inner else self.name
        if self.transform is None:
            return base
        a, b, g, d = self.transform
        return f"{g:.4g}*({base}({a:.4g}*x{b:+.4g}){d:+.4g})"


@dataclass(frozen=True)
class NormSpec:
    """A normalization layer.

    Args:
        family: ``"batch"``, ``"layer"``, ``"group"``, ``"instance"``, ``"rms"`` or ``"other"``.
        train_dependent: True when the layer uses batch statistics in train mode.
        channels: number of normalized channels (features), when known.
        activation: the activation a norm+act composite applies after normalizing.
        composite: True for norm+act composites such as timm's ``BatchNormAct2d``.
    """

    family: str
    train_dependent: bool
    channels: int | None = None
    activation: ActivationSpec | None = None
    composite: bool = False


@dataclass
class OpInfo:
    """The classification of one node.

    Args:
        kind: the op kind.
        name: a short op name (``"conv2d"``, ``"relu"``, ``"batch_norm"``, ``"cat"``).
        known: False when the op was not recognised; such nodes are reported by name.
        activation: for activation nodes, which function and its parameters.
        norm: for norm nodes, the norm's family and behaviour.
        attrs: further facts (conv geometry, pooling type, sum weights, ...).
    """

    kind: OpKind
    name: str
    known: bool = True
    activation: ActivationSpec | None = None
    norm: NormSpec | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """A one-phrase description, e.g. ``"activation relu"`` or ``"norm batch+relu"``."""
        if self.activation is not None:
            return f"{self.kind} {self.activation}"
        if self.norm is not None:
            act = f"+{self.norm.activation}" if self.norm.activation else ""
            return f"{self.kind} {self.norm.family}{act}"
        return f"{self.kind} {self.name}"
