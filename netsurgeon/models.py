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
from typing import Any

import torch.nn as nn

from .errors import ModelSpecError

__all__ = ["create_model", "default_input_shape"]


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


def create_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec`` with random weights.

    Args:
        spec: a timm model name (``"resnet18"``) or ``"package.module:factory"``.
        **kwargs: passed to the factory (e.g. ``num_classes=10``).

    Raises:
        ModelSpecError: unknown timm name (with close names), import or factory failure.
    """
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"a model spec is a non-empty string; got {spec!r}")
    if ":" in spec:
        return _from_factory(spec, kwargs)
    import timm

    if not timm.is_model(spec):
        names = timm.list_models()
        close = difflib.get_close_matches(spec, names, n=3, cutoff=0.6)
        hint = f" Close timm names: {', '.join(close)}." if close else ""
        raise ModelSpecError(f"unknown model {spec!r}: not a timm model name and not 'package.module:factory'.{hint}")
    return timm.create_model(spec, pretrained=False, **kwargs)


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """``(1, C, H, W)`` from a timm model's ``pretrained_cfg``; None when unknown."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (1, *cfg["input_size"])
    return None
