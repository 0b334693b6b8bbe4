"""Descriptions of small DAG models, for the topology tests, and what each one holds.

A description is a sequence of items, each a plain layer (Conv2d 3x3 / 1x1 or Linear over
channels, optional BatchNorm2d and activation), a residual block (k layers in the branch,
identity or 1x1-projection shortcut), a concat block (2-3 branches: layers, max-pool or the
input itself, ``torch.cat`` on channels) or a two-branch add that is not residual. Branches
may hold one level of nested blocks. The description knows its convs, linears, activations,
norms, adds, concats and residual blocks, and which weight layers sit on each branch:
``tests/topology_models.py`` builds it, ``tests/topology_checks.py`` compares
``netsurgeon.topology`` with it.

Example:
    >>> spec = ModelSpec(6, (Residual((Layer("conv3", 6, 6, True, "relu"), Layer("conv3", 6, 6)),),))
    >>> expected_counts(spec)["conv"], [p for p, _ in merges_of(spec.body, "body")]
    (2, ['body.0'])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = [
    "MODULE_ACTS", "FUNCTION_ACTS", "ACTS", "ADD_STYLES", "Layer", "Residual", "BranchAdd", "Concat", "Item",
    "ModelSpec", "cout_of", "seq_cout", "weights_of", "merges_of", "counts_of", "expected_counts", "is_heavy",
]

MODULE_ACTS = ("relu", "relu_inplace", "tanh", "gelu")
FUNCTION_ACTS = ("F.relu", "torch.tanh", "method.relu")
ACTS = MODULE_ACTS + FUNCTION_ACTS
ADD_STYLES = ("+", "torch.add", "method.add")


@dataclass(frozen=True)
class Layer:
    """One weight layer, optionally followed by BatchNorm2d and an activation."""

    op: str  # "conv3" (3x3, pad 1), "conv1" (1x1) or "linear" (over channels, via permute)
    cin: int
    cout: int
    bn: bool = False
    act: str | None = None


@dataclass(frozen=True)
class Residual:
    branch: tuple  # of items
    projection: bool = False  # 1x1 conv shortcut (else identity)
    proj_bn: bool = False
    shortcut_first: bool = True  # operand order of the sum
    add_style: str = "+"
    post_act: str | None = None
    marker: bool = False  # nn.Identity at the block input: the block's entry


@dataclass(frozen=True)
class BranchAdd:
    """Two non-trivial parallel branches summed: not a residual block."""

    left: tuple
    right: tuple
    add_style: str = "+"
    post_act: str | None = None
    marker: bool = False


@dataclass(frozen=True)
class Concat:
    """``torch.cat`` on channels of 2-3 branches: ("identity", ()), ("pool", ()) or ("layers", items)."""

    branches: tuple
    marker: bool = False


Item = Union[Layer, Residual, BranchAdd, Concat]


@dataclass(frozen=True)
class ModelSpec:
    in_ch: int
    body: tuple  # of items
    head: tuple[int, str | None] | None = None  # pool + flatten + Linear(features) + activation


def cout_of(item: Item, cin: int) -> int:
    if isinstance(item, Layer):
        return item.cout
    if isinstance(item, Residual):
        return seq_cout(item.branch, cin)
    if isinstance(item, BranchAdd):
        return seq_cout(item.left, cin)
    return sum(cin if k != "layers" else seq_cout(ls, cin) for k, ls in item.branches)


def seq_cout(items: tuple, cin: int) -> int:
    for it in items:
        cin = cout_of(it, cin)
    return cin


def weights_of(items: tuple, prefix: str) -> list[str]:
    """Module paths of the weight layers of ``items`` (an nn.Sequential at ``prefix``), in execution order."""
    out: list[str] = []
    for j, it in enumerate(items):
        p = f"{prefix}.{j}"
        if isinstance(it, Layer):
            out.append(f"{p}.weight")
        elif isinstance(it, Residual):
            out += ([f"{p}.proj"] if it.projection else []) + weights_of(it.branch, f"{p}.branch")
        elif isinstance(it, BranchAdd):
            out += weights_of(it.left, f"{p}.left") + weights_of(it.right, f"{p}.right")
        else:
            for b, (_, ls) in enumerate(it.branches):
                out += weights_of(ls, f"{p}.branches.{b}")
    return out


def merges_of(items: tuple, prefix: str) -> list[tuple[str, Item]]:
    """(module path, spec) of every merge block, in the order their merge nodes execute."""
    out: list[tuple[str, Item]] = []
    for j, it in enumerate(items):
        p = f"{prefix}.{j}"
        if isinstance(it, Residual):
            out += merges_of(it.branch, f"{p}.branch") + [(p, it)]
        elif isinstance(it, BranchAdd):
            out += merges_of(it.left, f"{p}.left") + merges_of(it.right, f"{p}.right") + [(p, it)]
        elif isinstance(it, Concat):
            for b, (_, ls) in enumerate(it.branches):
                out += merges_of(ls, f"{p}.branches.{b}")
            out.append((p, it))
    return out


def counts_of(items: tuple) -> dict[str, int]:
    c = dict.fromkeys(("conv", "linear", "activation", "norm", "add", "concat"), 0)

    def add(d: dict[str, int]) -> None:
        for k, v in d.items():
            c[k] += v

    for it in items:
        if isinstance(it, Layer):
            c["conv" if it.op.startswith("conv") else "linear"] += 1
            c["norm"] += it.bn
            c["activation"] += it.act is not None
        elif isinstance(it, Residual):
            add(counts_of(it.branch))
            c["conv"] += it.projection
            c["norm"] += it.projection and it.proj_bn
            c["add"] += 1
            c["activation"] += it.post_act is not None
        elif isinstance(it, BranchAdd):
            add(counts_of(it.left))
            add(counts_of(it.right))
            c["add"] += 1
            c["activation"] += it.post_act is not None
        else:
            for _, ls in it.branches:
                add(counts_of(ls))
            c["concat"] += 1
    return c


def expected_counts(spec: ModelSpec) -> dict[str, int]:
    c = counts_of(spec.body)
    if spec.head is not None:
        c["linear"] += 1
        c["activation"] += spec.head[1] is not None
    return c


def is_heavy(items: tuple) -> bool:
    """Strictly heavier than a conv(+BN) shortcut: two weight layers or an activation."""
    c = counts_of(items)
    return c["conv"] + c["linear"] >= 2 or c["activation"] >= 1
