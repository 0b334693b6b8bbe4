"""Tracing with torch.fx that keeps train/eval behaviour intact.

Plain ``fx.symbolic_trace`` inlines every module defined outside ``torch.nn``. For
timm's ``BatchNormAct2d`` that bakes ``self.training`` into an ``F.batch_norm`` call,
so a traced model switched to eval keeps using batch statistics. netsurgeon:

1. keeps every module with an op-kind rule (norms, norm+act composites, activations,
   conv variants, drop-path) as a leaf, so it stays callable and its kind visible;
2. traces the model twice, in train and in eval mode, and compares the graphs. A node
   that differs marks code that reads ``self.training``: functional dropout becomes a
   mode-aware ``nn.Dropout`` module, any other difference makes the innermost module
   owning it a leaf and the model is traced again. Mode-dependent code in the root
   module itself cannot be fixed and raises :class:`TraceError`;
3. makes a module type timm registered as not traceable (``register_notrace_module``) a
   leaf when tracing fails inside it;
4. traces Hugging Face ``transformers`` models with the front-end of :mod:`.hf`;
5. traces ``forward`` as it is called with the example inputs: a parameter they do not
   supply (``mask=None``, ``patch_coord=None``, ``pre_logits=False``) keeps its default
   instead of becoming a placeholder. A placeholder is a proxy, never ``None``, so
   ``if mask is not None:`` would take the branch the eager call does not, and the traced
   module fail or differ when called without the argument. The defaults used are listed in
   ``TraceInfo.defaulted``; the traced module takes exactly the supplied inputs.

Example:
    >>> import timm, torch, netsurgeon
    >>> gm = netsurgeon.trace(timm.create_model("resnet18"))
    >>> type(gm.get_submodule("bn1")).__name__
    'BatchNorm2d'
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import linecache
import operator
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NetsurgeonError, TraceError
from ..models import default_input_shape
from ..ops import module_rule, recognize_activations, recognize_norms, registered_python_functions
from .running import (eval_mode, example_run, factories_traced, outputs_match, overflow_error, require_finite,
                      run_recording_shapes, user_line)
from ..layers import ModeConstant
from .attention import write_out_multihead_attention
from .state import has_trace, random_batch, set_trace_info

__all__ = ["trace", "NetsurgeonTracer", "TraceInfo", "assign_items"]


_DROPOUT_MODULES: dict[Any, type[nn.Module]] = {
    F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d, F.dropout3d: nn.Dropout3d,
    F.alpha_dropout: nn.AlphaDropout, F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}
_MAX_RETRACES = 64
# torch.nn modules traced through rather than kept as leaves (fx's default for torch.nn): their
# attention (nn.MultiheadAttention) stays a leaf that passes can read or rewrite.
_TRACED_TORCH_CONTAINERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_FX_CONSTANTS = ("_tensor_constant", "_param_constant", "_torchbind_obj")  # attributes fx puts on the root


@dataclass
class TraceInfo:
    """How a model was traced: leaves added for mode-dependent code, rewritten dropouts."""

    model_class: str
    auto_leaves: list[str] = field(default_factory=list)
    user_leaves: list[str] = field(default_factory=list)
    mode_dropouts: list[str] = field(default_factory=list)
    retraces: int = 0
    input_shape: tuple[int, ...] | None = None
    specialized: list[str] = field(default_factory=list)  # control flow decided on the example inputs
    untraceable_leaves: list[str] = field(default_factory=list)  # "path (Class): why" for leaves made on failure
    defaulted: list[str] = field(default_factory=list)  # "name=default": forward parameters the inputs do not supply
    # "Class (family)": norm types registered by what they compute (ops.recognized)
    recognized_norms: list[str] = field(default_factory=list)
    recognized_activations: list[str] = field(default_factory=list)
    written_out: list[str] = field(default_factory=list)  # nn.MultiheadAttention calls written out as graph ops
    buffers_as_nodes: bool = False  # buffers traced as get_attr nodes (after a failure with them as constants)


class NetsurgeonTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps registered op modules and chosen paths as leaves."""

    def __init__(self, leaf_paths: Iterable[str] = (), example_inputs: tuple[torch.Tensor, ...] | None = None
                 ) -> None:
        super().__init__(autowrap_functions=registered_python_functions())
        self.leaf_paths = set(leaf_paths)
        self.record_stack_traces = True
        self.example_inputs = example_inputs
        self.decisions: list[str] = []
        self.defaulted: frozenset[str] = frozenset()  # forward parameters traced at their defaults

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
                             ) -> tuple[Any, list[Any]]:
        """fx's placeholders, for the root ``forward`` without the parameters in ``defaulted``
        (they keep their default values; see :func:`_forward_with_defaults`)."""
        if is_module and self.defaulted:
            root_fn = _forward_with_defaults(root_fn, self.defaulted)
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with factories_traced(self):  # torch.ones(x.shape[0], n): a node, not a parser error
            return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def _concrete(self, obj: fx.Proxy) -> Any:
        """The value of ``obj`` on the example inputs: the graph so far, run on them."""
        node = obj.node  # first: an attribute proxy (``x.is_nested``) makes its node when asked for it
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        g.graph_copy(self.graph, env)
        g.output(env[node])
        return _run_untraced(self.root, g, self.example_inputs)

    def _record(self, value: Any) -> None:
        self.decisions.append(f"{user_line()} -> {value}")

    def to_bool(self, obj: fx.Proxy) -> bool:
        """Control flow on a traced value (``if x.shape[-2] < 7``): without example inputs an
        error; with them, the graph so far is run on them and the branch taken is recorded."""
        if self.example_inputs is None:
            return super().to_bool(obj)
        value = bool(self._concrete(obj))
        self._record(value)
        return value

    def length(self, obj: fx.Proxy) -> int | None:
        """``len`` of a traced shape (``len(x.size())``, nn.TransformerEncoder's ``_get_seq_len``): the
        number of dimensions, read on the example inputs (it does not change with the batch); None
        without them, or for anything but a shape (``len(x)`` would freeze the batch size)."""
        if self.example_inputs is None:
            return None
        value = self._concrete(obj)
        if not isinstance(value, torch.Size):
            return None
        self._record(f"len = {len(value)}")
        return len(value)

    def index(self, obj: fx.Proxy) -> int | None:
        """A traced integer used as a size or slice bound (``torch.ones(T, T)``, ``mask[:T, :T]``): its
        value on the example inputs, recorded as a specialization; None without them."""
        if self.example_inputs is None:
            return None
        value = self._concrete(obj)
        if isinstance(value, float) and value.is_integer():  # int(math.sqrt(n)) of a traced n
            value = int(value)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        self._record(f"size or index = {value}")
        return value

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if module_rule(m) is not None:
            return True
        if isinstance(m, _TRACED_TORCH_CONTAINERS):  # their norms, MLPs and residuals are the model's
            return False
        return super().is_leaf_module(m, module_qualified_name)


class _Proxy(fx.Proxy):
    """fx's proxy, with ``len`` of a traced shape and a traced integer used as a size or slice
    bound decided on the example inputs (see :meth:`NetsurgeonTracer.length` and
    :meth:`NetsurgeonTracer.index`); anything else fails as in fx."""

    def __len__(self) -> int:
        n = self.tracer.length(self) if isinstance(self.tracer, NetsurgeonTracer) else None
        return super().__len__() if n is None else n

    def __setitem__(self, index: Any, value: Any) -> None:
        """``t[index] = value`` on a traced tensor (ConViT builds its relative positions in a tensor
        whose size is a traced token count; MViTv2 adds its relative positions into a slice of the
        logits): recorded as ``t' = assign_items(t, index, value)``, a copy, and this proxy now stands
        for ``t'``, so later reads of ``t`` see the assignment as in eager code and the graph stays free
        of in-place writes (which the analysis cannot follow). A view of ``t`` taken before the
        assignment would not see it; the trace's check against the eager model catches that."""
        new = self.tracer.create_proxy("call_function", assign_items, (self, index, value), {})
        self.node = new.node

    def __index__(self) -> int:
        n = self.tracer.index(self) if isinstance(self.tracer, NetsurgeonTracer) else None
        if n is None:
            raise TypeError(f"a traced value ({self.node.name}) is used as an integer; pass example_inputs "
                            f"so netsurgeon.trace can read it, or make the module a leaf")
        return n


def assign_items(tensor: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``tensor`` with ``tensor[index] = value`` applied to a copy: how a traced item assignment
    appears in a netsurgeon graph."""
    out = tensor.clone()
    out[index] = value
    return out


def _run_untraced(root: nn.Module, graph: fx.Graph, inputs: tuple[torch.Tensor, ...]) -> Any:
    """Run ``graph`` concretely while a trace is in progress: fx patches ``nn.Module.__call__`` and
    ``__getattr__`` during tracing, so the originals are put back for the duration of the run --
    including building the ``GraphModule``, whose copies of the root's parameters would otherwise be
    proxies (the run would then extend the trace, and ``bool`` of its result recurse);
    buffers (batch-norm statistics a train-mode run would update) are restored afterwards."""
    from torch.fx import _symbolic_trace as st

    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = st._orig_module_call, st._orig_module_getattr
    try:
        gm = fx.GraphModule(root, graph)
        buffers = [(b, b.clone()) for b in gm.buffers()]  # a train-mode run updates batch-norm statistics
    except BaseException:
        nn.Module.__call__, nn.Module.__getattr__ = patched
        raise
    try:
        with torch.no_grad():
            return gm(*inputs)
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _set_modes(model: nn.Module, modes: dict[str, bool] | bool) -> None:
    for name, m in model.named_modules():
        m.training = modes if isinstance(modes, bool) else modes[name]


def _stack(node: fx.Node) -> list[str]:
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def _key(n: fx.Node) -> str:
    """A node's identity for comparing two traces (``format_node`` also shows user counts)."""
    return f"{n.op}|{n.name}|{n.target}|{n.args}|{n.kwargs}"


def _dropout_only_diff(a: fx.Node, b: fx.Node) -> bool:
    if a.op != "call_function" or a.target not in _DROPOUT_MODULES or a.target is not b.target:
        return False
    strip = lambda n: (n.args[:2], {k: v for k, v in n.kwargs.items() if k != "training"})  # noqa: E731
    return str(strip(a)) == str(strip(b))


def _sdpa_dropout(n: fx.Node) -> tuple[Any, str]:
    """``(dropout_p, the call without it)`` of a ``scaled_dot_product_attention`` node."""
    if len(n.args) > 4:
        rest = (n.args[:4] + n.args[5:], n.kwargs)
        return n.args[4], str(rest)
    return n.kwargs.get("dropout_p", 0.0), str((n.args, {k: v for k, v in n.kwargs.items() if k != "dropout_p"}))


def _sdpa_dropout_only_diff(a: fx.Node, b: fx.Node) -> bool:
    """Attention whose ``dropout_p`` follows the mode (``p if self.training else 0.0``), nothing else."""
    if a.op != "call_function" or a.target is not F.scaled_dot_product_attention or b.target is not a.target:
        return False
    (pa, ra), (pb, rb) = _sdpa_dropout(a), _sdpa_dropout(b)
    return ra == rb and isinstance(pa, (int, float)) and isinstance(pb, (int, float)) and pa != pb


def _alike(a: fx.Graph, b: fx.Graph) -> bool:
    """Whether two traces differ only where the merge knows how (functional and attention dropout)."""
    na, nb = list(a.nodes), list(b.nodes)
    return len(na) == len(nb) and all(_key(x) == _key(y) or _dropout_only_diff(x, y) or _sdpa_dropout_only_diff(x, y)
                                      for x, y in zip(na, nb))


def _without_unused_reads(g_train: fx.Graph, g_eval: fx.Graph) -> tuple[fx.Graph, fx.Graph]:
    """The two traces without unused attribute reads when that makes them alike, else as they are:
    code that only inspects (nn.TransformerEncoderLayer's fast-path checks read parameters and devices
    in eval mode) is no mode difference, but a module whose reads differ among other changes keeps
    the first difference where it is (so the right module becomes a leaf)."""
    if _alike(g_train, g_eval):
        return g_train, g_eval
    a, b = copy.deepcopy(g_train), copy.deepcopy(g_eval)
    _drop_unused_reads(a)
    _drop_unused_reads(b)
    return (a, b) if _alike(a, b) else (g_train, g_eval)


def _drop_unused_reads(graph: fx.Graph) -> None:
    """Erase unused attribute and shape reads: code that only inspects (nn.TransformerEncoderLayer's
    fast-path checks read parameters and devices in eval mode) must not count as a mode difference."""
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.users:
                continue
            # parameters and attributes other than shapes (devices, is_nested, requires_grad); unused shape
            # reads stay, as both traces make them alike
            reads = n.op == "get_attr" or (n.op == "call_function" and n.target is getattr and len(n.args) > 1
                                           and n.args[1] not in ("shape",)) \
                or (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
                    and n.args[0].op == "get_attr")
            if reads:
                graph.erase_node(n)
                changed = True


def _lcp(x: list[str], y: list[str]) -> str:
    owner = ""
    for p, q in zip(x, y):
        if p != q:
            break
        owner = p
    return owner


def _common_owner(a: fx.Node | None, b: fx.Node | None, prev: fx.Node | None) -> str:
    """The innermost module whose code produced the first difference between two traces.

    Where one trace has left a module and the other is still inside it, the module
    shared with the last common node (``prev``) is the one that diverged.
    """
    sa, sb = (_stack(a) if a is not None else []), (_stack(b) if b is not None else [])
    sp = _stack(prev) if prev is not None else []
    candidates = [_lcp(sa, sb)] if a is not None and b is not None else []
    candidates += [_lcp(sp, s) for s in (sa, sb)]
    return max(candidates, key=lambda path: (path.count(".") + 1) if path else 0, default="")


def _trace_error_from_exception(model: nn.Module, exc: BaseException) -> TraceError:
    """Build a TraceError naming the innermost module and line where tracing failed."""
    paths = {id(m): name for name, m in model.named_modules()}
    module_path, where = None, None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        self_obj = frame.f_locals.get("self")
        if isinstance(self_obj, nn.Module) and id(self_obj) in paths:
            module_path = paths[id(self_obj)]
            code = linecache.getline(frame.f_code.co_filename, lineno).strip()
            where = f"{frame.f_code.co_filename}:{lineno}: {code}"
    cls = type(model.get_submodule(module_path)).__name__ if module_path else type(model).__name__
    shown = repr(module_path) if module_path else "the root module"
    if module_path:
        remedy = (f"make it a leaf: netsurgeon.trace(model, leaf_modules=[{module_path!r}]) "
                  f"(or register its type once: netsurgeon.register_module_op({cls}, kind=netsurgeon.OpKind.OTHER))")
    else:
        remedy = ("fix the forward arguments that drive control flow with concrete_args={...} (netsurgeon.trace "
                  "or transform), or rewrite that line")
    if "control flow" in str(exc):
        remedy = ("pass example_inputs so the branch is decided on them (the result is specialized to inputs "
                  "taking the same branches), or " + remedy)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    err = TraceError(f"cannot trace {type(model).__name__}: {first}\n  in module {shown} ({cls})"
                     f"{' at ' + where if where else ''}\n  remedy: {remedy}")
    err.module_path = module_path  # type: ignore[attr-defined]  # read by _timm_notrace_leaves
    return err


def _timm_notrace_leaves(model: nn.Module, path: str | None, leaves: set[str]) -> set[str]:
    """Where tracing failed inside a module type that timm registered as not traceable
    (``register_notrace_module``, e.g. ConViT's GPSA, which caches a tensor on itself from a
    shape test), every module of that type, to be made a leaf; empty otherwise."""
    timm_fx = sys.modules.get("timm.layers._fx")
    is_notrace = getattr(timm_fx, "is_notrace_module", None)
    if is_notrace is None or not path:
        return set()
    parts = path.split(".")
    for i in range(len(parts), 0, -1):  # the innermost registered owner
        cls = type(model.get_submodule(".".join(parts[:i])))
        if is_notrace(cls):
            return {name for name, m in model.named_modules() if type(m) is cls} - leaves
    return set()


def _from_transformers(model: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__)


_HF_TRACER: list[type[NetsurgeonTracer]] = []


def _tracer_class(model: nn.Module) -> type[NetsurgeonTracer]:
    """The front-end for ``model``: models with Hugging Face ``transformers`` modules get
    ``NetsurgeonTracer`` with ``hf.HFTracing`` mixed in (imported only then, so netsurgeon works
    without transformers installed)."""
    if not any(_from_transformers(m) for m in model.modules()):
        return NetsurgeonTracer
    if not _HF_TRACER:
        from .hf import HFTracing

        class HFTracer(HFTracing, NetsurgeonTracer):
            """``NetsurgeonTracer`` for models with ``transformers`` modules (see :mod:`.hf`)."""

        _HF_TRACER.append(HFTracer)
    return _HF_TRACER[0]


def _default_shadow(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[torch.Tensor, ...] | None:
    """The inputs that decide control flow when the caller gives none."""
    if _from_transformers(model):
        from .hf import default_inputs
        return default_inputs(model)
    return (random_batch(input_shape),) if input_shape else None


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    """The parameters of ``type(model).forward`` after ``self``, as fx reads them (unwrapped)."""
    try:
        params = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())
    except (TypeError, ValueError):  # a builtin or otherwise unreadable forward: fx decides
        return []
    return params[1:]


def _unsupplied_defaults(model: nn.Module, inputs: tuple[Any, ...] | None,
                         concrete_args: dict[str, Any] | None) -> dict[str, Any]:
    """The parameters of ``forward`` that ``inputs`` (bound positionally) do not supply and that have a
    default, with it: the trace calls ``forward`` without them, as the eager call does. Empty without
    inputs (nothing says how ``forward`` is called), for ``transformers`` models (:mod:`.hf` calls their
    ``forward`` with the given inputs only), and for parameters ``concrete_args`` names."""
    if inputs is None or _from_transformers(model):
        return {}
    params = _forward_parameters(model)
    if len(inputs) > sum(p.kind in _POSITIONAL for p in params):
        return {}  # more inputs than named positional parameters: *args takes them, nothing is left out
    supplied = {p.name for p in params[:len(inputs)]}  # positional parameters come first
    return {p.name: p.default for p in params
            if p.name not in supplied and p.kind not in _VARIADIC and p.default is not inspect.Parameter.empty
            and p.name not in (concrete_args or {})}


def _supplied_none(model: nn.Module, inputs: tuple[Any, ...] | None,
                   concrete_args: dict[str, Any] | None) -> dict[str, Any]:
    """``concrete_args`` with ``None`` added for each example input that is ``None`` (``(x, None)``):
    fx makes a placeholder of it, and a placeholder is never ``None`` to ``is None`` tests; as a
    concrete argument it keeps its place in the signature and fx checks that it stays ``None``."""
    if not inputs or _from_transformers(model):
        return dict(concrete_args or {})
    params = [p for p in _forward_parameters(model) if p.kind in _POSITIONAL]
    nones = {p.name: None for p, x in zip(params, inputs) if x is None}
    return {**nones, **(concrete_args or {})}


class _Name:
    """A default shown by its name in generated source (``inspect.Signature`` uses ``repr``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _forward_with_defaults(fn: Callable[..., Any], dropped: Iterable[str]) -> Callable[..., Any]:
    """``fn`` (an unbound ``forward``) without the parameters named in ``dropped``: a generated
    function whose signature lists the others (with their defaults and annotations) and that calls
    ``fn`` without the dropped ones, so they take their defaults. A positional parameter after a
    dropped one is passed by keyword; ``*args`` after one is dropped too (it can only be empty)."""
    dropped = set(dropped)
    kept: list[inspect.Parameter] = []
    call: list[str] = []
    scope: dict[str, Any] = {"__ns_forward": fn}
    gap = False  # a positional parameter was dropped: later ones go by keyword
    for p in inspect.signature(inspect.unwrap(fn)).parameters.values():
        if p.name in dropped or (gap and p.kind is inspect.Parameter.VAR_POSITIONAL):
            gap = gap or p.kind in _POSITIONAL
            continue
        if gap and p.kind is inspect.Parameter.POSITIONAL_ONLY:
            return fn  # cannot be passed by keyword: fx traces forward as it is
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(p.kind, "")
        by_name = p.kind is inspect.Parameter.KEYWORD_ONLY or (gap and p.kind in _POSITIONAL)
        call.append(f"{p.name}={p.name}" if by_name else prefix + p.name)
        default = p.default
        if default is not inspect.Parameter.empty:
            scope[f"__ns_default_{len(kept)}"] = default
            default = _Name(f"__ns_default_{len(kept)}")
        kept.append(p.replace(default=default, annotation=inspect.Parameter.empty))
    src = f"def forward{inspect.Signature(kept)}:\n    return __ns_forward({', '.join(call)})\n"
    exec(compile(src, f"<netsurgeon: {getattr(fn, '__qualname__', 'forward')}>", "exec"), scope)  # noqa: S102
    forward = scope["forward"]
    forward.__annotations__ = {k: v for k, v in getattr(inspect.unwrap(fn), "__annotations__", {}).items()
                               if k in {p.name for p in kept}}
    return forward


_SCALARS = (type(None), bool, int, float, str)


def _concrete_values_as_defaults(graph: fx.Graph, concrete_args: dict[str, Any] | None) -> None:
    """fx keeps a placeholder ``<name>_1`` for a scalar in ``concrete_args``, with the parameter's
    default as its default and a check that the value passed equals the concrete one: with a value
    other than the default, the traced module then fails when called without it. The placeholder's
    default becomes the concrete value (passing another value still fails fx's check)."""
    fixed = {f"{k}_1": v for k, v in (concrete_args or {}).items() if type(v) in _SCALARS}
    for node in graph.nodes:
        if node.op == "placeholder" and node.target in fixed:
            node.args = (fixed[node.target],)


def _trace_once(model: nn.Module, leaves: set[str], concrete_args: dict[str, Any] | None,
                example_inputs: tuple[torch.Tensor, ...] | None = None, decisions: list[str] | None = None,
                defaulted: Iterable[str] = (), buffers_as_nodes: bool = False) -> tuple[fx.Graph, dict[str, Any]]:
    """One trace, of ``forward`` without the ``defaulted`` parameters (they keep their defaults).
    fx stores tensor constants made in ``forward`` as ``_tensor_constantN``
    attributes on the root; they are taken off again (and returned) so that the model is
    left as it was and a second trace numbers its constants the same way."""
    before = set(model.__dict__)
    tracer = _tracer_class(model)(leaves, example_inputs)
    tracer.defaulted = frozenset(defaulted)
    if buffers_as_nodes:
        tracer.proxy_buffer_attributes = True
    try:
        with _reporting_tracing(), _tensors_kept(model, root=False):  # a proxy cached on a submodule (ConViT's GPSA)
            graph = tracer.trace(model, concrete_args=concrete_args)
        _concrete_values_as_defaults(graph, concrete_args)
        if decisions is not None:
            decisions.extend(d for d in tracer.decisions if d not in decisions)
    except NetsurgeonError:  # a TraceError, or example inputs the model cannot run on (hf front-end)
        raise
    except Exception as exc:  # any failure inside user code during tracing
        raise _trace_error_from_exception(model, exc) from exc
    finally:  # fx's constants, and proxies the forward stored; what else it sets on itself (a flag) stays
        new = {k: model.__dict__[k] for k in set(model.__dict__) - before}
        added = {k: v for k, v in new.items() if k.startswith(_FX_CONSTANTS)}
        for k, v in new.items():
            if k in added or isinstance(v, fx.Proxy):
                delattr(model, k)
    return graph, added


@contextlib.contextmanager
def _reporting_tracing() -> Iterator[None]:
    """``torch.jit.is_tracing()`` answers True while fx traces. Models test it to leave out what a
    trace cannot record: timm's LeViT, TinyViT, EfficientViT and EfficientFormerV2 attention
    compute their position bias directly ``if torch.jit.is_tracing() or self.training`` and otherwise
    cache it in a dict keyed by ``str(device)`` (which a proxy cannot give), so without this the
    eval-mode trace failed inside them and their attention became an opaque leaf. The direct path
    computes what the cache holds."""
    original = torch.jit.is_tracing
    torch.jit.is_tracing = lambda: True
    try:
        yield
    finally:
        torch.jit.is_tracing = original


_MAX_FAILURE_LEAVES = 16  # module types made leaves because tracing failed inside them


def _trace_leafing_notrace(model: nn.Module, leaves: set[str], info: TraceInfo, concrete_args: dict[str, Any] | None,
                           shadow: tuple[torch.Tensor, ...] | None, defaulted: Iterable[str] = ()
                           ) -> tuple[fx.Graph, dict[str, Any]]:
    """``_trace_once``; a failure inside a submodule makes every module of its type a leaf and
    traces again (a leaf runs its own eager code, so the result stays exact; the analysis and the
    passes then name it as an opaque op). timm's not-traceable types go to ``info.auto_leaves``,
    others to ``info.untraceable_leaves`` with the error. A failure in the root module, control
    flow with no example inputs to decide it (they are the better remedy), or more than
    ``_MAX_FAILURE_LEAVES`` such types, is raised."""
    failures = 0
    while True:
        try:
            return _trace_once(model, leaves, concrete_args, shadow, info.specialized, defaulted,
                               buffers_as_nodes=info.buffers_as_nodes)
        except TraceError as err:
            if not info.buffers_as_nodes and "pass example_inputs" not in str(err):
                # fx reads buffers as constant tensors, and a constant's method called with a traced size
                # fails (rotary embeddings: ``self.inv_freq[None, :, None].expand(x.shape[0], -1, 1)``): with
                # buffers read as graph nodes instead, the trace may go through; else the error stands
                try:
                    out = _trace_once(model, leaves, concrete_args, shadow, info.specialized, defaulted,
                                      buffers_as_nodes=True)
                    info.buffers_as_nodes = True
                    return out
                except TraceError:
                    pass
            path = getattr(err, "module_path", None)
            extra = _timm_notrace_leaves(model, path, leaves)
            if extra:
                leaves.update(extra)
                info.auto_leaves.extend(sorted(extra))
                continue
            if not path or path in leaves or failures >= _MAX_FAILURE_LEAVES or "pass example_inputs" in str(err):
                raise  # control flow without inputs to decide it: example inputs do better than a leaf
            failures += 1
            cls = type(model.get_submodule(path))
            same = sorted({name for name, m in model.named_modules() if type(m) is cls} - leaves)
            leaves.update(same)
            why = str(err).splitlines()[0].split(": ", 1)[-1]
            info.untraceable_leaves.extend(f"{name} ({cls.__name__}): {why}" for name in same)


def _replace_mode_dropouts(gm: fx.GraphModule, indices: set[int]) -> list[str]:
    """Turn functional dropouts whose ``training`` flag followed the mode into modules."""
    graph = gm.graph
    names: list[str] = []
    for i, node in enumerate(list(graph.nodes)):
        if i not in indices:
            continue
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        inplace = node.kwargs.get("inplace", node.args[3] if len(node.args) > 3 else False)
        if isinstance(p, fx.Node):
            raise TraceError(f"dropout node {node.name} has a rate computed at run time; "
                             f"make the module that calls it a leaf")
        name = f"ns_dropout_{len(names)}"
        gm.add_submodule(name, _DROPOUT_MODULES[node.target](p=float(p), inplace=bool(inplace)))
        with graph.inserting_before(node):
            repl = graph.call_module(name, (node.args[0],))
        repl.meta = dict(node.meta)
        node.replace_all_uses_with(repl)
        graph.erase_node(node)
        names.append(f"{node.name} -> {name}")
    if names:
        gm.recompile()
    return names


def _mode_attention_dropouts(gm: fx.GraphModule, rates: dict[int, tuple[float, float]]) -> list[str]:
    """Attention calls whose ``dropout_p`` followed the mode read it from a :class:`ModeConstant`."""
    graph = gm.graph
    names: list[str] = []
    for i, node in enumerate(list(graph.nodes)):
        if i not in rates:
            continue
        name = f"ns_attention_dropout_{len(names)}"
        gm.add_submodule(name, ModeConstant(*rates[i]))
        with graph.inserting_before(node):
            p = graph.call_module(name, ())
        if len(node.args) > 4:
            node.args = node.args[:4] + (p,) + node.args[5:]
        else:
            node.kwargs = {**node.kwargs, "dropout_p": p}
        names.append(f"{node.name}.dropout_p -> {name}")
    if names:
        gm.recompile()
    return names


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None, *,
          leaf_modules: Iterable[str] = (), concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` that behaves like it in train and eval mode.

    Args:
        model: any ``nn.Module``; it is not modified (its modes are restored), but the
            returned module shares its parameters, like ``fx.symbolic_trace``.
        example_inputs: optional inputs; when given, the traced module is run on them in
            eval mode and checked against the eager model. Control flow on traced values
            (``if x.shape[-2] < 7``) is decided by running the graph traced so far on them
            (or, without them, on a random batch of a timm model's input size); the
            decisions are listed in ``TraceInfo.specialized`` and the report, and the
            result is valid for inputs that take the same branches. They are bound to
            ``forward``'s parameters in order; a parameter they do not supply keeps its
            default (``mask=None``: the traced module is the model called without a mask,
            and takes exactly the supplied inputs; listed in ``TraceInfo.defaulted``). To
            trace with an optional input, supply it (``(x, mask)``); an input given as
            ``None`` is fixed at ``None``.
        leaf_modules: qualified names of submodules to keep as opaque calls.
        concrete_args: passed to ``fx.Tracer.trace`` for arguments that drive control flow
            (for a ``transformers`` model: keyword arguments every call of ``forward`` gets);
            a parameter named here is not defaulted, and the eager check passes it too.

    Returns:
        The traced ``torch.fx.GraphModule``; ``netsurgeon.graph.state.trace_info(gm)`` gives a
        :class:`TraceInfo`.

    Raises:
        TraceError: naming the module path, the Python line and a remedy.
        ExampleInputError: NaN or inf in ``example_inputs`` (or outputs that overflow on them).
        InvalidArgumentError: NaN or inf in the parameters (NaN in the buffers) when
            ``example_inputs`` are given: the check against the eager model cannot work.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"netsurgeon.trace expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule) and has_trace(model):
        return model  # already traced by netsurgeon
    modes = {name: m.training for name, m in model.named_modules()}
    user_leaves = list(leaf_modules)
    known = {name for name, _ in model.named_modules()}
    for path in user_leaves:
        if path not in known:
            raise TraceError(f"leaf module {path!r} is not a submodule of {type(model).__name__}")
    leaves = set(user_leaves)
    info = TraceInfo(model_class=type(model).__name__, user_leaves=user_leaves,
                     input_shape=default_input_shape(model))
    info.recognized_norms = recognize_norms(model)  # LlamaRMSNorm and the like: leaves, classified NORM
    info.recognized_activations = recognize_activations(model)  # NewGELUActivation and the like: activations
    if example_inputs is not None:  # they decide control flow and check the result: NaN would mislead both
        require_finite(info.model_class, model, _as_tuple(example_inputs))
    shadow = _as_tuple(example_inputs) if example_inputs is not None else _default_shadow(model, info.input_shape)
    defaults = _unsupplied_defaults(model, shadow, concrete_args)
    info.defaulted = [f"{name}={value!r}" for name, value in defaults.items()]
    fixed = _supplied_none(model, shadow, concrete_args)
    try:
        for attempt in range(_MAX_RETRACES):
            _set_modes(model, True)
            g_train, constants = _trace_leafing_notrace(model, leaves, info, fixed, shadow, defaults)
            _set_modes(model, False)
            as_nodes = info.buffers_as_nodes
            g_eval, _ = _trace_leafing_notrace(model, leaves, info, fixed, shadow, defaults)
            if info.buffers_as_nodes != as_nodes:  # the eval trace needed buffers as nodes: so does the train one
                _set_modes(model, True)
                g_train, constants = _trace_leafing_notrace(model, leaves, info, fixed, shadow, defaults)
            g_train, g_eval = _without_unused_reads(g_train, g_eval)
            dropout_fix: set[int] = set()
            sdpa_fix: dict[int, tuple[float, float]] = {}
            new_leaf = None
            nodes_t, nodes_e = list(g_train.nodes), list(g_eval.nodes)
            for i in range(max(len(nodes_t), len(nodes_e))):
                a = nodes_t[i] if i < len(nodes_t) else None
                b = nodes_e[i] if i < len(nodes_e) else None
                if a is not None and b is not None and _key(a) == _key(b):
                    continue
                if a is not None and b is not None and _dropout_only_diff(a, b):
                    dropout_fix.add(i)
                    continue
                if a is not None and b is not None and _sdpa_dropout_only_diff(a, b):
                    sdpa_fix[i] = (float(_sdpa_dropout(a)[0]), float(_sdpa_dropout(b)[0]))
                    continue
                owner = _common_owner(a, b, nodes_t[i - 1] if i > 0 else None)
                if not owner:
                    n = a if a is not None else b
                    where = (n.meta.get("stack_trace") or "").strip().splitlines()[-2:]
                    raise TraceError(
                        f"{type(model).__name__}'s own forward behaves differently in train and eval mode "
                        f"(node {n.name}: {n.format_node()})\n  at {' '.join(s.strip() for s in where)}\n"
                        f"  remedy: move that code into a submodule, or trace the model in the mode you "
                        f"will use it in with torch.fx directly")
                if owner in leaves:
                    raise TraceError(f"module {owner!r} behaves differently in train and eval mode even as a leaf "
                                     f"(node {(a or b).name}); trace it in the mode you will use")
                new_leaf = owner
                break
            if new_leaf is None:
                break
            leaves.add(new_leaf)
            info.auto_leaves.append(new_leaf)
            info.retraces = attempt + 1
        else:  # pragma: no cover - needs >64 mode-dependent modules
            raise TraceError(f"{type(model).__name__}: gave up after {_MAX_RETRACES} retraces")
    finally:
        _set_modes(model, modes)
    for k, v in constants.items():  # GraphModule copies them from the root as buffers
        model.__dict__[k] = v
    try:
        gm = fx.GraphModule(model, g_train, class_name=type(model).__name__)
    finally:
        for k in constants:
            del model.__dict__[k]
    info.mode_dropouts = _replace_mode_dropouts(gm, dropout_fix) + _mode_attention_dropouts(gm, sdpa_fix)
    written, kept = write_out_multihead_attention(gm)
    info.written_out = [f"{n}: {what}" for n, what in written]
    info.untraceable_leaves += [f"{n} (MultiheadAttention): {why}" for n, why in kept.items()]
    # the shared submodules keep their own flags (``modes``, restored above); new containers copy the model's
    for name, m in gm.named_modules():
        m.training = modes.get(name, model.training)
    set_trace_info(gm, info)
    if example_inputs is not None:
        _check_against_eager(model, gm, example_inputs, concrete_args)
    return gm


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    """Switch PyTorch's fused transformer fast path (eval mode without grad) on or off for a while."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _as_tuple(x: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


@contextlib.contextmanager
def _tensors_kept(model: nn.Module, root: bool = True) -> Iterator[None]:
    """Put back every buffer and tensor attribute a run or a trace of ``model`` replaced, and drop the
    tensors and proxies it added (caches filled by ``forward``: ConViT's GPSA keeps the relative
    positions of the last token count in a buffer; traced, a proxy), so tracing leaves the user's model
    as it was and a later trace of it takes the same paths. ``root=False`` leaves the root module
    alone (a trace's own constants live there until ``_trace_once`` takes them off)."""
    def cached(v: Any) -> bool:
        return v is None or isinstance(v, (torch.Tensor, fx.Proxy))

    saved = [(m, dict(m._buffers), {k: v for k, v in m.__dict__.items() if cached(v)})
             for m in model.modules() if root or m is not model]
    try:
        yield
    finally:
        for m, buffers, attrs in saved:
            for k in list(m._buffers):
                if k in buffers:
                    m._buffers[k] = buffers[k]
                else:
                    del m._buffers[k]
            for k, v in list(m.__dict__.items()):
                if k in attrs:
                    m.__dict__[k] = attrs[k]
                elif cached(v) and v is not None:
                    del m.__dict__[k]


def _check_against_eager(model: nn.Module, gm: fx.GraphModule, example_inputs: Any,
                         concrete_args: dict[str, Any] | None = None) -> None:
    inputs = _as_tuple(example_inputs)
    # the trace is specialized to the fixed arguments: the eager model gets them too (fx placeholders aside)
    fixed = {k: v for k, v in (concrete_args or {}).items() if not isinstance(v, fx._symbolic_trace.PHBase)}
    with eval_mode(model), eval_mode(gm), torch.no_grad(), example_run(type(model).__name__, inputs), \
            _mha_fastpath(False), _tensors_kept(model):  # the general path nn.TransformerEncoderLayer takes with grad
        ref = model(*inputs, **fixed)
    with eval_mode(gm), torch.no_grad():
        try:  # the run records node shapes: a topology on inputs of these shapes then needs no run
            out = run_recording_shapes(gm, inputs)
        except Exception as exc:  # the eager model ran: the trace is what fails
            line = str(exc).strip().splitlines()
            first = f"{type(exc).__name__}: {line[0] if line else ''}"
            unfed = _unfed_placeholders(model, gm, len(inputs), set(fixed))
            if unfed:
                raise TraceError(_unfed_message(type(model).__name__, first, unfed)) from exc
            raise TraceError(f"traced {type(model).__name__} fails on the example inputs the eager model runs on "
                             f"({first}); the trace froze a value that "
                             f"differs at run time. Make the module that computes it a leaf (leaf_modules=[...])"
                             ) from exc
    if outputs_match(ref, out):
        return
    overflow = overflow_error(type(model).__name__, model, ref, out)
    if overflow is not None:
        raise overflow
    raise TraceError(f"traced {type(model).__name__} does not reproduce the eager model's outputs on the "
                     f"example inputs; the model has input-dependent control flow that tracing froze")


def _unfed_placeholders(model: nn.Module, gm: fx.GraphModule, n_inputs: int, fixed: set[str]
                        ) -> dict[str, Any]:
    """The traced module's inputs after the first ``n_inputs`` (``forward``'s parameter name: default),
    those in ``fixed`` (concrete values) aside: parameters the example inputs did not supply but the
    trace took as inputs (a proxy, never ``None``, so ``is None`` tests took the branch for a given
    value). fx names the placeholder of a ``concrete_args`` entry ``<name>_1``: the parameter's name
    is given."""
    params = {p.name for p in _forward_parameters(model)}
    unfed: dict[str, Any] = {}
    for n in [n for n in gm.graph.nodes if n.op == "placeholder"][n_inputs:]:
        name = str(n.target)
        name = name if name in params or name.rsplit("_", 1)[0] not in params else name.rsplit("_", 1)[0]
        if name not in fixed:
            unfed[name] = n.args[0] if n.args else None
    return unfed


def _unfed_message(cls: str, first: str, unfed: dict[str, Any]) -> str:
    """The one-line error for a traced module that fails because of ``unfed`` inputs."""
    names = ", ".join(f"{k!r}" for k in unfed)
    fix = ", ".join(f"{k!r}: {v!r}" for k, v in unfed.items())
    return (f"traced {cls} fails on the example inputs the eager model runs on ({first}): forward's "
            f"parameter(s) {names} got no example input but were traced as inputs, so code that tests them "
            f"(`is None`) took the branch for a given value; remedy: fix them with concrete_args={{{fix}}}, "
            f"or supply them in example_inputs")
