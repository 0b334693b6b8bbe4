"""The kernel of an elementwise product of independent signals (docs/theory.md §3.8).

Squeeze-excite, ECA, gather-excite, CBAM-style and gated-MLP units compute ``y = a ⊙ b``
where ``b`` (the gate) is computed from ``a`` through an independently initialized weight
(``b = σ(W₂ φ(W₁ pool(a)))``), or ``a`` and ``b`` come from the same input through two
independent weights (``φ(W₁ x) ⊙ W₂ x``). At initialization and in the wide limit the
gate is independent of each signal feature it multiplies, so for an input pair

    q_y = q_a q_b,    k_y = k_a k_b,    c_y = c_a c_b,

with the mean over features of ``E[a a'] E[b b']`` read as the product of the means
("features assumed alike"; a gate broadcast over locations multiplies every location of
its channel by the same value). At ``c = 1`` the derivative follows the product rule,
``dk_y = dk_a q_b + q_a dk_b``, so the local ``C'(1)`` of the product is the sum of the
operands' ``C'(1)``: a gate whose own C map is not flat adds to the slope.

Which products the rule covers is decided from the graph: the two operands must be
separated by an independent Linear/Conv weight (the test of :mod:`.sums`). ``x * sigmoid(x)``
written out, or ``h * h``, fail it; the engine measures those instead (with that reason).
Divisions by a signal and matrix products (attention) have no rule here.

Example:
    >>> import torch, torch.nn as nn, netsurgeon
    >>> class Gated(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(256, 256, bias=False), nn.Linear(256, 256, bias=False)
    ...     def forward(self, x):
    ...         return self.a(x) * self.b(x)
    >>> a = netsurgeon.analyze(Gated())
    >>> a.status("mul")[0], round(a.q("mul") / (a.q("a") * a.q("b")), 12)
    ('approximate', 1.0)
"""
from __future__ import annotations

from ..ops import OpKind
from .rules import APPROX, KernelContext, NodeKernel, kernel_rule, reasons, worse

__all__ = ["ELEMENTWISE_PRODUCTS", "INDEPENDENCE"]

ELEMENTWISE_PRODUCTS = ("mul",)  # OpInfo names of elementwise products of two signals (a division has no rule)
INDEPENDENCE = "product of signals: operands assumed independent (wide limit; features assumed alike)"


@kernel_rule(OpKind.MULTIPLY)
def _product(ctx: KernelContext, inputs: list[NodeKernel]) -> NodeKernel | None:
    """``q = q_a q_b``, ``k = k_a k_b``, ``dk = dk_a q_b + q_a dk_b`` for an elementwise product of
    two signals; None (measured) for anything else. The engine does not call it for products
    whose operands the graph shows to be dependent (see :func:`.sums.dependent_products`)."""
    if ctx.info.name not in ELEMENTWISE_PRODUCTS or len(inputs) != 2:
        return None
    a, b = inputs
    ka1, kb1 = float(a.k[-1]), float(b.k[-1])  # k at c_in = 1 (the grid ends at 1)
    return NodeKernel(a.q * b.q, a.q2 * b.q2, a.k * b.k, a.dk * kb1 + ka1 * b.dk,
                      worse(a.status, b.status, APPROX), reasons(a.reason, b.reason, INDEPENDENCE))
