"""``LayerwiseLM``: the consistency paper's layer-wise second-order optimizer (docs/theory.md §8.1–§8.2).

For every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` weight the update direction is
``G (A + λI)^(-1)``, with ``A`` a moving average of the layer input's second-moment
matrix ``XᵀX / N`` (for convs the channel-by-channel covariance, pixels pooled). Other
parameters (biases, norms, Farkas biases, ...) get plain SGD with momentum.

Cost control: ``A`` is estimated on a uniform subsample of the input rows
(``subsample``); layers wider than ``chunk_size`` have their input units split at random
(fixed per layer) into chunks and only the chunks' diagonal blocks of ``A`` are inverted;
the inverse is recomputed every ``update_every`` steps. The damping is relative to the mean
eigenvalue of ``A`` (``trace(A)/n``), so it does not depend on the scale of the inputs.

The input statistics are captured by forward pre-hooks that the optimizer registers on
the layers (train mode, gradients enabled). Under ``torch.distributed`` the batch
statistic is averaged over the processes (``all_reduce``) before it enters the average.

Every option is checked at construction; a bad one raises :class:`InvalidArgumentError`
naming it and its valid range. ``damping=0`` is allowed (an exact Newton step on the layer's
least squares) but needs a full-rank ``A``: when a layer's ``A`` is singular (fewer input rows
than input units, or linearly dependent inputs) the step raises ``InvalidArgumentError``
asking for ``damping > 0``; there is no silent pseudo-inverse fallback, since the
pseudo-inverse would quietly switch to a different update rule.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> opt = LayerwiseLM(net, lr=0.1)
    >>> loss = net(torch.randn(16, 8)).pow(2).mean(); loss.backward(); opt.step()
"""
from __future__ import annotations

import copy
import math
import numbers
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import InvalidArgumentError

__all__ = ["LayerwiseLM"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_real(name: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is a finite number (an integer if
    ``integer``) between ``lo`` and ``hi``; ``*_open`` excludes that bound. Bools are rejected."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = ("(" if lo_open else "[") + f"{lo:g}, {hi:g}" + (")" if hi_open or hi == math.inf else "]")
        what = "an integer" if integer else "a number"
        raise InvalidArgumentError(f"LayerwiseLM: {name}={value!r} is invalid; {name} must be {what} in {interval}")


def _numerically_singular(a: torch.Tensor) -> torch.Tensor:
    """Whether the symmetric PSD ``a`` is singular at its precision: smallest eigenvalue at most
    ``n·eps`` times the largest (a 0-dim bool tensor, so the caller decides when to sync)."""
    finite = torch.isfinite(a).all()
    ev = torch.linalg.eigvalsh(torch.where(finite, a, torch.zeros_like(a)))  # nan/inf: eigvalsh would raise
    return ~finite | ~(ev[0] > ev[-1].abs() * a.shape[0] * torch.finfo(a.dtype).eps)


def _block_diagonal_product(g: torch.Tensor, chunks: list[torch.Tensor], blocks: list[torch.Tensor]) -> torch.Tensor:
    """``g`` (``[out, in, ...]``) times the block-diagonal matrix whose blocks act on the input
    units ``chunks[i]``: ``out·in·chunk`` multiply-adds per kernel tap instead of ``out·in²``.
    The input dim is permuted into chunk order once, full chunks go through one batched
    matmul, and the result is permuted back."""
    blocks = [b.to(g.dtype) for b in blocks]
    if len(chunks) == 1:
        return torch.einsum("oi...,ij->oj...", g, blocks[0])
    n, c = g.shape[1], chunks[0].numel()
    perm = torch.cat(chunks)
    rows = g.index_select(1, perm).movedim(1, -1).reshape(-1, n)  # [out·taps, in], chunk order
    full = next((i for i, ch in enumerate(chunks) if ch.numel() != c), len(chunks))  # leading equal chunks
    out = torch.empty_like(rows)
    head = rows[:, : full * c].reshape(-1, full, c).transpose(0, 1)  # [full, out·taps, c]
    out[:, : full * c] = torch.bmm(head, torch.stack(blocks[:full])).transpose(0, 1).reshape(-1, full * c)
    start = full * c
    for ch, block in zip(chunks[full:], blocks[full:]):  # the rest (torch's split: one shorter chunk)
        out[:, start:start + ch.numel()] = rows[:, start:start + ch.numel()] @ block
        start += ch.numel()
    out = out.reshape(*g.shape[:1], *g.shape[2:], n).movedim(-1, 1)
    return torch.empty_like(g).index_copy_(1, perm, out)


class _CaptureHook:
    """The forward pre-hook: forwards to the optimizer through a weak reference, so a model
    outlives its optimizer, and a deep copy of the model (an EMA copy, a snapshot) gets an
    inert hook instead of a copy of the optimizer."""

    def __init__(self, opt: "LayerwiseLM | None") -> None:
        self._opt = weakref.ref(opt) if opt is not None else None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        opt = self._opt() if self._opt is not None else None
        if opt is not None:
            opt._capture(module, args)

    def __deepcopy__(self, memo: dict[int, Any]) -> "_CaptureHook":
        return _CaptureHook(None)


class LayerwiseLM(torch.optim.Optimizer):
    """Layer-wise Levenberg–Marquardt steps for Linear/Conv weights, SGD for the rest.

    Args:
        model: the module whose parameters are optimized (its layers get hooks).
        lr: learning rate, >= 0. Default: 0.1.
        momentum: heavy-ball momentum on the (preconditioned) direction, in [0, 1). Default: 0.9.
        damping: λ, relative: ``λ · trace(A)/n`` is added to the diagonal of ``A``; >= 0, and
            0 only when every layer's ``A`` has full rank. Default: 1e-2.
        ema: weight of the old ``A`` in the moving average, in [0, 1) (1 would freeze ``A`` at
            the first batch). Default: 0.95.
        update_every: steps between recomputations of ``(A + λI)^(-1)``, an integer >= 1. Default: 10.
        subsample: fraction of input rows used to estimate ``A``, in (0, 1]. Default: 1.
        chunk_size: invert block-diagonal chunks of at most this many input units, an integer
            >= 1 (None: the whole matrix). Default: None.
        weight_decay: L2 added to every gradient, >= 0. Default: 0.
        seed: seed of the chunk permutations and row subsampling, an integer. Default: 0.

    Raises:
        InvalidArgumentError: an option outside its range (at construction), or a singular
            ``A`` with ``damping=0`` (at :meth:`step`).
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9, damping: float = 1e-2,
                 ema: float = 0.95, update_every: int = 10, subsample: float = 1.0, chunk_size: int | None = None,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"LayerwiseLM: model must be an nn.Module, got {type(model).__name__}")
        _check_real("lr", lr, 0.0)
        _check_real("momentum", momentum, 0.0, 1.0, hi_open=True)
        _check_real("damping", damping, 0.0)
        _check_real("ema", ema, 0.0, 1.0, hi_open=True)
        _check_real("update_every", update_every, 1, integer=True)
        _check_real("subsample", subsample, 0.0, 1.0, lo_open=True)
        if chunk_size is not None:
            _check_real("chunk_size", chunk_size, 1, integer=True)
        _check_real("weight_decay", weight_decay, 0.0)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise InvalidArgumentError(f"LayerwiseLM: seed={seed!r} is invalid; seed must be an integer")
        defaults = dict(lr=lr, momentum=momentum, damping=damping, ema=ema, weight_decay=weight_decay)
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        self.update_every, self.subsample, self.chunk_size = update_every, subsample, chunk_size
        self._gen = torch.Generator().manual_seed(seed)
        self._layers: dict[nn.Parameter, nn.Module] = {}
        self._names: dict[nn.Parameter, str] = {}  # for error messages
        self._batch: dict[nn.Parameter, torch.Tensor] = {}
        self._hooks = []
        for name, m in model.named_modules():
            if isinstance(m, _LAYERS) and getattr(m, "groups", 1) == 1 and m.weight.requires_grad:
                self._layers[m.weight] = m
                self._names[m.weight] = name or type(m).__name__
                self._hooks.append(m.register_forward_pre_hook(_CaptureHook(self)))

    # ------------------------------------------------------------------ statistics
    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        x = args[0].detach()
        dtype = torch.promote_types(x.dtype, torch.float32)
        if isinstance(module, nn.Linear):
            rows = self._every_kth(x.reshape(-1, x.shape[-1]), 0).to(dtype)
            a = rows.T @ rows / rows.shape[0]
        else:  # [B, C, L]: pixels pooled without moving channels last (no copy of the input)
            f = x.reshape(x.shape[0], x.shape[1], -1)
            f = self._every_kth(f, 2 if f.shape[2] > 1 else 0).to(dtype)
            a = torch.einsum("bcl,bdl->cd", f, f) / (f.shape[0] * f.shape[2])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(a)
            a /= dist.get_world_size()
        self._batch[module.weight] = a

    def _every_kth(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """A uniform subsample of ``t`` along ``dim`` at rate ``subsample``: every k-th entry from a
        random start (a strided view, so nothing is gathered)."""
        if self.subsample >= 1:
            return t
        k = min(max(1, round(1 / self.subsample)), t.shape[dim])
        start = int(torch.randint(k, (1,), generator=self._gen))
        return t.narrow(dim, start, t.shape[dim] - start)[(slice(None),) * dim + (slice(None, None, k),)]

    def _chunks(self, state: dict[str, Any], n: int, device: torch.device) -> list[torch.Tensor]:
        if "chunks" not in state:
            if self.chunk_size is None or self.chunk_size >= n:
                state["chunks"] = [torch.arange(n, device=device)]
            else:
                perm = torch.randperm(n, generator=self._gen).to(device)
                state["chunks"] = list(perm.split(self.chunk_size))
        return state["chunks"]

    def _inverse(self, state: dict[str, Any], damping: float, name: str = "layer") -> list[torch.Tensor]:
        """``(A + λ·mean eig·I)^(-1)`` on each chunk of inputs: one ``[c, c]`` block per chunk,
        in the order of ``state["chunks"]`` (a single block when there is no chunking)."""
        a = state["A"]
        scale = float(a.diagonal().mean()) or 1.0  # λ relative to the mean eigenvalue: scale-free damping
        chunks = self._chunks(state, a.shape[0], a.device)
        blocks = [a] if len(chunks) == 1 else [a[idx][:, idx] for idx in chunks]
        results = [torch.linalg.inv_ex(b + damping * scale * torch.eye(b.shape[0], dtype=a.dtype, device=a.device))
                   for b in blocks]
        inverses = [inv for inv, _ in results]
        failed = torch.stack([info != 0 for _, info in results]).any()
        if damping == 0:  # LU rarely reports a numerically singular A: it returns a huge, finite inverse
            failed = failed | torch.stack([_numerically_singular(b) for b in blocks]).any()
        if bool(failed):  # one device sync for all blocks
            why = ("too few input rows, or linearly dependent inputs; use damping > 0, e.g. 1e-2"
                   if damping == 0 else "it holds nan/inf: check the layer's inputs")
            raise InvalidArgumentError(f"LayerwiseLM: the input second-moment matrix A of layer {name!r} "
                                       f"({a.shape[0]} input units) is singular with damping={damping!r} ({why})")
        return inverses

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update. The statistics and inverses of every layer come first, so an error there
        (a singular ``A`` with ``damping=0``) leaves the parameters and momenta unchanged."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p in self._layers and p in self._batch:
                        self._update_statistics(p, self.state[p], group)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    state = self.state[p]
                    if p in self._layers and p in self._batch:
                        g = _block_diagonal_product(g, state["chunks"], state["inverse"])
                    if group["momentum"]:
                        buf = state.get("momentum_buffer")
                        buf = g.clone() if buf is None else buf.mul_(group["momentum"]).add_(g)
                        state["momentum_buffer"] = buf
                        g = buf
                    p.add_(g, alpha=-group["lr"])
        finally:
            self._batch.clear()
        return loss

    def _update_statistics(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Fold the batch's ``A`` into the moving average and, when due, recompute the inverse."""
        a_batch = self._batch[p].to(p.device)
        state["A"] = a_batch if "A" not in state else state["A"].mul_(group["ema"]).add_(a_batch,
                                                                                         alpha=1 - group["ema"])
        state["steps"] = state.get("steps", 0) + 1
        if "inverse" not in state or (state["steps"] - 1) % self.update_every == 0:
            state["inverse"] = self._inverse(state, group["damping"], self._names.get(p, "layer"))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, on a deep copy (torch keeps the source's
        tensors when no cast is needed, so two optimizers would update one shared ``A`` in place),
        then the chunk indices, which torch casts to the parameters' float dtype, back to integers."""
        super().load_state_dict(copy.deepcopy(state_dict))
        for st in self.state.values():
            if "chunks" in st:
                st["chunks"] = [c.long() for c in st["chunks"]]

    def remove_hooks(self) -> None:
        """Detach the statistics hooks from the model (after training)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
