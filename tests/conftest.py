"""Shared test helpers."""
from __future__ import annotations

import torch
import torch.nn as nn


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters, and every
    all-zero parameter (timm zero-inits some gammas and heads) small random values,
    so that folding errors cannot hide behind identity norms or zero outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and p.is_floating_point() and bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__.startswith("FrozenBatchNorm"):
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model


def count_batch_norms(model: nn.Module) -> int:
    """Batch-norm modules of any flavour (torch, timm composites, frozen)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(m).__name__
               for m in model.modules())


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run tiny tensors: with 2 threads each op pays a thread hand-off (measured
    ~23 ms vs 0.07 ms per small conv on the 2-core CI machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def require_data() -> None:
    """Fail with the DataNotFoundError message when the datasets are missing, unless
    NETSURGEON_SKIP_DATA=1 asks for an explicit skip (with that message as the reason)."""
    import os

    from netsurgeon.data import data_root
    from netsurgeon.errors import DataNotFoundError

    try:
        data_root()
    except DataNotFoundError as e:
        if os.environ.get("NETSURGEON_SKIP_DATA") == "1":
            pytest.skip(f"NETSURGEON_SKIP_DATA=1 and no datasets: {e}")
        raise


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (registered in sys.modules: dataclasses need it)."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module
