"""Second-order optimizers: ``LayerwiseLM``, the consistency paper's layer-wise step (docs/theory.md
§8.1–§8.2), and ``KFAC``, Kronecker-factored approximate curvature (§8.7, at the end of this module).

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
import functools
import math
import numbers
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .errors import InvalidArgumentError

__all__ = ["LayerwiseLM", "KFAC"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_real(name: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False, owner: str = "LayerwiseLM") -> None:
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
        raise InvalidArgumentError(f"{owner}: {name}={value!r} is invalid; {name} must be {what} in {interval}")


def _numerically_singular(a: torch.Tensor) -> torch.Tensor:
    """Whether the symmetric PSD ``a`` is singular at its precision: smallest eigenvalue at most
    ``n·eps`` times the largest (a 0-dim bool tensor, so the caller decides when to sync)."""
    finite = torch.isfinite(a).all()
    ev = torch.linalg.eigvalsh(torch.where(finite, a, torch.zeros_like(a)))  # nan/inf: eigvalsh would raise
    return ~finite | ~(ev[0] > ev[-1].abs() * a.shape[0] * torch.finfo(a.dtype).eps)


def _layout(chunks: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
    """``(perm, inverse perm, c, k)`` of a chunking (``_chunk_indices``): the units in chunk order, and the
    ``k`` leading chunks of the common size ``c`` (torch's ``split``: only the last chunk may be shorter).
    ``perm`` is None when the chunks are runs of consecutive units in order (nothing to permute)."""
    c = chunks[0].numel()
    k = next((i for i, ch in enumerate(chunks) if ch.numel() != c), len(chunks))
    perm = torch.cat(chunks)
    if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
        return None, None, c, k
    return perm, torch.argsort(perm), c, k


def _blocks_product(x: torch.Tensor, blocks: list[torch.Tensor], side: str, transpose: bool = False) -> torch.Tensor:
    """``x @ D`` (``side="right"``) or ``D @ x`` (``"left"``) for the block-diagonal ``D = blockdiag(*blocks)``
    (each ``[..., c_i, c_i]``), with ``x`` ``[..., m, n]`` in chunk order on that side; ``transpose`` uses ``Dᵀ``.
    ``m·n·c`` multiply-adds instead of ``m·n²``, one matmul per block on a slice of ``x`` (BLAS reads strided
    slices in place, where a batched matmul would first copy ``x`` into block-major order); the result is
    contiguous."""
    parts, start = [], 0
    for b in blocks:
        b = b.transpose(-1, -2) if transpose else b
        size = b.shape[-1]
        if size:
            parts.append(x[..., start:start + size] @ b if side == "right" else b @ x[..., start:start + size, :])
        start += size
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1 if side == "right" else -2)


def _block_list(pair: list[torch.Tensor]) -> list[torch.Tensor]:
    """The blocks of a ``[full [..., k, c, c], rest [..., r, r]]`` pair, in order."""
    full, rest = pair
    return list(full.unbind(-3)) + [rest]


def _block_diagonal_product(g: torch.Tensor, chunks: list[torch.Tensor], blocks: list[torch.Tensor]) -> torch.Tensor:
    """``g`` (``[out, in, ...]``) times the block-diagonal matrix whose blocks act on the input
    units ``chunks[i]``: ``out·in·chunk`` multiply-adds per kernel tap instead of ``out·in²``.
    The input dim is permuted into chunk order once, multiplied block by block (:func:`_blocks_product`),
    and permuted back."""
    blocks = [b.to(g.dtype) for b in blocks]
    if len(chunks) == 1:
        return torch.einsum("oi...,ij->oj...", g, blocks[0])
    perm, inverse, _, _ = _layout(chunks)
    rows = g.movedim(1, -1)  # [out, ...taps, in]
    rows = rows if perm is None else rows.index_select(-1, perm)  # in chunk order
    out = _blocks_product(rows, blocks, "right")
    return (out if inverse is None else out.index_select(-1, inverse)).movedim(-1, 1)


class _Hook:
    """A module or tensor hook that forwards to ``owner.<method>`` through a weak reference, so a model
    outlives its optimizer, and a deep copy of the model (an EMA copy, a snapshot) gets an inert hook
    instead of a copy of the optimizer."""

    def __init__(self, owner: Any, method: str) -> None:
        self._owner = weakref.ref(owner) if owner is not None else None
        self._method = method

    @torch.compiler.disable
    def __call__(self, *args: Any) -> None:  # eager under torch.compile: dynamo mixed up the layers' statistics
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            getattr(owner, self._method)(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Hook":
        return _Hook(None, self._method)


def _all_reduce_mean(t: Any) -> Any:
    """``t`` (a tensor, or a list of tensors) averaged over the processes of ``torch.distributed`` (in place;
    unchanged without it)."""
    if dist.is_available() and dist.is_initialized():
        for x in (t if isinstance(t, list) else [t]):
            dist.all_reduce(x)
            x /= dist.get_world_size()
    return t


class _LayerStatistics:
    """The per-batch statistics of a set of layers, collected by hooks; one mechanism for ``LayerwiseLM``
    and ``KFAC``: the hooks (weakly referenced, inert in deep copies), the row subsampling, the
    averaging over ``torch.distributed`` processes.

    ``inputs[weight]`` is ``input_stat(module, x, every_kth)`` of the layer's input ``x`` on the last
    train-mode forward with gradients enabled; with ``output_grads``, ``grads[weight]`` is
    ``grad_stat(module, g)`` of the gradient ``g`` reaching the layer's output in a backward pass while
    ``recording_grads`` is True.
    """

    def __init__(self, layers: dict[nn.Parameter, nn.Module], input_stat: Any, subsample: float,
                 generator: torch.Generator, grad_stat: Any = None) -> None:
        self.layers, self.input_stat, self.grad_stat = layers, input_stat, grad_stat
        self.subsample, self.generator = subsample, generator
        self.inputs: dict[nn.Parameter, torch.Tensor] = {}
        self.grads: dict[nn.Parameter, torch.Tensor] = {}
        self.recording_grads = False
        self.active = True  # False: the hooks do nothing (steps that do not update the statistics)
        self.hooks = []
        for m in dict.fromkeys(layers.values()):
            self.hooks.append(m.register_forward_pre_hook(_Hook(self, "_input")))
            if grad_stat is not None:
                self.hooks.append(m.register_forward_hook(_Hook(self, "_output")))

    def _input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.active and module.training and torch.is_grad_enabled():
            self.inputs[module.weight] = _all_reduce_mean(self.input_stat(module, args[0].detach(), self.every_kth))

    def _output(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self.active and module.training and torch.is_grad_enabled() and isinstance(out, torch.Tensor) \
                and out.requires_grad:
            out.register_hook(functools.partial(_Hook(self, "_grad"), module))

    def _grad(self, module: nn.Module, g: torch.Tensor) -> None:
        if self.recording_grads:
            self.grads[module.weight] = _all_reduce_mean(self.grad_stat(module, g.detach(), self.every_kth))

    def every_kth(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """A uniform subsample of ``t`` along ``dim`` at rate ``subsample``: every k-th entry from a
        random start (a strided view, so nothing is gathered)."""
        if self.subsample >= 1:
            return t
        k = min(max(1, round(1 / self.subsample)), t.shape[dim])
        start = int(torch.randint(k, (1,), generator=self.generator))
        return t.narrow(dim, start, t.shape[dim] - start)[(slice(None),) * dim + (slice(None, None, k),)]

    def clear(self) -> None:
        self.inputs.clear()
        self.grads.clear()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def _chunk_indices(state: dict[str, Any], n: int, chunk_size: int | None, generator: torch.Generator,
                   device: torch.device, key: str = "chunks", block: int | None = None) -> list[torch.Tensor]:
    """A layer's units (``n``) split into chunks of at most ``chunk_size`` (fixed once drawn, kept in
    ``state[key]``); one chunk of all units without chunking. ``block=None``: the units are split at random
    (``LayerwiseLM``); ``block=b``: into runs of consecutive units, each a whole number of ``b``-unit blocks
    when ``chunk_size >= b`` (``KFAC``: a conv's input channels with all their kernel taps). Shared by
    ``LayerwiseLM`` and ``KFAC``."""
    if key not in state:
        if chunk_size is None or chunk_size >= n:
            state[key] = [torch.arange(n, device=device)]
        elif block is not None:
            size = chunk_size // block * block if chunk_size >= block else chunk_size
            state[key] = list(torch.arange(n, device=device).split(size))
        else:
            perm = torch.randperm(n, generator=generator).to(device)
            state[key] = list(perm.split(chunk_size))
    return state[key]


def _with_momentum(state: dict[str, Any], d: torch.Tensor, momentum: float) -> torch.Tensor:
    """Heavy-ball momentum on the direction ``d``: the updated ``state["momentum_buffer"]`` (``d`` itself
    without momentum)."""
    if not momentum:
        return d
    buf = state.get("momentum_buffer")
    buf = d.clone() if buf is None else buf.mul_(momentum).add_(d)
    state["momentum_buffer"] = buf
    return buf


def _channel_moments(module: nn.Module, x: torch.Tensor, every_kth: Any) -> torch.Tensor:
    """``LayerwiseLM``'s ``A``: the input's second-moment matrix over its features (convs: channels,
    pixels pooled)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if isinstance(module, nn.Linear):
        rows = every_kth(x.reshape(-1, x.shape[-1]), 0).to(dtype)
        return rows.T @ rows / rows.shape[0]
    f = x.reshape(x.shape[0], x.shape[1], -1)  # [B, C, L]: pixels pooled without moving channels last
    f = every_kth(f, 2 if f.shape[2] > 1 else 0).to(dtype)
    return torch.einsum("bcl,bdl->cd", f, f) / (f.shape[0] * f.shape[2])


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
        for name, m in model.named_modules():
            if isinstance(m, _LAYERS) and getattr(m, "groups", 1) == 1 and m.weight.requires_grad:
                self._layers[m.weight] = m
                self._names[m.weight] = name or type(m).__name__
        self._stats = _LayerStatistics(self._layers, _channel_moments, subsample, self._gen)

    @property
    def _batch(self) -> dict[nn.Parameter, torch.Tensor]:
        return self._stats.inputs

    def _chunks(self, state: dict[str, Any], n: int, device: torch.device) -> list[torch.Tensor]:
        return _chunk_indices(state, n, self.chunk_size, self._gen, device)

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
                    p.add_(_with_momentum(state, g, group["momentum"]), alpha=-group["lr"])
        finally:
            self._stats.clear()
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
        self._stats.remove()


# ====================================================================================== K-FAC

_KFAC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, groups, in/groups · prod(kernel), L]``: the input patches a conv's weight multiplies (channel-major,
    as the weight ``[out, in/groups, *kernel]`` flattens), padding applied as the layer pads."""
    pads = module._reversed_padding_repeated_twice
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    k, s, d = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv3d):  # Tensor.unfold per axis: [B, C, D', H', W', kd, kh, kw]
        u = x
        for axis, (kk, ss, dd) in enumerate(zip(k, s, d)):
            u = u.unfold(2 + axis, (kk - 1) * dd + 1, ss)[..., ::dd]
        b, c = u.shape[:2]
        cols = u.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(b, c * math.prod(k), -1)
    else:
        if isinstance(module, nn.Conv1d):
            x, k, s, d = x.unsqueeze(2), (1, k[0]), (1, s[0]), (1, d[0])
        cols = F.unfold(x, k, dilation=d, stride=s)  # [B, C·prod(k), L]
    g = module.groups
    return cols.reshape(cols.shape[0], g, cols.shape[1] // g, cols.shape[2])


def _kfac_input_rows(module: nn.Module, x: torch.Tensor, every_kth: Any) -> torch.Tensor:
    """``[groups, N, n]``: the layer's (subsampled) input rows (a linear layer) or patches (a conv), with a
    trailing 1 when the layer has a bias. K-FAC's ``A`` is their mean ``a aᵀ``."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if isinstance(module, nn.Linear):
        rows = every_kth(x.reshape(-1, x.shape[-1]), 0).to(dtype)[None]  # [1, N, in]
    else:
        cols = every_kth(_patches(module, x), 3).to(dtype)  # [B, G, n, L]
        rows = cols.permute(1, 0, 3, 2).reshape(cols.shape[1], -1, cols.shape[2])  # [G, B·L, n]
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=2)
    return rows


def _kfac_grad_rows(module: nn.Module, g: torch.Tensor, every_kth: Any) -> tuple[torch.Tensor, float]:
    """``([groups, N, m], scale)``: the (subsampled) gradient rows ``g`` of the loss at the layer's output, and
    the scale that makes ``scale · mean g gᵀ`` K-FAC's ``G = B Σ_{examples, locations} g gᵀ``, ``B`` the batch
    (the leading axis): the per-example gradients are ``B g`` for a loss averaged over the batch, and the
    locations of one example add (docs/theory.md §8.7)."""
    dtype = torch.promote_types(g.dtype, torch.float32)
    batch = g.shape[0]
    if isinstance(module, nn.Linear):
        rows = g.reshape(-1, g.shape[-1])
        total = rows.shape[0]
        rows = every_kth(rows, 0).to(dtype)[None]
    else:
        f = g.reshape(batch, module.groups, g.shape[1] // module.groups, -1)  # [B, G, m, L]
        total = batch * f.shape[3]
        f = every_kth(f, 3).to(dtype)
        rows = f.permute(1, 0, 3, 2).reshape(f.shape[1], -1, f.shape[2])
    return rows, float(batch * total)


def _block_moments(rows: torch.Tensor, perm: torch.Tensor | None, k: int, c: int, scale: float = 1.0
                   ) -> list[torch.Tensor]:
    """The diagonal blocks of ``scale · rowsᵀ rows / N`` (``rows`` ``[groups, N, n]``) on the chunks of a layout
    (:func:`_layout`): ``[full [groups, k, c, c], rest [groups, r, r]]``, units in chunk order. Only the blocks
    are computed (``N·n·c`` multiply-adds, not ``N·n²``)."""
    if perm is not None:
        rows = rows.index_select(2, perm)
    w = scale / rows.shape[1]
    full = torch.stack([(r.transpose(1, 2) @ r) for r in rows[:, :, : k * c].split(c, dim=2)], dim=1) * w
    tail = rows[:, :, k * c:]
    return [full, tail.transpose(1, 2) @ tail * w]


def _blocks_diagonal(blocks: list[torch.Tensor]) -> torch.Tensor:
    """``[groups, n]``: the diagonals of ``[full, rest]`` blocks, in chunk order."""
    full, rest = blocks
    return torch.cat([full.diagonal(dim1=-2, dim2=-1).flatten(1), rest.diagonal(dim1=-2, dim2=-1)], dim=1)


def _eigh(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a batch of symmetric PSD factors, in double precision."""
    if f.shape[-1] == 0:
        return f.new_zeros(f.shape[:-1]), f.clone()
    d, q = torch.linalg.eigh(f.double())
    return d.clamp_min(0).to(f.dtype), q.to(f.dtype)


def _damped_inverse(f: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``(f + γ I)⁻¹`` for a batch of symmetric PSD ``f`` ``[groups, ..., c, c]`` and ``γ > 0`` per group, by a
    Cholesky factorization in double precision; eigenvalues clamped at 0 where rounding left ``f`` indefinite."""
    if f.shape[-1] == 0:
        return f.clone()
    fd = f.double()
    g = gamma.double().reshape(-1, *([1] * (f.dim() - 1)))
    eye = torch.eye(f.shape[-1], dtype=torch.float64, device=f.device)
    chol, info = torch.linalg.cholesky_ex(fd + g * eye)
    if bool((info != 0).any()):  # one sync per decomposition
        d, q = torch.linalg.eigh(fd)
        return ((q / (d.clamp_min(0) + g[..., 0])[..., None, :]) @ q.transpose(-1, -2)).to(f.dtype)
    return torch.cholesky_inverse(chol).to(f.dtype)


class KFAC(torch.optim.Optimizer):
    """Kronecker-factored approximate curvature (Martens & Grosse arXiv:1503.05671; convolutions: Grosse &
    Martens arXiv:1602.01407) for ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers, grouped and depthwise
    included; every other parameter gets the base update (SGD with momentum). docs/theory.md §8.7.

    For a layer with weight ``W`` (bias appended as a last input column) the Fisher block is approximated
    by ``A ⊗ G``: ``A`` the second moment of the layer's input rows or patches, ``G`` that of the
    loss gradient at its output (scaled to per-example gradients). Both are moving averages, refreshed
    (inverted or eigendecomposed) every ``update_every`` steps. The damping ``λ`` is either factored
    Tikhonov damping, ``(A + π√λ I) ⊗ (G + √λ/π I)`` with ``π² = (tr A / dim A) / (tr G / dim G)``
    (Martens & Grosse §6.3; the step is two products with the damped factors' inverses), or exact,
    ``A ⊗ G + λ I`` solved in the factors' eigenbases (twice the products per step).

    The statistics come from hooks on the layers, so the model can be a plain module, a transformed
    ``GraphModule``, a ``DistributedDataParallel`` wrapper (the factors are averaged over the processes) or a
    ``torch.compile``'d module (the hooks run eagerly: the compiled graph breaks at each hooked layer).

    Args:
        model: the module whose parameters are optimized (its layers get hooks).
        lr: learning rate, >= 0. Default: 1e-2.
        momentum: heavy-ball momentum on the update direction, in [0, 1). Default: 0.9.
        damping: λ, > 0. With ``damping_mode="factored"`` a change takes effect at the next step (the damped
            inverses are rebuilt from the kept factors). Default: 1e-3.
        damping_mode: ``"factored"`` or ``"exact"`` (above). Default: "factored".
        weight_decay: L2 added to every gradient before preconditioning, >= 0. Default: 0.
        ema: weight of the old factors in the moving averages, in [0, 1). Default: 0.95.
        update_every: steps between refreshes of the inverses (eigendecompositions), an integer >= 1.
            Default: 10.
        stats_every: steps between factor updates, an integer >= 1: on the other steps the hooks compute
            nothing and :meth:`sample_fisher` returns at once (the cost of the factors is amortized; the
            preconditioner keeps its last factors). Default: 1.
        fisher: ``"empirical"`` (``G`` from the gradients of the loss being minimized: any backward pass
            before :meth:`step` records it) or ``"true"`` (``G`` from targets sampled from the model's
            predictive distribution: call :meth:`sample_fisher` on the outputs before the loss's backward).
            Default: "empirical".
        likelihood: the predictive distribution for ``fisher="true"``: ``"categorical"`` (logits on axis 1)
            or ``"gaussian"`` (unit variance). Default: "categorical".
        kl_clip: None, or the bound ``κ`` of the KL-based step clipping of Ba et al. (arXiv:1611.06743 §3):
            the directions are scaled by ``min(1, sqrt(κ / (lr² Σ Δ·∇)))``. Default: None.
        subsample: fraction of input rows / locations used for the factors, in (0, 1]. Default: 1.
        chunk_size: keep only the diagonal blocks of ``A`` and of ``G`` on chunks of at most this many units
            (runs of consecutive units; a conv's chunks of ``A`` hold whole input channels with all their kernel
            taps, whose correlations are the strongest): only those blocks are computed and inverted, and a
            step costs ``out·in·(c_A + c_G)`` multiply-adds instead of ``out·in·(in + out)``. None: the whole
            factors. Default: None.
        seed: seed of the subsampling, the chunks and ``sample_fisher``'s draws, an integer. Default: 0.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        >>> opt = KFAC(net, lr=0.1)
        >>> loss = torch.nn.functional.cross_entropy(net(torch.randn(32, 8)), torch.randint(0, 3, (32,)))
        >>> loss.backward(); opt.step()
    """

    def __init__(self, model: nn.Module, lr: float = 1e-2, momentum: float = 0.9, damping: float = 1e-3,
                 damping_mode: str = "factored", weight_decay: float = 0.0, ema: float = 0.95, update_every: int = 10,
                 stats_every: int = 1, fisher: str = "empirical", likelihood: str = "categorical",
                 kl_clip: float | None = None, subsample: float = 1.0, chunk_size: int | None = None,
                 seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"KFAC: model must be an nn.Module, got {type(model).__name__}")
        check = lambda *a, **k: _check_real(*a, owner="KFAC", **k)  # noqa: E731
        check("lr", lr, 0.0)
        check("momentum", momentum, 0.0, 1.0, hi_open=True)
        check("damping", damping, 0.0, lo_open=True)
        check("weight_decay", weight_decay, 0.0)
        check("ema", ema, 0.0, 1.0, hi_open=True)
        check("update_every", update_every, 1, integer=True)
        check("stats_every", stats_every, 1, integer=True)
        check("subsample", subsample, 0.0, 1.0, lo_open=True)
        if kl_clip is not None:
            check("kl_clip", kl_clip, 0.0, lo_open=True)
        if chunk_size is not None:
            check("chunk_size", chunk_size, 1, integer=True)
        for name, value, allowed in (("damping_mode", damping_mode, ("factored", "exact")),
                                     ("fisher", fisher, ("empirical", "true")),
                                     ("likelihood", likelihood, ("categorical", "gaussian"))):
            if value not in allowed:
                raise InvalidArgumentError(f"KFAC: {name}={value!r} is invalid; {name} must be "
                                           + " or ".join(repr(a) for a in allowed))
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise InvalidArgumentError(f"KFAC: seed={seed!r} is invalid; seed must be an integer")
        defaults = dict(lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay, ema=ema)
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        self.update_every, self.fisher, self.likelihood, self.kl_clip = update_every, fisher, likelihood, kl_clip
        self.stats_every, self.chunk_size, self.damping_mode = stats_every, chunk_size, damping_mode
        self._steps = 0  # steps taken: the statistics are collected when it is a multiple of stats_every
        self._gen = torch.Generator().manual_seed(seed)
        self._layers: dict[nn.Parameter, nn.Module] = {
            m.weight: m for m in model.modules() if isinstance(m, _KFAC_LAYERS) and m.weight.requires_grad
            and (m.bias is None or m.bias.requires_grad)}
        self._bias_of = {m.bias: w for w, m in self._layers.items() if m.bias is not None}
        self._layouts: dict[tuple[nn.Parameter, str], tuple[Any, ...]] = {}  # (weight, "chunks"/"chunks_G")
        self._stats = _LayerStatistics(self._layers, self._input_blocks, subsample, self._gen,
                                       grad_stat=self._grad_blocks)
        self._stats.recording_grads = fisher == "empirical"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`, keeping the parameter -> group map current."""
        super().add_param_group(param_group)
        group_of = self.__dict__.setdefault("_group_of", {})
        group_of.update({p: self.param_groups[-1] for p in self.param_groups[-1]["params"]})

    # ------------------------------------------------------------------ statistics (called by the hooks)
    def _layout_of(self, p: nn.Parameter, key: str, n: int, device: torch.device) -> tuple[Any, ...]:
        """``_layout`` of the weight's chunks on one side (``"chunks"``: A's units, ``"chunks_G"``: G's), drawn
        on first use and cached."""
        lay = self._layouts.get((p, key))
        if lay is None:
            m = self._layers[p]
            block = math.prod(m.kernel_size) if key == "chunks" and not isinstance(m, nn.Linear) else 1
            lay = self._layouts[p, key] = _layout(_chunk_indices(self.state[p], n, self.chunk_size, self._gen,
                                                                 device, key, block))
        return lay

    def _input_blocks(self, module: nn.Module, x: torch.Tensor, every_kth: Any) -> list[torch.Tensor]:
        rows = _kfac_input_rows(module, x, every_kth)
        perm, _, c, k = self._layout_of(module.weight, "chunks", rows.shape[2], rows.device)
        return _block_moments(rows, perm, k, c)

    def _grad_blocks(self, module: nn.Module, g: torch.Tensor, every_kth: Any) -> list[torch.Tensor]:
        rows, scale = _kfac_grad_rows(module, g, every_kth)
        perm, _, c, k = self._layout_of(module.weight, "chunks_G", rows.shape[2], rows.device)
        return _block_moments(rows, perm, k, c, scale)

    # ------------------------------------------------------------------ the true Fisher
    def sample_fisher(self, outputs: torch.Tensor) -> None:
        """Record ``G`` for ``fisher="true"``: targets drawn from the model's predictive distribution at
        ``outputs`` (the forward pass's outputs, whose graph is kept), and one backward pass of their loss
        that leaves the parameters' ``.grad`` alone. Call it before the real loss's ``backward``."""
        if self.fisher != "true":
            raise InvalidArgumentError("KFAC.sample_fisher needs fisher='true' (with fisher='empirical' the "
                                       "loss's own backward records the factors)")
        if not isinstance(outputs, torch.Tensor) or not outputs.requires_grad:
            raise InvalidArgumentError("KFAC.sample_fisher: outputs must be the model's output tensor, computed "
                                       "with gradients enabled")
        if not self._stats.active:  # not a statistics step: no sampled backward
            return
        with torch.no_grad():
            if self.likelihood == "categorical":
                probs = torch.softmax(outputs.detach().float().movedim(1, -1), dim=-1)
                flat = probs.reshape(-1, probs.shape[-1]).cpu()
                target = torch.multinomial(flat, 1, generator=self._gen).reshape(probs.shape[:-1]).to(outputs.device)
            else:
                noise = torch.randn(outputs.shape, generator=self._gen).to(outputs)
                target = outputs.detach() + noise
        if self.likelihood == "categorical":
            loss = F.cross_entropy(outputs, target)
        else:
            loss = 0.5 * (outputs - target).pow(2).sum() / outputs.shape[0]
        weights = [w for w in self._layers]
        self._stats.recording_grads = True
        try:
            torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        finally:
            self._stats.recording_grads = False

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update: factors folded into their averages (and refreshed when due) first, so an error
        leaves the parameters unchanged; then the preconditioned directions, clipped, with momentum."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            directions: dict[nn.Parameter, torch.Tensor] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p in self._layers and p in self._stats.inputs and p in self._stats.grads:
                        self._update_factors(p, self.state[p], group)
                    if p in self._layers and "A" in self.state[p]:
                        self._refresh(p, self.state[p], group["damping"])
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None or p in self._bias_of:
                        continue
                    g = p.grad if not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
                    m = self._layers.get(p)
                    if m is not None and "refreshed_at" in self.state[p]:
                        b = m.bias
                        gb = None if b is None or b.grad is None else \
                            (b.grad if not group["weight_decay"] else b.grad.add(b, alpha=group["weight_decay"]))
                        dw, db = self._precondition(p, m, g, gb, group["damping"])
                        directions[p] = dw
                        if db is not None:
                            directions[b] = db
                    else:
                        directions[p] = g
            for p, w in self._bias_of.items():  # a bias whose weight was not preconditioned: the base update
                if p.grad is not None and p not in directions:
                    wd = self._group_of[p]["weight_decay"]
                    directions[p] = p.grad if not wd else p.grad.add(p, alpha=wd)
            scale = self._clip(directions)
            for group in self.param_groups:
                for p in group["params"]:
                    d = directions.get(p)
                    if d is None:
                        continue
                    d = d * scale if scale != 1.0 and (p in self._layers or p in self._bias_of) else d
                    p.add_(_with_momentum(self.state[p], d, group["momentum"]), alpha=-group["lr"])
        finally:
            self._stats.clear()
            self._steps += 1
            self._stats.active = self._steps % self.stats_every == 0
        return loss

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["kfac_steps"] = self._steps
        return out

    def factors(self, weight: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's current ``(A, G)`` as dense ``[groups, n, n]`` and ``[groups, m, m]`` tensors in the
        units' own order (with ``chunk_size``, zero outside the kept diagonal blocks). For inspection and
        tests; the optimizer itself keeps only the blocks."""
        st = self.state[weight]
        if "A" not in st:
            raise InvalidArgumentError("KFAC.factors: this weight has no factors yet (not a preconditioned layer, "
                                       "or no statistics step taken)")
        return tuple(self._dense(st[key], st[chunks]) for key, chunks in (("A", "chunks"), ("G", "chunks_G")))

    @staticmethod
    def _dense(blocks: list[torch.Tensor], chunks: list[torch.Tensor]) -> torch.Tensor:
        full, rest = blocks
        n = sum(ch.numel() for ch in chunks)
        out = full.new_zeros(full.shape[0], n, n)
        parts = list(full.unbind(1)) + ([rest] if rest.shape[-1] else [])
        for idx, block in zip(chunks, parts):
            out[:, idx[:, None], idx[None, :]] = block
        return out

    def _update_factors(self, p: nn.Parameter, state: dict[str, Any], group: dict[str, Any]) -> None:
        for key, new in (("A", self._stats.inputs[p]), ("G", self._stats.grads[p])):
            new = [t.to(p.device) for t in new]
            if key not in state:
                state[key] = new
            else:
                for old, t in zip(state[key], new):
                    old.mul_(group["ema"]).add_(t, alpha=1 - group["ema"])
        state["steps"] = state.get("steps", 0) + 1  # factor updates

    def _refresh(self, p: nn.Parameter, state: dict[str, Any], damping: float) -> None:
        """The damped inverses (``"factored"``) or eigendecompositions (``"exact"``) of the factors' blocks, at
        the first step and then every ``update_every`` optimizer steps when the factors changed since the last
        refresh; factored inverses also when the damping changed."""
        due = "refreshed_at" not in state or state.get("exact") != (self.damping_mode == "exact") or (
            self._steps - state["refreshed_at"] >= self.update_every and state["steps"] != state["refreshed_updates"])
        if not due and not (self.damping_mode == "factored" and state["damping"] != damping):
            return
        for key in ("A", "G"):
            if not all(bool(torch.isfinite(t).all()) for t in state[key]):
                raise InvalidArgumentError(f"KFAC: the {key} factor of a {type(self._layers[p]).__name__} layer "
                                           f"holds nan/inf: check the layer's inputs and the loss")
        if due:
            state["refreshed_at"], state["refreshed_updates"] = self._steps, state["steps"]
            state["exact"] = self.damping_mode == "exact"  # a bool: torch's load_state_dict mangles strings
        if self.damping_mode == "exact":
            for key in ("A", "G"):
                pairs = [_eigh(t) for t in state[key]]
                state["d" + key] = torch.cat([pairs[0][0].flatten(1), pairs[1][0]], dim=1)  # [groups, n], chunk order
                state["Q" + key] = [pairs[0][1], pairs[1][1]]
            return
        da, dg = _blocks_diagonal(state["A"]), _blocks_diagonal(state["G"])
        mean_a, mean_g = da.mean(1), dg.mean(1)  # tr / dim, per group
        pi = torch.where((mean_a > 0) & (mean_g > 0), (mean_a / mean_g.clamp_min(1e-30)).sqrt(), torch.ones_like(mean_a))
        root = math.sqrt(damping)
        state["iA"] = [_damped_inverse(t, pi * root) for t in state["A"]]
        state["iG"] = [_damped_inverse(t, root / pi) for t in state["G"]]
        state["damping"] = damping

    def _precondition(self, p: nn.Parameter, m: nn.Module, g: torch.Tensor, gb: torch.Tensor | None, damping: float
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The damped ``(A ⊗ G)⁻¹`` applied to the weight's (and bias's) gradient, per group, on the chunks'
        blocks: the gradient is permuted into chunk order on both sides once and back at the end."""
        st = self.state[p]
        groups = st["G"][0].shape[0]
        mat = g.reshape(groups, g.shape[0] // groups, -1)  # [G, out/G, in/G · prod(k)]
        if m.bias is not None:
            bias = gb if gb is not None else torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
            mat = torch.cat([mat, bias.reshape(groups, -1, 1)], dim=2)
        perm_a, inv_a, _, _ = self._layout_of(p, "chunks", mat.shape[2], mat.device)
        perm_g, inv_g, _, _ = self._layout_of(p, "chunks_G", mat.shape[1], mat.device)
        if perm_a is not None:
            mat = mat.index_select(2, perm_a)
        if perm_g is not None:
            mat = mat.index_select(1, perm_g)
        cast = lambda pair: [b.to(mat.dtype) for b in _block_list(pair)]  # noqa: E731
        if self.damping_mode == "factored":  # (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹
            out = _blocks_product(_blocks_product(mat, cast(st["iG"]), "left"), cast(st["iA"]), "right")
        else:
            qa, qg = cast(st["QA"]), cast(st["QG"])
            rot = _blocks_product(_blocks_product(mat, qg, "left", transpose=True), qa, "right")  # Q_Gᵀ ∇W Q_A
            rot = rot / (st["dG"].to(mat.dtype)[:, :, None] * st["dA"].to(mat.dtype)[:, None, :] + damping)
            out = _blocks_product(_blocks_product(rot, qg, "left"), qa, "right", transpose=True)  # Q_G rot Q_Aᵀ
        if inv_a is not None:
            out = out.index_select(2, inv_a)
        if inv_g is not None:
            out = out.index_select(1, inv_g)
        if m.bias is not None:
            return out[:, :, :-1].reshape(g.shape), (out[:, :, -1].reshape(-1) if gb is not None else None)
        return out.reshape(g.shape), None

    def _clip(self, directions: dict[nn.Parameter, torch.Tensor]) -> float:
        if self.kl_clip is None:
            return 1.0
        total = 0.0
        for p, d in directions.items():
            if (p in self._layers or p in self._bias_of) and p.grad is not None:
                total += float((d * p.grad).sum()) * self._group_of[p]["lr"] ** 2
        return min(1.0, math.sqrt(self.kl_clip / abs(total))) if total else 1.0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, on a deep copy (no factor shared with the source),
        with the step count that decides the statistics steps; the chunk indices, which torch casts to the
        parameters' dtype, back to integers."""
        state_dict = copy.deepcopy(state_dict)
        self._steps = int(state_dict.pop("kfac_steps", 0))
        self._stats.active = self._steps % self.stats_every == 0
        super().load_state_dict(state_dict)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._layouts.clear()
        for st in self.state.values():
            for key in ("chunks", "chunks_G"):
                if key in st:
                    st[key] = [c.long() for c in st[key]]

    def remove_hooks(self) -> None:
        """Detach the statistics hooks from the model (after training)."""
        self._stats.remove()
