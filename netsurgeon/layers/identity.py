"""Small modules the identity-at-initialization passes insert (docs/theory.md §7)."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ScalarGate", "ScalarBias", "FixedLinear", "AddIdentity", "ModeConstant"]


class ScalarGate(nn.Module):
    """``x * α`` with one learnable scalar (SkipInit/ReZero start at 0, Fixup's multiplier at 1)."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):g}"


class ScalarBias(nn.Module):
    """``x + b`` with one learnable scalar starting at 0 (Fixup)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class FixedLinear(nn.Module):
    """A linear map whose weight and bias are buffers: a fixed random projection (Hardt & Ma)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, fixed"


class AddIdentity(nn.Module):
    """Parametrization ``W = I + V`` (``I`` the identity matrix or Dirac kernel, a buffer)."""

    def __init__(self, identity: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("identity", identity)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v + self.identity

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.identity


class ModeConstant(nn.Module):
    """A number that follows the module's mode: ``train`` in training, ``eval`` in evaluation.

    The tracer puts one where a call's argument was ``p if self.training else 0.0`` (attention
    dropout), so the graph keeps both behaviours.
    """

    def __init__(self, train: float, eval: float = 0.0) -> None:  # noqa: A002 - the mode's name
        super().__init__()
        self.train_value, self.eval_value = float(train), float(eval)

    def forward(self) -> float:
        return self.train_value if self.training else self.eval_value

    def extra_repr(self) -> str:
        return f"train={self.train_value:g}, eval={self.eval_value:g}"
