"""``LayerwiseLM``: the consistency paper's layer-wise second-order optimizer (MATH.md §8).

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

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> opt = LayerwiseLM(net, lr=0.1)
    >>> loss = net(torch.randn(16, 8)).pow(2).mean(); loss.backward(); opt.step()
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["LayerwiseLM"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LayerwiseLM(torch.optim.Optimizer):
    """Layer-wise Levenberg–Marquardt steps for Linear/Conv weights, SGD for the rest.

    Args:
        model: the module whose parameters are optimized (its layers get hooks).
        lr: learning rate. Default: 0.1.
        momentum: heavy-ball momentum on the (preconditioned) direction. Default: 0.9.
        damping: λ, relative: ``λ · trace(A)/n`` is added to the diagonal of ``A``. Default: 1e-2.
        ema: weight of the old ``A`` in the moving average. Default: 0.95.
        update_every: steps between recomputations of ``(A + λI)^(-1)``. Default: 10.
        subsample: fraction of input rows used to estimate ``A`` (0, 1]. Default: 1.
        chunk_size: invert block-diagonal chunks of at most this many input units
            (None: the whole matrix). Default: None.
        weight_decay: L2 added to every gradient. Default: 0.
        seed: seed of the chunk permutations and row subsampling. Default: 0.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9, damping: float = 1e-2,
                 ema: float = 0.95, update_every: int = 10, subsample: float = 1.0, chunk_size: int | None = None,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        if not 0 < subsample <= 1:
            raise ValueError(f"subsample must lie in (0, 1], got {subsample!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every!r}")
        defaults = dict(lr=lr, momentum=momentum, damping=damping, ema=ema, weight_decay=weight_decay)
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        self.update_every, self.subsample, self.chunk_size = update_every, subsample, chunk_size
        self._gen = torch.Generator().manual_seed(seed)
        self._layers: dict[nn.Parameter, nn.Module] = {}
        self._batch: dict[nn.Parameter, torch.Tensor] = {}
        self._hooks = []
        for m in model.modules():
            if isinstance(m, _LAYERS) and getattr(m, "groups", 1) == 1 and m.weight.requires_grad:
                self._layers[m.weight] = m
                self._hooks.append(m.register_forward_pre_hook(self._capture))

    # ------------------------------------------------------------------ statistics
    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        x = args[0].detach()
        rows = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.movedim(1, -1).reshape(-1, x.shape[1])
        if self.subsample < 1:
            n = max(1, int(round(rows.shape[0] * self.subsample)))
            idx = torch.randperm(rows.shape[0], generator=self._gen)[:n].to(rows.device)
            rows = rows[idx]
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        a = rows.T @ rows / rows.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(a)
            a /= dist.get_world_size()
        self._batch[module.weight] = a

    def _chunks(self, state: dict[str, Any], n: int, device: torch.device) -> list[torch.Tensor]:
        if "chunks" not in state:
            if self.chunk_size is None or self.chunk_size >= n:
                state["chunks"] = [torch.arange(n, device=device)]
            else:
                perm = torch.randperm(n, generator=self._gen).to(device)
                state["chunks"] = list(perm.split(self.chunk_size))
        return state["chunks"]

    def _inverse(self, state: dict[str, Any], damping: float) -> torch.Tensor:
        a = state["A"]
        n = a.shape[0]
        inv = torch.zeros_like(a)
        eye = torch.eye(n, dtype=a.dtype, device=a.device)
        scale = float(a.diagonal().mean()) or 1.0  # λ relative to the mean eigenvalue: scale-free damping
        for idx in self._chunks(state, n, a.device):
            block = a[idx][:, idx] + damping * scale * eye[: len(idx), : len(idx)]
            inv[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.linalg.inv(block)
        return inv

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if p in self._layers and p in self._batch:
                    g = self._precondition(p, g, state, group)
                if group["momentum"]:
                    buf = state.get("momentum_buffer")
                    buf = g.clone() if buf is None else buf.mul_(group["momentum"]).add_(g)
                    state["momentum_buffer"] = buf
                    g = buf
                p.add_(g, alpha=-group["lr"])
        self._batch.clear()
        return loss

    def _precondition(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
                      ) -> torch.Tensor:
        a_batch = self._batch[p].to(p.device)
        state["A"] = a_batch if "A" not in state else state["A"].mul_(group["ema"]).add_(a_batch,
                                                                                         alpha=1 - group["ema"])
        state["steps"] = state.get("steps", 0) + 1
        if "inverse" not in state or (state["steps"] - 1) % self.update_every == 0:
            state["inverse"] = self._inverse(state, group["damping"])
        inv = state["inverse"].to(g.dtype)
        return torch.einsum("oi...,ij->oj...", g, inv)

    def remove_hooks(self) -> None:
        """Detach the statistics hooks from the model (after training)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
