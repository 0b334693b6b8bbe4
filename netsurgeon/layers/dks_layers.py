"""Parameter-free modules the Deep Kernel Shaping passes insert.

Deep Kernel Shaping (Martens et al., 2021, arXiv:2110.01765) wants network inputs with
``q = 1`` at every location (docs/theory.md §4.7) and average instead of max pooling.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LocationNorm", "ExclusiveAvgPool2dSame"]


class LocationNorm(nn.Module):
    """Scale each location's channel vector to norm ``sqrt(channels)``: ``q = 1`` everywhere.

    ``y = x / sqrt(mean_c(x²) + eps)``, the mean taken over dimension ``dim`` only (the
    channels of NCHW / NCL / NC inputs by default). No mean subtraction, no parameters:
    an RMS norm per location.

    Args:
        dim: the channel dimension; ``-1`` for channels-last inputs. Default: 1.
        eps: added to the mean square before the square root. Default: 1e-6.

    Example:
        >>> y = LocationNorm()(torch.randn(2, 3, 4, 4) * 5)
        >>> bool(torch.allclose(y.pow(2).sum(1), torch.full((2, 4, 4), 3.0)))
        True
    """

    def __init__(self, dim: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(self.dim, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps:g}"


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial dimension."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ExclusiveAvgPool2dSame(nn.Module):
    """TensorFlow-'SAME' average pooling over the in-bounds elements of each window.

    The average counterpart of timm's ``MaxPool2dSame``: that pads with ``-inf``, so
    padded positions never win the max; here they are not counted in the mean (timm's
    ``AvgPool2dSame`` pads with zeros and counts them).

    Args:
        kernel_size: window size ``(kh, kw)``.
        stride: step ``(sh, sw)``.
        ceil_mode: as in ``nn.AvgPool2d``. Default: False.

    Example:
        >>> pool = ExclusiveAvgPool2dSame((3, 3), (2, 2))
        >>> pool(torch.ones(1, 1, 5, 5)).unique().tolist()
        [1.0]
    """

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int], ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.ceil_mode = ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph = _same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pw = _same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        pad = (pw[0], pw[1], ph[0], ph[1])
        ones = F.pad(torch.ones_like(x[:1, :1]), pad)
        total = F.avg_pool2d(F.pad(x, pad), self.kernel_size, self.stride, 0, self.ceil_mode)
        count = F.avg_pool2d(ones, self.kernel_size, self.stride, 0, self.ceil_mode)
        return total / count

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, ceil_mode={self.ceil_mode}"
