"""A fixed per-channel affine map: what a batch norm in eval mode computes."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import InvalidArgumentError

__all__ = ["ChannelAffine"]


class ChannelAffine(nn.Module):
    """``y = x * scale + shift`` per channel (dim 1), with the constants as buffers.

    Used where a batch norm can be folded into no neighbouring linear op. The buffers
    follow ``.to(device)`` and ``state_dict``; they are not trained.

    Args:
        scale: per-channel factor, shape ``[C]``.
        shift: per-channel offset, shape ``[C]``.

    Example:
        >>> m = ChannelAffine(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]))
        >>> m(torch.ones(1, 2, 1, 1)).flatten().tolist()
        [2.0, 2.0]
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        if scale.shape != shift.shape or scale.dim() != 1:
            raise InvalidArgumentError(f"scale and shift must be 1-D of equal length; got {tuple(scale.shape)} "
                             f"and {tuple(shift.shape)}")
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"
