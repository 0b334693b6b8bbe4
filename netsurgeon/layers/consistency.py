"""Modules of the consistency toolkit (docs/theory.md §8.3–§8.4): minimal RMS normalization, modulus unit."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MinimalRMSNorm", "Modulus"]


class MinimalRMSNorm(nn.Module):
    """``x / r`` with ``r`` a moving average of the minibatch root mean square: one scalar,
    no centering, no affine, a constant in backpropagation.

    In train mode each call folds the batch's RMS into ``running_rms`` (like batch norm's
    running statistics) and divides by the updated average; in eval mode it divides by
    ``running_rms`` unchanged.

    Args:
        momentum: weight of the new batch in the moving average. Default: 0.1.
        eps: added under the square root. Default: 1e-5.
    """

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)
        self.register_buffer("running_rms", torch.ones(()))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                rms = (x.detach().pow(2).mean() + self.eps).sqrt()
                # the first batch sets the average; a tensor condition, so torch.compile needs no guard
                new = torch.where(self.num_batches_tracked == 0, rms,
                                  (1 - self.momentum) * self.running_rms + self.momentum * rms)
                self.running_rms.copy_(new)
                self.num_batches_tracked.add_(1)
        return x / self.running_rms.detach().to(x.dtype)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum:g}, eps={self.eps:g}"


class Modulus(nn.Module):
    """``|x|``: the modulus unit used in place of ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()
