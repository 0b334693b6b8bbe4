"""Self-attention whose matrix at initialization is a chosen pattern (docs/theory.md §9).

``attention_shaping`` puts one of these where a model computed
``softmax(q kᵀ · scale + mask) v`` (``F.scaled_dot_product_attention`` or the same written out):

* ``ShapedAttention`` (E-SPA / U-SPA, He et al. arXiv:2302.10322): ``d ⊙ softmax(q kᵀ · scale + B) v``
  with a trainable position bias ``B`` (one ``T x T`` per head) and a fixed per-position rescaling
  ``d``. The pass zeroes the query projection, so at initialization the attention matrix is
  ``diag(d) softmax(B)``: the pattern. Causal models keep ``-inf`` above the diagonal.
* ``ValueSkipInit`` (He & Hofmann arXiv:2311.01906): ``α v + β attention(q, k, v)`` with
  trainable per-head ``α = 1``, ``β = 0``: the identity matrix at initialization.

:meth:`init_matrix` gives the attention matrix at zero query-key logits, which the analysis uses
as the block's token map ``Σ -> A Σ Aᵀ``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShapedAttention", "ValueSkipInit", "mix_heads"]


def mix_heads(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[..., H, T, S]`` -> ``[..., G, T, S]``: ``out[g] = Σ_h weight[g, h] x[h]``, the head mixing of
    talking-heads attention (Shazeer et al. arXiv:2003.02436); a head axis of 1 is broadcast first."""
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], weight.shape[1], *x.shape[-2:])
    return torch.einsum("gh,...hij->...gij", weight.to(x.dtype), x)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


class ShapedAttention(nn.Module):
    """``d ⊙ softmax(q kᵀ · scale + B + mask) v`` over the last two axes (``[..., T, d]`` inputs).

    Args:
        log_pattern: ``[T, T]`` bias ``B`` at initialization (``-inf`` where masked).
        row_scale: ``[T]`` rescaling ``d`` of each query position (fixed).
        heads: the number of heads (one bias per head); 1 for ``[B, T, d]`` inputs.
        causal: whether the mask is causal (the bias keeps ``-inf`` above the diagonal).
        scale: the logits' scale (None: ``1/sqrt(d)``, as ``scaled_dot_product_attention``).
        dropout: attention dropout in training mode (used when the call passes no ``dropout_p``).
        mode: ``"e-spa"`` or ``"u-spa"``, for reports.
        enable_gqa: passed to ``scaled_dot_product_attention`` (fewer key/value heads).
        offset: ``[heads, T, T]``, the additive position bias the call's own mask adds at
            initialization (relative positions, ALiBi); ``log_pattern`` has it subtracted, and
            :meth:`init_matrix` adds it back.

    Attribute ``zeroed_query`` (set by the pass, not saved in the state dict): ``(weight, axis, rows,
    bias)`` of the query projection rows it zeroed, which ``orthogonal_init`` keeps at zero.
        logit_gain: None, or the start of a trainable per-head gain on the query-key logits
            (0: the product starts at zero without touching the query weights).
        logit_mix: None, or ``[heads, heads]``: talking heads' mixing of the logits before the softmax
            (trainable, started from the model's). A mask passed as ``premix_mask`` is added before it.
        weight_mix: whether talking heads mix the attention weights after the softmax: a trainable
            ``[heads, heads]`` matrix and bias starting at the identity and zero, so the matrix at
            initialization is still the pattern.
    """

    def __init__(self, log_pattern: torch.Tensor, row_scale: torch.Tensor, heads: int = 1, causal: bool = False,
                 scale: float | None = None, dropout: float = 0.0, mode: str = "e-spa",
                 enable_gqa: bool = False, logit_gain: float | None = None, offset: torch.Tensor | None = None,
                 logit_mix: torch.Tensor | None = None, weight_mix: bool = False) -> None:
        super().__init__()
        t = log_pattern.shape[-1]
        if log_pattern.shape[-2:] != (t, t) or log_pattern.dim() not in (2, 3) or row_scale.shape != (t,):
            raise ValueError(f"pattern must be [T, T] or [heads, T, T] and row_scale [T]; got "
                             f"{tuple(log_pattern.shape)}, {tuple(row_scale.shape)}")
        allowed = torch.isfinite(log_pattern.reshape(-1, t, t)[0])
        self.register_buffer("allowed", allowed)
        self.bias = nn.Parameter(torch.where(allowed, log_pattern, torch.zeros(())).float()
                                 .expand(heads, t, t).clone())
        # the model's own additive position bias at initialization (added by the call): init_matrix adds it
        self.register_buffer("offset", None if offset is None else offset.float().expand(heads, t, t).clone(),
                             persistent=False)
        self.register_buffer("row_scale", row_scale.float().clone())
        self.causal, self.scale, self.dropout, self.mode = bool(causal), scale, float(dropout), mode
        self.enable_gqa = bool(enable_gqa)
        self.logit_gain = None if logit_gain is None else nn.Parameter(torch.full((heads, 1, 1), float(logit_gain)))
        self.zeroed_query: list[tuple[torch.Tensor, int, list[int], torch.Tensor | None]] = []
        if (logit_mix is not None or weight_mix) and enable_gqa:
            raise ValueError("talking heads (logit_mix, weight_mix) need one key/value head per query head")
        if logit_mix is not None and tuple(logit_mix.shape) != (heads, heads):
            raise ValueError(f"logit_mix must be [{heads}, {heads}], got {tuple(logit_mix.shape)}")
        self.logit_mix = None if logit_mix is None else nn.Parameter(logit_mix.detach().float().clone())
        self.weight_mix = nn.Parameter(torch.eye(heads)) if weight_mix else None
        self.weight_mix_bias = nn.Parameter(torch.zeros(heads)) if weight_mix else None

    @torch.no_grad()
    def set_rows(self, row_scale: torch.Tensor) -> None:
        """New per-position rescaling ``d`` (the position bias is kept)."""
        if row_scale.shape != self.row_scale.shape:
            raise ValueError(f"row_scale must be {tuple(self.row_scale.shape)}, got {tuple(row_scale.shape)}")
        self.row_scale.copy_(row_scale.to(self.row_scale))

    @property
    def length(self) -> int:
        return self.bias.shape[-1]

    def _bias(self, tq: int, tk: int, dtype: torch.dtype) -> torch.Tensor:
        if tk > self.length or tq > tk:
            raise RuntimeError(f"ShapedAttention was shaped for sequences of at most {self.length} tokens; got "
                               f"{tq} queries over {tk} keys (re-run attention_shaping with longer example inputs)")
        rows = slice(tk - tq, tk)  # the last tq positions query (a cache holds the earlier keys)
        b = self.bias[:, rows, :tk].masked_fill(~self.allowed[rows, :tk], float("-inf"))
        return b.to(dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float | None = None, premix_mask: torch.Tensor | None = None) -> torch.Tensor:
        tq, tk = q.shape[-2], k.shape[-2]
        bias = self._bias(tq, tk, q.dtype)
        if q.dim() == 3:
            bias = bias[0]
        extra = _additive(attn_mask, q.dtype)
        mask = bias if extra is None else bias + extra
        p = (self.dropout if self.training else 0.0) if dropout_p is None else dropout_p
        kw = {"enable_gqa": True} if self.enable_gqa else {}
        if self.logit_gain is not None:
            q = q * (self.logit_gain[0] if q.dim() == 3 else self.logit_gain).to(q.dtype)
        if self.logit_mix is None and self.weight_mix is None and premix_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale, **kw)
        else:  # talking heads: the logits and/or the weights are mixed across heads, so no fused kernel
            logits = (q @ k.transpose(-2, -1)) * (self.scale if self.scale is not None else q.shape[-1] ** -0.5)
            if premix_mask is not None:
                logits = logits + _additive(premix_mask, q.dtype)
            if self.logit_mix is not None:
                logits = mix_heads(self.logit_mix, logits)
            a = torch.softmax(logits + mask, dim=-1)
            a = F.dropout(a, p) if p > 0 else a
            if self.weight_mix is not None:
                a = mix_heads(self.weight_mix, a) + self.weight_mix_bias.to(a.dtype)[:, None, None]
            out = a @ v
        return out * self.row_scale[tk - tq:tk, None].to(out.dtype)

    @torch.no_grad()
    def init_matrix(self, t: int | None = None) -> torch.Tensor:
        """``[heads, t, t]``: the attention matrix at zero query-key logits, ``diag(d) softmax(B)``."""
        t = self.length if t is None else t
        logits = self._bias(t, t, torch.float64)
        if self.offset is not None:
            logits = logits + self.offset[:, :t, :t].double()
        a = torch.softmax(logits, dim=-1)
        if self.weight_mix is not None:
            a = mix_heads(self.weight_mix.double(), a) + self.weight_mix_bias.double()[:, None, None]
        return a * self.row_scale[:t, None].double()

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, heads={self.bias.shape[0]}, length={self.length}, causal={self.causal}, "
                f"scale={self.scale}")


class ValueSkipInit(nn.Module):
    """``α v + β softmax(q kᵀ · scale + mask) v`` with per-head ``α = 1``, ``β = 0`` at initialization.

    Args:
        heads: one ``α``, ``β`` per head (1 for ``[B, T, d]`` inputs).
        causal: the original call's ``is_causal``.
        scale: the original call's scale (None: ``1/sqrt(d)``).
        dropout: attention dropout in training mode (used when the call passes no ``dropout_p``).
    """

    def __init__(self, heads: int = 1, causal: bool = False, scale: float | None = None, dropout: float = 0.0,
                 enable_gqa: bool = False) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(heads, 1, 1))
        self.beta = nn.Parameter(torch.zeros(heads, 1, 1))
        self.causal, self.scale, self.dropout, self.enable_gqa = bool(causal), scale, float(dropout), bool(enable_gqa)
        self.mode = "value-skipinit"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float | None = None) -> torch.Tensor:
        p = (self.dropout if self.training else 0.0) if dropout_p is None else dropout_p
        kw = {"enable_gqa": True} if self.enable_gqa else {}
        causal = self.causal and attn_mask is None
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=_additive(attn_mask, q.dtype), dropout_p=p,
                                             is_causal=causal, scale=self.scale, **kw)
        if self.enable_gqa and v.shape[-3] != q.shape[-3]:
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        alpha, beta = (self.alpha[0], self.beta[0]) if q.dim() == 3 else (self.alpha, self.beta)
        return alpha * v + beta * att

    @torch.no_grad()
    def init_matrix(self, t: int) -> torch.Tensor:
        """``[heads, t, t]``: ``α I + β U`` with ``U`` the attention at zero logits (uniform, causal or not)."""
        u = torch.ones(t, t, dtype=torch.float64)
        if self.causal:
            u = torch.tril(u)
        u = u / u.sum(dim=1, keepdim=True)
        eye = torch.eye(t, dtype=torch.float64)
        return self.alpha.double() * eye + self.beta.double() * u

    def extra_repr(self) -> str:
        return f"heads={self.alpha.shape[0]}, causal={self.causal}, scale={self.scale}"

