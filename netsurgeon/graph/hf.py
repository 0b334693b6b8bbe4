"""Tracing Hugging Face ``transformers`` models (imported by the tracer only for such models).

``fx.symbolic_trace`` fails on them for reasons that have nothing to do with the network:

1. ``forward`` is wrapped by decorators (``can_return_tuple``, ``merge_with_config_defaults``,
   ``deprecate_kwarg``) with ``(self, *args, **kwargs)`` signatures: fx unwraps the signature but
   patches the wrapper's code object ("co_varnames is too small"), or hands the decorator a proxy
   for ``**kwargs`` ("'Proxy' object does not support item assignment"). ``concrete_args`` cannot
   help: the failure is in the signature, not in a value. Here the model is traced through a
   generated ``forward(self, input_ids, ...)`` that names exactly the inputs given (the model's
   positional parameters, in order) and calls the real ``forward`` with keywords; every other
   argument keeps its default, i.e. the model behaves as if called without it (no attention mask).
2. The key/value cache (``use_cache`` defaults to the config's True) builds a ``DynamicCache``
   object that a graph cannot hold: the trace calls ``forward(..., use_cache=False)``; the cache
   is an inference shortcut that does not change the other outputs.
3. Shapes are unpacked (``(*x.shape[:-1], -1, d)``), compared (``if q_length > 1``), and taken
   ``len`` of. The tracer runs every node on the example inputs as it is recorded (a shadow
   execution), so iterating a proxy yields one ``getitem`` per element of its concrete value,
   ``len`` returns the concrete length and branches are decided on concrete values (listed in
   ``TraceInfo.specialized``, with the transformers line). Sizes stay symbolic in the graph.
   (Leaf modules run there without their hooks: transformers' output-capture hooks append to
   a list.) Factories whose argument parser rejects proxies before ``__torch_function__`` sees
   them (``torch.ones(x.shape[0], n)``, ``torch.finfo(x.dtype)`` in eager-attention masks) are
   recorded as nodes while tracing.
4. Buffers (``position_ids``) are sliced with symbolic bounds: they are traced as ``get_attr``
   nodes (``proxy_buffer_attributes``) instead of constant tensors.
5. Functions made into parameterless ``nn.Module`` instances by the ``kernels`` package
   (``apply_rotary_pos_emb``) are not submodules of the model: they are traced through.
6. The output is a ``ModelOutput`` (an ``OrderedDict`` dataclass); the traced module returns a
   plain ``dict`` with the same keys, in the same order, as the eager output (learned from one
   eager run on the example inputs; a key the trace cannot produce, the cache, holds None), so
   ``out["logits"]`` works on both.

Train/eval fidelity comes from the tracer's two traces as for timm models: attention that calls
``scaled_dot_product_attention(dropout_p=p if self.training else 0.0)`` differs between them, so
its module (BERT's, GPT-2's self-attention) becomes a leaf, listed in ``TraceInfo.auto_leaves``.

``concrete_args`` given to :func:`netsurgeon.trace` are passed to ``forward`` as fixed keyword
arguments (``concrete_args={"output_hidden_states": True}``).

Example (transformers is optional, so this is not a doctest; tests/test_hf_trace.py runs it)::

    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)
    ids = torch.zeros(1, 4, dtype=torch.long)
    gm = netsurgeon.trace(transformers.GPT2LMHeadModel(cfg), ids)
    list(gm(ids))  # ['logits', 'cache']: the cache is None
"""
from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from dataclasses import is_dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx import _symbolic_trace as st

from ..errors import TraceError
from .running import example_run, user_line

__all__ = ["HFTracing", "default_inputs"]

_MISSING = object()  # a node whose concrete value could not be computed
_CACHE_ARGS = ("use_cache",)


def default_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """The inputs that decide the trace's control flow when the caller gives none, from a generator
    seeded 0: token ids ``(2, 16)`` (fewer positions where the model has fewer) for a model whose
    first input is ``input_ids``, a ``(2, C, H, W)`` standard-normal batch for ``pixel_values``.

    Raises:
        TraceError: another first input (audio, embeddings...): the caller must give example inputs.
    """
    cfg = getattr(model, "config", None)
    first = next(iter(inspect.signature(model.forward).parameters), "")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    if first == "input_ids":
        vocab = int(getattr(cfg, "vocab_size", None) or 2)
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 16
        return (torch.randint(0, vocab, (2, min(16, int(positions))), generator=g).to(device),)
    side = getattr(cfg, "image_size", None)
    if first == "pixel_values" and side is not None:
        h, w = (side, side) if isinstance(side, int) else tuple(side)[-2:]
        return (torch.randn(2, int(getattr(cfg, "num_channels", 3)), int(h), int(w), generator=g).to(device),)
    raise TraceError(f"cannot trace {type(model).__name__} without example inputs: its first input is "
                     f"{first!r}, of a shape netsurgeon cannot guess; remedy: pass example_inputs=(...) in the "
                     f"order of forward's parameters")


def _from_transformers(model: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__)


def _is_model_output(x: Any) -> bool:
    return isinstance(x, OrderedDict) and is_dataclass(x)


def _input_names(model: nn.Module, n_inputs: int, fixed: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The names of the first ``n_inputs`` positional parameters of ``model.forward`` and the
    keyword arguments every traced call adds (``use_cache=False`` and the caller's fixed ones)."""
    sig = inspect.signature(model.forward)  # follows __wrapped__ through the decorators
    params = sig.parameters
    positional = [p.name for p in params.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    cls = type(model).__name__
    if n_inputs > len(positional):
        raise TraceError(f"cannot trace {cls}: {n_inputs} example inputs given but forward{sig} takes "
                         f"{len(positional)} positional arguments; remedy: pass at most {len(positional)} "
                         f"inputs, in the order of forward's parameters")
    names = positional[:n_inputs]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in fixed:
        if key in names:
            raise TraceError(f"cannot trace {cls}: concrete_args fixes {key!r}, which is also an example input; "
                             f"remedy: give it in one place only")
        if key not in params and not takes_any:
            raise TraceError(f"cannot trace {cls}: concrete_args names {key!r}, which forward does not take "
                             f"(it takes {', '.join(params)}); remedy: drop it from concrete_args")
    extra = {k: False for k in _CACHE_ARGS if k in params}
    extra.update(fixed)
    return names, extra


def _root_forward(model: nn.Module, names: list[str], extra: dict[str, Any], keys: list[str] | None
                  ) -> Callable[..., Any]:
    """A ``forward(self, <names>)`` that calls the model's real ``forward`` with keyword arguments
    and returns its output as a plain dict with the eager output's ``keys``."""
    forward = type(model).forward

    def call(self: nn.Module, args: tuple[Any, ...]) -> Any:
        out = forward(self, **dict(zip(names, args)), **extra)
        if not _is_model_output(out):
            return out
        order = list(keys or ()) + [k for k in out.keys() if k not in (keys or ())]
        return {k: (out[k] if k in out.keys() else None) for k in order}

    src = f"def forward(self, {', '.join(names)}):\n    return _call(self, ({''.join(n + ', ' for n in names)}))\n"
    scope: dict[str, Any] = {"_call": call}
    exec(compile(src, f"<netsurgeon: {type(model).__name__}.forward>", "exec"), scope)  # noqa: S102
    return scope["forward"]


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """fx's originals of ``nn.Module.__call__`` / ``__getattr__`` while a trace is in progress."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = st._orig_module_call, st._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched


@contextlib.contextmanager
def _side_effects_undone(model: nn.Module, inputs: tuple[Any, ...]) -> Iterator[None]:
    """Runs inside the block (the shadow execution, the reference run) leave the RNG and the buffers
    as they were: dropout draws and batch-norm statistics are not the trace's to change."""
    devices = sorted({t.device.index or 0 for t in [*inputs, *model.parameters(), *model.buffers()]
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    buffers = [(b, b.clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def _output_keys(model: nn.Module, inputs: tuple[Any, ...], fixed: dict[str, Any]) -> list[str] | None:
    """The keys of the eager output (None for a tuple), from one run without grad: the traced module
    returns the same keys, so a key it cannot produce (the cache) is still there, as None."""
    with torch.no_grad(), example_run(type(model).__name__, inputs):
        out = model(*inputs, **fixed)
    return list(out.keys()) if _is_model_output(out) else None


class HFProxy(fx.Proxy):
    """A proxy whose ``len`` is that of its concrete value (the rank of a shape, mostly)."""

    def __len__(self) -> int:
        value_of = getattr(self.tracer, "value_of", None)
        value = value_of(self) if value_of is not None else _MISSING
        if value is _MISSING or not hasattr(value, "__len__"):
            return super().__len__()
        return len(value)


class HFTracing(fx.Tracer):
    """What a tracer needs for ``transformers`` models (see the module docstring): a mixin that
    ``tracer.py`` puts before ``NetsurgeonTracer`` (which gives it ``example_inputs``, ``decisions``
    and the leaf rules), so that this module does not import the tracer."""

    proxy_buffer_attributes = True
    example_inputs: tuple[torch.Tensor, ...] | None
    decisions: list[str]

    def __init__(self, leaf_paths: Any = (), example_inputs: tuple[torch.Tensor, ...] | None = None) -> None:
        super().__init__(leaf_paths, example_inputs)  # type: ignore[call-arg]  # NetsurgeonTracer's
        self._values: dict[fx.Node, Any] = {}
        self._placeholders = 0
        self._busy = False
        self._root_fn: Callable[..., Any] | None = None

    # ------------------------------------------------------------------ entry points
    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        if not isinstance(root, nn.Module):
            return super().trace(root, concrete_args)
        if self.example_inputs is None and _from_transformers(root):
            self.example_inputs = default_inputs(root)
        inputs = tuple(self.example_inputs or ())
        self._root_fn = None
        if _from_transformers(root):  # a model that only contains transformers modules keeps its own forward
            names, extra = _input_names(root, len(inputs), dict(concrete_args or {}))
            with _side_effects_undone(root, inputs):
                keys = _output_keys(root, inputs, dict(concrete_args or {}))
            self._root_fn, concrete_args = _root_forward(root, names, extra, keys), None
        try:
            with _side_effects_undone(root, inputs):  # torch factories: NetsurgeonTracer.trace
                return super().trace(root, concrete_args)
        finally:
            self._values.clear()

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Any, list[Any]]:
        fn = self._root_fn if is_module and self._root_fn is not None else root_fn
        return super().create_args_for_root(fn, is_module, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return HFProxy(node, self)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            self.path_of_module(m)
        except NameError:  # a function the ``kernels`` package turned into a module instance
            if next(m.parameters(), None) is None and next(m.buffers(), None) is None:
                return forward(*args, **kwargs)
            raise
        return super().call_module(m, forward, args, kwargs)

    # ------------------------------------------------------------------ shadow execution
    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any | None = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output" and not self._busy:
            self._busy = True
            try:
                with _untraced(), torch.no_grad():
                    self._values[node] = self._run(node)
            except Exception:  # noqa: BLE001 - unknown values fall back to fx's behaviour
                self._values[node] = _MISSING
            finally:
                self._busy = False
        return node

    def _run(self, node: fx.Node) -> Any:
        def value(n: fx.Node) -> Any:
            v = self._values.get(n, _MISSING)
            if v is _MISSING:
                raise LookupError(n.name)
            return v

        if node.op == "placeholder":
            i, self._placeholders = self._placeholders, self._placeholders + 1
            inputs = self.example_inputs or ()
            return inputs[i] if i < len(inputs) else _MISSING
        if node.op == "get_attr":
            obj: Any = self.root
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        args, kwargs = fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":  # without hooks: transformers' output-capture hooks append to a list
            return self.root.get_submodule(node.target).forward(*args, **kwargs)
        return _MISSING

    def value_of(self, proxy: fx.Proxy) -> Any:
        """The concrete value of ``proxy`` on the example inputs (``_MISSING`` when unknown)."""
        return self._values.get(proxy.node, _MISSING)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.value_of(obj)
        if value is _MISSING:
            return super().to_bool(obj)
        result = bool(value)
        self.decisions.append(f"{user_line()} -> {result}")
        return result

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.value_of(obj)
        if not isinstance(value, (tuple, list, torch.Tensor)):  # torch.Size is a tuple
            return super().iter(obj)
        if isinstance(value, torch.Tensor):  # iterating a tensor fixes its first size
            self.decisions.append(f"{user_line()} -> iterates {len(value)} rows")
        return iter([obj[i] for i in range(len(value))])


