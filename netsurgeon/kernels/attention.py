"""Token kernels of shaped self-attention (numpy only; docs/theory.md §9).

A sequence of ``T`` tokens of width ``n`` has, in the wide limit, a ``T x T`` token kernel
``Σ_ij = <x_i, x_j> / n``. Attention with a fixed matrix ``A`` (its logits do not depend on the
tokens) and orthogonal value/output weights maps it to ``A Σ Aᵀ``. Signal-propagation attention
(He et al., arXiv:2302.10322) picks a family of positive-definite kernels ``Σ(ρ)`` with unit
diagonal, a schedule ``ρ_0 < ρ_1 < ... < ρ_L`` over the ``L`` attention blocks, and the matrix
that carries one into the next:

* causal: ``A_l = chol(Σ_l) chol(Σ_{l-1})⁻¹`` (lower triangular, as the mask requires);
* bidirectional: ``A_l = Σ_l^{1/2} Σ_{l-1}^{-1/2}`` (symmetric square roots).

so ``A_l Σ_{l-1} A_lᵀ = Σ_l`` exactly. Families: ``"e-spa"`` ``Σ_ij = ρ^{|i-j|}`` (correlation
decaying exponentially with distance) and ``"u-spa"`` ``Σ = (1-ρ) I + ρ 11ᵀ`` (uniform). Both give
non-negative ``A`` when ``ρ`` grows; a row of a non-negative matrix is a row-sum ``d_i`` times a
softmax row, so ``A = diag(d) softmax(B)`` with ``B = log(A / d)``: a position bias the softmax
can start from (query-key logits are zero at initialization) and a per-position rescaling.

Example:
    >>> import numpy as np
    >>> rhos = schedule("e-spa", 16, 4, 0.3)
    >>> a = transition(family_kernel("e-spa", 16, rhos[0]), family_kernel("e-spa", 16, rhos[1]), causal=True)
    >>> bool(np.allclose(a @ family_kernel("e-spa", 16, rhos[0]) @ a.T, family_kernel("e-spa", 16, rhos[1])))
    True
"""
from __future__ import annotations

import numpy as np

__all__ = ["FAMILIES", "family_kernel", "mean_off_diagonal", "final_rho", "schedule", "transition",
           "as_softmax", "fit_rows", "PatternError"]

FAMILIES = ("e-spa", "u-spa")
_LOG_FLOOR = -80.0  # a bias this low gives a weight of e^-80 relative: zero for the pattern, still a number


class PatternError(ValueError):
    """A requested pattern cannot be written as non-negative attention weights."""


def family_kernel(family: str, t: int, rho: float) -> np.ndarray:
    """The unit-diagonal ``t x t`` kernel of ``family`` at ``rho`` in ``[0, 1)``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if family == "e-spa":
        i = np.arange(t)
        return float(rho) ** np.abs(i[:, None] - i[None, :]).astype(float)
    return (1.0 - rho) * np.eye(t) + rho * np.ones((t, t))


def mean_off_diagonal(s: np.ndarray) -> float:
    """The mean off-diagonal cosine of a kernel matrix (its entries over the diagonal's geometric means)."""
    d = np.sqrt(np.clip(np.diag(s), 1e-300, None))
    c = s / d[:, None] / d[None, :]
    t = s.shape[0]
    return float((c.sum() - np.trace(c)) / max(t * (t - 1), 1))


def final_rho(family: str, t: int, target: float) -> float:
    """The ``ρ`` whose kernel has mean off-diagonal cosine ``target`` (bisection; it is monotone in ρ)."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target cosine must be in [0, 1), got {target}")
    if family == "u-spa" or t < 2:
        return float(target)
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mean_off_diagonal(family_kernel(family, t, mid)) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def schedule(family: str, t: int, blocks: int, target: float) -> list[float]:
    """``ρ_0 = 0`` (independent tokens) to ``ρ_L`` meeting ``target``, with ``1 - ρ_l = (1 - ρ_L)^{l/L}``:
    every block takes the same step in ``log(1 - ρ)``, as DKS spreads a C map over the depth."""
    if blocks < 1:
        raise ValueError(f"need at least one attention block, got {blocks}")
    last = final_rho(family, t, target)
    return [1.0 - (1.0 - last) ** (l / blocks) for l in range(blocks + 1)]


def _sym_power(s: np.ndarray, p: float) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (s + s.T))
    w = np.clip(w, 1e-12, None)
    return (v * w ** p) @ v.T


def transition(before: np.ndarray, after: np.ndarray, causal: bool) -> np.ndarray:
    """The matrix ``A`` with ``A before Aᵀ = after``: lower triangular (causal) or from symmetric roots.

    Raises:
        PatternError: when ``A`` has a clearly negative entry (attention weights cannot be negative).
    """
    if causal:
        a = np.linalg.cholesky(after) @ np.linalg.inv(np.linalg.cholesky(before))
        a = np.tril(a)
    else:
        a = _sym_power(after, 0.5) @ _sym_power(before, -0.5)
    worst = float(a.min())
    if worst < -1e-6 * float(np.abs(a).max()):
        raise PatternError(f"the pattern needs a negative attention weight ({worst:.3g})")
    return np.clip(a, 0.0, None)


def as_softmax(a: np.ndarray, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(d, b)`` with ``a ≈ diag(d) softmax(b)`` row by row; masked (causal) entries of ``b`` are
    ``-inf``, allowed zero weights get a bias of -80 below the row's largest."""
    d = a.sum(axis=1)
    if np.any(d <= 0):
        raise PatternError("a row of the pattern has no positive weight")
    p = a / d[:, None]
    with np.errstate(divide="ignore"):
        b = np.log(p)
    top = b.max(axis=1, keepdims=True)
    b = np.maximum(b, top + _LOG_FLOOR)
    if causal:
        b = np.where(np.tril(np.ones_like(b, dtype=bool)), b, -np.inf)
    return d, b


def fit_rows(p: np.ndarray, sigma_in: np.ndarray) -> np.ndarray:
    """Row scales ``d`` with ``diag(d P Σ_in Pᵀ d) = q̄`` (``q̄`` the mean diagonal of ``Σ_in``).

    The pattern's rows ``P`` (a softmax: each row sums to 1) keep their shape. The scheduled patterns
    assume a block receives the previous block's scheduled kernel; the MLPs in between raise the
    cosines (an activation's C map), and a row built for the schedule then gives its token a larger q,
    the more so the later the position. Rescaling the rows to the kernel actually received gives
    every token the same q again, and keeps every weight non-negative.
    """
    out = np.einsum("ij,jk,ik->i", p, sigma_in, p)
    q = float(np.mean(np.diag(sigma_in)))
    return np.sqrt(q / np.clip(out, 1e-300, None))
