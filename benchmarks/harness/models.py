"""The small CIFAR ResNets of the benchmarks: post-activation BasicBlocks, with or without batch norm.

He, Zhang, Ren & Sun, "Deep residual learning for image recognition", arXiv:1512.03385 (the
BasicBlock, section 4.2's CIFAR layout). ``benchmarks/train_identity.py`` uses 3 stages of
widths 16/32/64, ``benchmarks/train_farkas.py`` the ResNet-18 layout (4 stages) at widths
16/32/64/128.

Example:
    >>> import torch
    >>> net = SmallResNet(norm=False, widths=(8, 16), blocks=(1, 1))
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["BasicBlock", "SmallResNet"]


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; without norm the BNs are
    identities and the convs have biases. A 1x1 projection (and BN) is the shortcut where the
    stride or the width changes.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of conv1 and of the projection shortcut.
        norm: BatchNorm after every conv (convs without bias), or no norm (convs with bias).
        extra: widens conv1 (and bn1, conv2's input) by this many channels. Default: 0.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: bool, extra: int = 0) -> None:
        super().__init__()
        mid = c_out + extra
        self.conv1 = nn.Conv2d(c_in, mid, 3, stride, 1, bias=not norm)
        self.bn1 = nn.BatchNorm2d(mid) if norm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, c_out, 3, 1, 1, bias=not norm)
        self.bn2 = nn.BatchNorm2d(c_out) if norm else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=not norm),
                                          nn.BatchNorm2d(c_out) if norm else nn.Identity())
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet for 32x32 inputs: 3x3 stem (+ BN) and ReLU, stages ``layer1``, ``layer2``, ...
    of BasicBlocks (stride 2 in the first block of every stage but the first), global average
    pooling, linear head ``fc``.

    Args:
        norm: BatchNorm after every conv (convs without bias), or no norm (convs with bias).
        widths: output channels of each stage; the stem has ``widths[0]``.
        blocks: BasicBlocks per stage, as many entries as ``widths``.
        extra: extra output channels of every block's conv1 (:class:`BasicBlock`). Default: 0.
        num_classes: outputs of the head. Default: 10.
    """

    def __init__(self, norm: bool, widths: Sequence[int], blocks: Sequence[int], extra: int = 0,
                 num_classes: int = 10) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths={tuple(widths)} and blocks={tuple(blocks)} need the same, non-zero length")
        c = widths[0]
        self.stem = nn.Conv2d(3, c, 3, 1, 1, bias=not norm)
        self.bn = nn.BatchNorm2d(c) if norm else nn.Identity()
        self.relu = nn.ReLU()
        self.stages: list[str] = []
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stage = []
            for b in range(n):
                stage.append(BasicBlock(c, width, 2 if i > 0 and b == 0 else 1, norm, extra))
                c = width
            self.stages.append(f"layer{i + 1}")
            self.add_module(self.stages[-1], nn.Sequential(*stage))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.pool(x), 1))
