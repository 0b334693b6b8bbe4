"""``ShapedActivation``: an activation with the DKS/TAT constants, ``γ (φ(α x + β) + δ)``;
``FunctionActivation``: any elementwise function with its parameters, as a module."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["FunctionActivation", "ShapedActivation"]


class FunctionActivation(nn.Module):
    """``fn(x, **params)`` as a module: the base a reshaped functional call site gets when its
    activation has no module of its own (``torch.abs``, ``F.logsigmoid``, a user function).

    Args:
        name: the activation's registered name (``netsurgeon.register_activation``).
        fn: the elementwise torch function.
        params: its parameters, passed by keyword.

    Example:
        >>> m = FunctionActivation("abs", torch.abs, {})
        >>> m(torch.tensor([-2.0, 3.0])).tolist()
        [2.0, 3.0]
    """

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], params: dict[str, Any]) -> None:
        super().__init__()
        self.name, self.fn, self.params = str(name), fn, dict(params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **self.params)

    def extra_repr(self) -> str:
        inner = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.name}({inner})" if inner else self.name


class ShapedActivation(nn.Module):
    """``γ (base(α x + β) + δ)`` with non-trainable constants kept as buffers.

    The buffers follow ``.to(device)``/``.double()`` and are saved in ``state_dict``. A
    ``LeakyReLU`` base also keeps its negative slope in a buffer, which ``load_state_dict``
    copies back into the base.

    Args:
        base: the elementwise activation module φ (kept as a submodule).
        alpha, beta, gamma, delta: the constants (docs/theory.md §4.1, §5).

    Example:
        >>> m = ShapedActivation(nn.Tanh(), 0.5, 0.25, 2.0, -0.125)
        >>> m.constants()
        (0.5, 0.25, 2.0, -0.125)
    """

    def __init__(self, base: nn.Module, alpha: float, beta: float, gamma: float, delta: float) -> None:
        super().__init__()
        self.base = base
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("delta", delta)):
            self.register_buffer(name, torch.tensor(float(value)))
        if isinstance(base, nn.LeakyReLU):  # TAT's slope can depend on the weights (measured products)
            self.register_buffer("negative_slope", torch.tensor(float(base.negative_slope)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if isinstance(self.base, nn.LeakyReLU):  # the base reads a float: keep it in step with the buffer
            self.base.negative_slope = float(self.negative_slope)

    def constants(self) -> tuple[float, float, float, float]:
        """``(α, β, γ, δ)`` as Python floats."""
        return tuple(float(getattr(self, n)) for n in ("alpha", "beta", "gamma", "delta"))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * (self.base(self.alpha * x + self.beta) + self.delta)

    def extra_repr(self) -> str:
        a, b, g, d = self.constants()
        return f"alpha={a:.6g}, beta={b:.6g}, gamma={g:.6g}, delta={d:.6g}"
