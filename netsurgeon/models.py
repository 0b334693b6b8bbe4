"""Resolve a model spec: a timm model name (random init, no download) or
``package.module:factory``.

Example:
    >>> from netsurgeon.models import create_model
    >>> type(create_model("resnet18")).__name__
    'ResNet'
"""
from __future__ import annotations

import difflib
import importlib
import math
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .errors import InvalidArgumentError, ModelSpecError
from .recipe import check_input_shape, check_seed

__all__ = ["create_model", "default_input_shape", "example_inputs", "AllocationGuard"]

_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
              torch.empty_strided, torch.eye}
_METHOD_FACTORIES = {"new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided"}


def _size_of(args: tuple, kwargs: dict) -> int:
    """Elements a factory call would allocate, from its size arguments (0 when it cannot tell)."""
    size = kwargs.get("size")
    if size is None:
        ints = []
        for a in args:
            if isinstance(a, (tuple, list, torch.Size)):
                size = a
                break
            if isinstance(a, int) and not isinstance(a, bool):
                ints.append(a)
            else:
                break
        size = size if size is not None else ints
    try:
        return math.prod(int(v) for v in size)
    except (TypeError, ValueError):
        return 0


class AllocationGuard(TorchFunctionMode):
    """Refuse, before allocating, tensor factory calls that would bring the total above ``max_elements``.

    Counts every ``torch.empty/zeros/ones/full/rand*/eye`` and ``Tensor.new_*`` call made while
    active, freed or not, so a model factory asked for ``num_classes=10**7`` fails with a
    :class:`ModelSpecError` instead of exhausting the machine. Tensors that other ops return
    (``x * y``, ``torch.cat``) are not counted: the cap bounds parameters and buffers, not every
    temporary a factory computes. ``max_elements=None`` counts nothing.

    Example:
        >>> with AllocationGuard(1000):
        ...     _ = torch.nn.Linear(10, 10)   # 110 elements
        >>> with AllocationGuard(1000):
        ...     _ = torch.nn.Linear(100, 100)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        netsurgeon.errors.ModelSpecError: building the model would allocate more than 1,000 tensor elements ...
    """

    def __init__(self, max_elements: int | None, what: str = "the model") -> None:
        super().__init__()
        self.max_elements, self.what, self.total = max_elements, what, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = 0
        if func in _FACTORIES:
            n = _size_of(args, kwargs)
        elif getattr(func, "__name__", "") in _METHOD_FACTORIES:
            n = _size_of(args[1:], kwargs)
        if n and self.max_elements is not None:
            self.total += n
            if self.total > self.max_elements:
                raise ModelSpecError(f"building {self.what} would allocate more than {self.max_elements:,} tensor "
                                     f"elements (the cap on a model build); check its arguments (e.g. num_classes) "
                                     f"or raise max_model_elements")
        return func(*args, **kwargs)


def _from_factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"model spec {spec!r} must be 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} from model spec {spec!r}: {exc}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelSpecError(f"{module_name!r} has no attribute {attr!r} (model spec {spec!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelSpecError(f"{spec!r} is not callable")
    try:
        model = factory(**kwargs)
    except TypeError as exc:  # most often an argument the factory does not take
        raise ModelSpecError(f"{spec!r} failed with the arguments {kwargs!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def create_model(spec: str, max_elements: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec`` with random weights.

    Args:
        spec: a timm model name (``"resnet18"``) or ``"package.module:factory"``.
        max_elements: refuse a build that would allocate more tensor elements than this (checked
            before each allocation, see :class:`AllocationGuard`). Default: no cap.
        **kwargs: passed to the factory (e.g. ``num_classes=10``).

    Raises:
        ModelSpecError: unknown timm name (with close names), import or factory failure, or a build
            over ``max_elements``.
    """
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"a model spec is a non-empty string; got {spec!r}")
    if max_elements is not None:
        with AllocationGuard(max_elements, f"model {spec!r}"):
            return create_model(spec, **kwargs)
    if ":" in spec:
        return _from_factory(spec, kwargs)
    import timm

    if not timm.is_model(spec):
        names = timm.list_models()
        close = difflib.get_close_matches(spec, names, n=3, cutoff=0.6)
        hint = f" Close timm names: {', '.join(close)}." if close else ""
        raise ModelSpecError(f"unknown model {spec!r}: not a timm model name and not 'package.module:factory'.{hint}")
    try:
        return timm.create_model(spec, pretrained=False, **kwargs)
    except ModelSpecError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError) as exc:  # arguments the model does not take
        raise ModelSpecError(f"timm model {spec!r} failed with the arguments {kwargs!r}: "
                             f"{type(exc).__name__}: {exc}") from None


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """``(1, C, H, W)`` from a timm model's ``pretrained_cfg``; None when unknown."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (1, *cfg["input_size"])
    return None


def example_inputs(shape: Sequence[int], seed: int = 0) -> tuple[torch.Tensor]:
    """One standard-normal example input of ``shape``, from a generator seeded ``seed`` (the global
    RNG is untouched); the shape is checked against :data:`netsurgeon.recipe.MAX_INPUT_ELEMENTS`
    before anything is allocated.

    Example:
        >>> example_inputs((1, 3, 8, 8))[0].shape
        torch.Size([1, 3, 8, 8])
    """
    shape = check_input_shape(list(shape), "input shape", InvalidArgumentError)
    seed = check_seed(seed, "seed", InvalidArgumentError)
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)
