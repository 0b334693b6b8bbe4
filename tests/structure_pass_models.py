"""Shared helpers of the DKS preparation pass tests (``tests/test_normalize_sums.py`` and the
files beside it): the pass record of a transformed model, a seeded input, a conv-relu-conv
branch, and the two residual modules several of those files transform.

Example:
    >>> import netsurgeon
    >>> gm = netsurgeon.transform(_Scaled().eval(), ["normalize_sums"])
    >>> _record(gm, "normalize_sums").changes[0].what.startswith("residual sum of 2 terms")
    True
"""
from __future__ import annotations

import torch
import torch.nn as nn

import netsurgeon

__all__ = ["_record", "_branch", "_x", "_Scaled", "_Three"]


def _record(gm, name):
    return next(p for p in netsurgeon.report(gm).passes if p.name == name)


def _branch(c: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, c, 1))


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class _Scaled(nn.Module):
    """``x + 0.5 f(x)``: the constant 0.5 is replaced, not multiplied."""

    def __init__(self):
        super().__init__()
        self.f = _branch()

    def forward(self, x):
        return x + 0.5 * self.f(x)


class _Three(nn.Module):
    """A residual sum of three terms written as a chain of two adds."""

    def __init__(self):
        super().__init__()
        self.f, self.g = _branch(), _branch()

    def forward(self, x):
        return x + self.f(x) + self.g(x)
