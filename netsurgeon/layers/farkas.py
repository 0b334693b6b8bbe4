"""``FarkasLayer``: a linear/conv layer plus one computed Farkas unit (docs/theory.md §6).

The layer's ``m`` outputs ``z`` get one more channel ``z_F = -agg(z - b) + b_F`` (per
location), with ``agg`` the mean or the sum over channels and ``b`` the layer's bias.
If every unit of the layer were ``<= 0`` then ``agg(z - b) <= -agg(b)`` and
``z_F >= agg(b) + b_F > 0`` whenever ``b_F > -agg(b)``: some unit of every location is
positive, so a ReLU layer always passes gradient (Farkas' lemma). With ``bias="learned"``
``b_F = max(-agg(b) + margin, b_learned)`` (the authors' lower clamp, with a small margin
so the inequality is strict); with ``bias="fixed"`` ``b_F`` is a constant buffer. For
one-sided activations with a cutoff ``t`` (ELU, GELU, SiLU) the floor is raised by ``2t``
(mean) or ``(m+1)t`` (sum): some unit then exceeds the cutoff.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import InvalidArgumentError

__all__ = ["FarkasLayer", "FarkasSum"]


class FarkasLayer(nn.Module):
    """``cat([layer(x), z_F], dim)`` with the computed Farkas unit ``z_F``, on the layer's channel
    dimension: the last one for ``nn.Linear`` (so ``[batch, tokens, features]`` inputs work), 1 for
    convolutions.

    Args:
        layer: an ``nn.Linear`` or ``nn.Conv{1,2,3}d`` (groups 1); kept as the ``layer`` submodule.
        agg: ``"mean"`` or ``"sum"`` over the output channels.
        bias: ``"learned"`` (parameter ``farkas_bias``, clamped from below) or ``"fixed"``
            (buffer ``farkas_bias`` with the given positive ``value``).
        value: the fixed ``b_F``, or the learned one's initial value. Default: 0.
        cutoff: the activation's cutoff ``t`` (0 for ReLU). Default: 0.
        margin: how far above ``-agg(b) + 2t`` the clamp keeps ``b_F``. Default: 1e-3.

    Example:
        >>> f = FarkasLayer(nn.Linear(4, 3))
        >>> f(torch.randn(5, 4)).shape
        torch.Size([5, 4])
    """

    def __init__(self, layer: nn.Module, agg: str = "mean", bias: str = "learned", value: float = 0.0,
                 cutoff: float = 0.0, margin: float = 1e-3) -> None:
        super().__init__()
        if agg not in ("mean", "sum"):
            raise InvalidArgumentError(f"agg must be 'mean' or 'sum', got {agg!r}")
        if bias not in ("learned", "fixed"):
            raise InvalidArgumentError(f"bias must be 'learned' or 'fixed', got {bias!r}")
        if bias == "fixed" and not value > 2 * cutoff:
            raise InvalidArgumentError(f"a fixed Farkas bias must exceed 2 * cutoff = {2 * cutoff}; got {value}")
        self.layer = layer
        self.dim = -1 if isinstance(layer, nn.Linear) else 1
        self.agg, self.bias_mode, self.cutoff, self.margin = agg, bias, float(cutoff), float(margin)
        init = torch.tensor(float(value), dtype=layer.weight.dtype, device=layer.weight.device)
        if bias == "learned":
            self.farkas_bias = nn.Parameter(init)
        else:
            self.register_buffer("farkas_bias", init)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (the Farkas unit has none of its own)."""
        return self.layer.weight

    def _aggregate(self, t: torch.Tensor) -> torch.Tensor:
        return t.mean(dim=self.dim, keepdim=True) if self.agg == "mean" else t.sum(dim=self.dim, keepdim=True)

    def effective_bias(self) -> torch.Tensor:
        """``b_F`` as used: for ``learned``, clamped from below so that some unit exceeds the cutoff
        ``t`` whenever all the layer's units are at most ``t`` (mean: ``2t - mean(b)``; sum:
        ``(m+1)t - sum(b)``; plus ``margin``)."""
        if self.bias_mode == "fixed":
            return self.farkas_bias
        m = self.layer.weight.shape[0]
        floor = torch.as_tensor((2.0 if self.agg == "mean" else m + 1.0) * self.cutoff + self.margin,
                                dtype=self.farkas_bias.dtype, device=self.farkas_bias.device)
        b = self.layer.bias
        if b is not None:
            floor = floor - (b.mean() if self.agg == "mean" else b.sum())
        return torch.maximum(self.farkas_bias, floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layer(x)
        b = self.layer.bias
        agg = self._aggregate(z)  # agg(z - b) = agg(z) - agg(b): no full-size subtraction
        if b is not None:
            agg = agg - (b.mean() if self.agg == "mean" else b.sum())
        return torch.cat([z, self.effective_bias() - agg], dim=self.dim)

    def extra_repr(self) -> str:
        return f"agg={self.agg}, bias={self.bias_mode}, cutoff={self.cutoff:g}"


class FarkasSum(nn.Module):
    """``cat([s, b_F - agg(s)], dim)``: the Farkas unit of a residual block's sum ``s``
    (FarkasNet's block construction; docs/theory.md §6.6). If every channel of ``s`` is ``<= t`` the
    unit is ``>= b_F - t`` (mean), so with ``b_F > 2t`` some channel exceeds ``t``.

    Args:
        agg: ``"mean"`` or ``"sum"``.
        bias: ``"learned"`` (parameter, clamped below at ``2t + margin`` for the mean) or
            ``"fixed"`` (buffer).
        value: initial or fixed ``b_F``. cutoff, margin: as in :class:`FarkasLayer`.
        dim: the channel dimension of ``s``: 1 (convolutions, the default) or -1 (features last).
    """

    def __init__(self, channels: int, agg: str = "mean", bias: str = "learned", value: float = 0.0,
                 cutoff: float = 0.0, margin: float = 1e-3, dim: int = 1) -> None:
        super().__init__()
        self.channels, self.agg, self.bias_mode, self.dim = channels, agg, bias, dim
        self.cutoff, self.margin = float(cutoff), float(margin)
        init = torch.tensor(float(value))
        if bias == "learned":
            self.farkas_bias = nn.Parameter(init)
        else:
            self.register_buffer("farkas_bias", init)

    def effective_bias(self) -> torch.Tensor:
        if self.bias_mode == "fixed":
            return self.farkas_bias
        factor = 2.0 if self.agg == "mean" else self.channels + 1.0
        return self.farkas_bias.clamp_min(factor * self.cutoff + self.margin)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        agg = s.mean(dim=self.dim, keepdim=True) if self.agg == "mean" else s.sum(dim=self.dim, keepdim=True)
        return torch.cat([s, self.effective_bias().to(s.dtype) - agg], dim=self.dim)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, agg={self.agg}, bias={self.bias_mode}, cutoff={self.cutoff:g}, dim={self.dim}"
