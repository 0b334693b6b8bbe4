"""Build the ``nn.Module`` a :class:`topology_specs.ModelSpec` describes, out of real ``torch.nn`` layers.

:func:`build` gives the model (seeded, with non-trivial BatchNorm statistics so that eval and
train mode differ) and an example input; ``_one_thread`` is the module-scoped autouse fixture
the topology test files import.

Example:
    >>> from topology_specs import Layer, ModelSpec
    >>> model, x = build(ModelSpec(4, (Layer("conv1", 4, 6, True, "relu"),)), seed=0)
    >>> tuple(model(x).shape)
    (2, 6, 8, 8)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from topology_specs import (FUNCTION_ACTS, MODULE_ACTS, BranchAdd, Concat, Item, Layer, ModelSpec, Residual,
                            cout_of, seq_cout)

__all__ = ["Act", "do_add", "LayerMod", "ResidualBlock", "BranchAddBlock", "ConcatBlock", "make_item", "make_seq",
           "Generated", "build", "_one_thread"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convs on 2 busy cores spend ~20 ms each in OpenMP hand-offs; one thread
    makes them ~100x faster. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Act(nn.Module):
    """An activation slot: an nn activation module ``m``, a functional one, or nothing."""

    def __init__(self, name: str | None) -> None:
        super().__init__()
        self.fn = name if name in FUNCTION_ACTS else None
        self.m = {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "tanh": nn.Tanh(),
                  "gelu": nn.GELU()}.get(name) if name in MODULE_ACTS else None

    def forward(self, x):
        if self.m is not None:
            return self.m(x)
        if self.fn == "F.relu":
            return F.relu(x)
        if self.fn == "torch.tanh":
            return torch.tanh(x)
        if self.fn == "method.relu":
            return x.relu()
        return x


def do_add(style: str, a, b):
    if style == "+":
        return a + b
    if style == "torch.add":
        return torch.add(a, b)
    return a.add(b)


class LayerMod(nn.Module):
    def __init__(self, l: Layer) -> None:
        super().__init__()
        self.linear = l.op == "linear"
        self.weight = {"conv3": lambda: nn.Conv2d(l.cin, l.cout, 3, padding=1),
                       "conv1": lambda: nn.Conv2d(l.cin, l.cout, 1),
                       "linear": lambda: nn.Linear(l.cin, l.cout)}[l.op]()
        self.norm = nn.BatchNorm2d(l.cout) if l.bn else None
        self.act = Act(l.act)

    def forward(self, x):
        x = self.weight(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.linear else self.weight(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x)


class Block(nn.Module):
    def __init__(self, marker: bool) -> None:
        super().__init__()
        self.inp = nn.Identity() if marker else None

    def enter(self, x):
        return self.inp(x) if self.inp is not None else x


class ResidualBlock(Block):
    def __init__(self, b: Residual, cin: int) -> None:
        super().__init__(b.marker)
        self.spec = b
        self.branch = make_seq(b.branch, cin)
        if b.projection:
            cout = seq_cout(b.branch, cin)
            self.proj = nn.Conv2d(cin, cout, 1)
            self.proj_bn = nn.BatchNorm2d(cout) if b.proj_bn else None
        self.post = Act(b.post_act)

    def forward(self, x):
        x = self.enter(x)
        sc = x
        if self.spec.projection:
            sc = self.proj(x)
            if self.proj_bn is not None:
                sc = self.proj_bn(sc)
        h = self.branch(x)
        s = self.spec
        return self.post(do_add(s.add_style, sc, h) if s.shortcut_first else do_add(s.add_style, h, sc))


class BranchAddBlock(Block):
    def __init__(self, b: BranchAdd, cin: int) -> None:
        super().__init__(b.marker)
        self.spec = b
        self.left, self.right = make_seq(b.left, cin), make_seq(b.right, cin)
        self.post = Act(b.post_act)

    def forward(self, x):
        x = self.enter(x)
        return self.post(do_add(self.spec.add_style, self.left(x), self.right(x)))


class ConcatBlock(Block):
    def __init__(self, b: Concat, cin: int) -> None:
        super().__init__(b.marker)
        self.kinds = [k for k, _ in b.branches]
        self.branches = nn.ModuleList(
            [nn.Identity() if k == "identity" else nn.MaxPool2d(3, 1, 1) if k == "pool" else make_seq(ls, cin)
             for k, ls in b.branches])

    def forward(self, x):
        x = self.enter(x)
        return torch.cat([x if k == "identity" else m(x) for k, m in zip(self.kinds, self.branches)], dim=1)


def make_item(it: Item, cin: int) -> nn.Module:
    if isinstance(it, Layer):
        assert it.cin == cin
        return LayerMod(it)
    return {Residual: ResidualBlock, BranchAdd: BranchAddBlock, Concat: ConcatBlock}[type(it)](it, cin)


def make_seq(items: tuple, cin: int) -> nn.Sequential:
    mods = []
    for it in items:
        mods.append(make_item(it, cin))
        cin = cout_of(it, cin)
    return nn.Sequential(*mods)


class Generated(nn.Module):
    """Executes a :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.body = make_seq(spec.body, spec.in_ch)
        if spec.head is not None:
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(seq_cout(spec.body, spec.in_ch), spec.head[0])
            self.head_act = Act(spec.head[1])

    def forward(self, x):
        x = self.body(x)
        if self.spec.head is not None:
            x = self.head_act(self.fc(torch.flatten(self.pool(x), 1)))
        return x


def build(spec: ModelSpec, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = Generated(spec)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters: eval and train differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, torch.randn(2, spec.in_ch, 8, 8)
