"""What kind of operation a graph node is: the vocabulary of the topology view.

The kinds follow the propagation rules of docs/theory.md §3: each kind has (or lacks) a
Q/C map, so the analysis and the passes dispatch on :class:`OpKind` alone. What a kind
means structurally (a weight layer, a merge, a pass-through...) is one row of
:data:`KIND_TRAITS`; the kernel rules of each kind are registered in
:mod:`netsurgeon.analysis.rules`.

Example:
    >>> OpKind.CONV.traits.weighted, OpKind.CONCAT.traits.merge, OpKind.META.traits.signal
    (True, True, False)
    >>> PoolType("adaptive_avg").averages, PoolType.MAX_REDUCE.takes_max
    (True, True)
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NormFamily", "OpKind", "KindTraits", "KIND_TRAITS", "PoolType", "OpInfo", "ActivationSpec", "NormSpec", "pool_type"]


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

    @property
    def traits(self) -> "KindTraits":
        """What this kind means to the analyses and passes (its row of :data:`KIND_TRAITS`)."""
        return KIND_TRAITS[self]


@dataclass(frozen=True)
class KindTraits:
    """What an op kind means, structurally, to every analysis and pass.

    Attributes:
        signal: a tensor signal flows through it (False for constants and shape queries).
        weighted: a layer with its own weight (Linear, Conv): it separates correlated terms
            of a sum and counts as a layer of a block's paths.
        merge: it combines two or more signals (a sum, a concatenation): a block's merge.
        unchanged: it passes its input on unchanged (same q and c; Lipschitz factor 1).
        substantial: it changes the signal beyond reshaping, pooling or a constant scale; a
            merge's shortcut is the operand path with the fewest such ops.
    """

    signal: bool = True
    weighted: bool = False
    merge: bool = False
    unchanged: bool = False
    substantial: bool = False


KIND_TRAITS: dict[OpKind, KindTraits] = {
    OpKind.INPUT: KindTraits(),
    OpKind.OUTPUT: KindTraits(unchanged=True),
    OpKind.CONSTANT: KindTraits(signal=False),
    OpKind.LINEAR: KindTraits(weighted=True, substantial=True),
    OpKind.CONV: KindTraits(weighted=True, substantial=True),
    OpKind.NORM: KindTraits(substantial=True),
    OpKind.ACTIVATION: KindTraits(substantial=True),
    OpKind.ADD: KindTraits(merge=True),
    OpKind.AFFINE: KindTraits(),
    OpKind.CONCAT: KindTraits(merge=True),
    OpKind.POOL: KindTraits(),
    OpKind.RESHAPE: KindTraits(unchanged=True),
    OpKind.IDENTITY: KindTraits(unchanged=True),
    OpKind.MULTIPLY: KindTraits(substantial=True),
    OpKind.META: KindTraits(signal=False),
    OpKind.OTHER: KindTraits(substantial=True),
}


class PoolType(str, enum.Enum):
    """The ``pool_type`` attribute of a ``POOL`` node."""

    AVG = "avg"  # nn.AvgPool*d, F.avg_pool*d
    ADAPTIVE_AVG = "adaptive_avg"
    MEAN = "mean"  # torch.mean / Tensor.mean over dims
    SUM = "sum"  # torch.sum / Tensor.sum over dims
    MAX = "max"  # nn.MaxPool*d, F.max_pool*d
    ADAPTIVE_MAX = "adaptive_max"
    MAX_REDUCE = "max_reduce"  # torch.amax / Tensor.max over dims
    LP = "lp"

    def __str__(self) -> str:
        return self.value

    @property
    def averages(self) -> bool:
        """A mean over windows or dims: linear, q and c pass through (docs/theory.md §3.5)."""
        return self in (PoolType.AVG, PoolType.ADAPTIVE_AVG, PoolType.MEAN)

    @property
    def takes_max(self) -> bool:
        """A maximum: no kernel map (``maxpool_to_avgpool`` swaps it for an average)."""
        return self in (PoolType.MAX, PoolType.ADAPTIVE_MAX, PoolType.MAX_REDUCE)

    @property
    def per_channel(self) -> bool:
        """Averages or maxima over windows of each channel, or a mean over dims: a pooling that
        keeps an extra channel apart from the others and maps zero to zero."""
        return self in (PoolType.AVG, PoolType.ADAPTIVE_AVG, PoolType.MEAN, PoolType.MAX, PoolType.ADAPTIVE_MAX)


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


class NormFamily(str, enum.Enum):
    """Which statistics a normalization layer uses (compares equal to its string value)."""

    BATCH = "batch"  # per channel, over the batch (running statistics in eval mode)
    LAYER = "layer"  # per example, over the features
    GROUP = "group"  # per example, over groups of channels
    INSTANCE = "instance"  # per example and channel, over locations
    RMS = "rms"  # per example, root mean square only (no centering)
    MINIMAL_RMS = "minimal_rms"  # the consistency paper's unit: a running root mean square (docs/theory.md §8.3)
    OTHER = "other"

    def __str__(self) -> str:
        return self.value

    @property
    def per_example(self) -> bool:
        """Normalizes each example over its features (layer, group, RMS): q becomes the gain's square."""
        return self in (NormFamily.LAYER, NormFamily.GROUP, NormFamily.RMS)


@dataclass(frozen=True)
class NormSpec:
    """A normalization layer.

    Args:
        family: a :class:`NormFamily` (a string such as ``"batch"`` is converted).
        train_dependent: True when the layer uses batch statistics in train mode.
        channels: number of normalized channels (features), when known.
        activation: the activation a norm+act composite applies after normalizing.
        composite: True for norm+act composites such as timm's ``BatchNormAct2d``.
    """

    family: NormFamily
    train_dependent: bool
    channels: int | None = None
    activation: ActivationSpec | None = None
    composite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", NormFamily(self.family))


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

    @property
    def constant_factor(self) -> float | None:
        """``c`` when the node computes ``c · h`` with a Python number ``c`` (an ``AFFINE`` scale),
        else None. A sum's term written ``c · h`` carries ``c`` in its own kernel already."""
        if self.kind is OpKind.AFFINE and "factor" in self.attrs:
            return float(self.attrs["factor"])
        return None

    def describe(self) -> str:
        """A one-phrase description, e.g. ``"activation relu"`` or ``"norm batch+relu"``."""
        if self.activation is not None:
            return f"{self.kind} {self.activation}"
        if self.norm is not None:
            act = f"+{self.norm.activation}" if self.norm.activation else ""
            return f"{self.kind} {self.norm.family}{act}"
        return f"{self.kind} {self.name}"


def pool_type(info: OpInfo) -> PoolType | None:
    """The pool type of a ``POOL`` node (None when its rule gave none or an unknown one)."""
    value = info.attrs.get("pool_type")
    try:
        return None if value is None else PoolType(value)
    except ValueError:
        return None
