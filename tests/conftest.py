"""Shared test helpers.

The benchmark scripts and their harness live in ``benchmarks/`` (``benchmarks/harness``), not in
the ``netsurgeon`` package; ``pythonpath = ["benchmarks"]`` in ``pyproject.toml`` puts that folder
on ``sys.path``, so tests import them as the scripts do: ``harness``, ``harness.data``, ``train_deep``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Sequence

import pytest
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


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run tiny tensors: with 2 threads each op pays a thread hand-off (measured
    ~23 ms vs 0.07 ms per small conv on the 2-core CI machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- datasets
# One policy for every test that reads shared/data (harness.data), in require_data():
# the ``needs_data`` marker (checked before the test's fixtures run) and direct calls
# (fixtures that return the data root; tests that need the data only for their second
# half) both go through it. Without the datasets the test is SKIPPED with a reason that
# names NETSURGEON_DATA; with NETSURGEON_REQUIRE_DATA=1 (.ci/run sets it) it FAILS instead.
REQUIRE_DATA_ENV = "NETSURGEON_REQUIRE_DATA"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_data: reads the datasets (shared/data beside the checkout, or $NETSURGEON_DATA); "
        f"skipped with the reason when they are missing, failed instead when {REQUIRE_DATA_ENV}=1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_data") is not None:
        require_data()


def data_required() -> bool:
    """True when NETSURGEON_REQUIRE_DATA asks for missing datasets to fail the tests."""
    return os.environ.get(REQUIRE_DATA_ENV, "").strip().lower() in {"1", "true", "yes"}


def expected_data_files() -> list[str]:
    """The files under the data root that the tests read, relative to it."""
    from harness.data import _CIFAR_FILE, _IDX_PREFIX, DATASETS

    files = ["SHA256SUMS"]
    for name, spec in sorted(DATASETS.items()):
        if name == "cifar10":
            files.append(f"{spec.directory}/{_CIFAR_FILE}")
        else:
            files += [f"{spec.directory}/{_IDX_PREFIX[split]}-{kind}-ubyte.gz"
                      for split in spec.sizes for kind in ("images-idx3", "labels-idx1")]
    return files


def missing_data_reason(files: Sequence[str] = ()) -> str | None:
    """None when every dataset file the tests read (and ``files``, relative to the data root) is
    present, else a one-line reason that says where the files were looked for and how to point the
    tests at them."""
    import harness.data as nd
    from netsurgeon.errors import DataNotFoundError

    env = os.environ.get(nd.ENV_VAR) or None
    where = (f"{env} (from ${nd.ENV_VAR})" if env is not None
             else f"{nd._REPO_DEFAULT} (shared/data beside the checkout; ${nd.ENV_VAR} is not set)")
    fix = f"set {nd.ENV_VAR}=/path/to/shared/data"
    try:
        root = nd.data_root()
    except DataNotFoundError:
        return f"dataset directory not found: {where}; {fix}"
    missing = [f for f in [*expected_data_files(), *files] if not (root / f).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return f"dataset files not found in {where}: {shown}; {fix}"
    return None


def require_data(files: Sequence[str] = ()) -> Path:
    """The data root. When the datasets (or ``files``, relative to it) are missing: skip with the
    reason, or fail with it when NETSURGEON_REQUIRE_DATA=1 (so that CI cannot pass by skipping)."""
    from harness.data import data_root

    reason = missing_data_reason(files)
    if reason is None:
        return data_root()
    if data_required():
        pytest.fail(f"{REQUIRE_DATA_ENV}=1 and {reason}", pytrace=False)
    pytest.skip(f"{reason} ({REQUIRE_DATA_ENV}=1 makes this a failure)")


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py``, imported as the module ``name`` (as the scripts import
    each other); fails if that name resolves to a module outside ``benchmarks/``."""
    module = importlib.import_module(name)
    where = Path(module.__file__ or "").resolve()
    assert where == BENCHMARKS / f"{name}.py", f"import {name} found {where}, not the script in {BENCHMARKS}"
    return module


def spawn_gloo(worker, *args, world_size: int = 2) -> None:
    """``worker(rank, world_size, port, *args)`` in ``world_size`` processes, with a free local port for
    the gloo process group the worker starts."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world_size, port, *args), nprocs=world_size, join=True)


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int):
    """Inside a :func:`spawn_gloo` worker: one torch thread and the gloo process group on ``port``,
    destroyed on the way out."""
    from datetime import timedelta

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        yield
    finally:
        dist.destroy_process_group()
