"""The broad zoo (issue 16): which real architectures each netsurgeon step handles.

The timm models are chosen by a rule, not by hand: for every timm model module, the
model with the fewest parameters, and, where the module registers a second family
(the letters before the first digit or underscore of the name), the smallest model of
the other family with the fewest parameters too. Parameters are counted on the meta
device, so the choice costs about a minute and downloads nothing. Added to them are
five torchvision models and three Hugging Face models built from tiny configurations.

Each model goes through six steps, every one independent of the others' outcome:
``trace`` (train and eval match eager), ``fold`` (``strip_bn`` folds and eval matches),
``analyze``, the DKS/TAT ``pipeline`` (with ``remove_skips`` and with ``normalize_sums``,
conditions then verified from the result), ``farkas`` and ``identity_residual``. A step
ends ``ok``, ``refused`` (a ``NetsurgeonError``: its first line is the cause) or
``crash`` (any other exception: a bug by the issue's definition) or ``wrong`` (it completed and its
check failed: traced or folded output off, conditions not met).
"""
from __future__ import annotations

import json
import re
import time
import traceback
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.errors import NetsurgeonError, PassError

SELECTION_FILE = Path(__file__).with_name("broad_zoo_models.json")
STEPS = ("trace", "fold", "analyze", "pipeline_remove_skips", "pipeline_normalize_sums", "farkas",
         "identity_residual")
TORCHVISION = ("resnet18", "mobilenet_v3_small", "convnext_tiny", "swin_t", "efficientnet_b0")
HUGGING_FACE = ("bert", "gpt2", "llama")
SMALL_SIZE = 64  # CNNs that accept any input size run at this size (the analysis needs no more)
# then sizes that patch sizes 14 and 16 divide (deepseek_vit's 14 px patches at its own 546 px took 19 s
# per forward pass); a model that runs on none of them runs at its own size
SMALL_SIZES = (SMALL_SIZE, 112)


@dataclass(frozen=True)
class ZooModel:
    source: str  # "timm", "torchvision" or "hf"
    name: str
    params: int = 0
    size: int = 224  # image side (timm, torchvision) or sequence length (hf)
    fixed_size: bool = False

    def __str__(self) -> str:
        return self.name if self.source == "timm" else f"{self.source}:{self.name}"


@dataclass
class StepResult:
    status: str  # "ok", "refused", "crash" (not a NetsurgeonError), "wrong" (its check failed), "skipped",
    # "timeout" (the model's process gave no result in time: zoo_coverage.py)
    cause: str = ""
    seconds: float = 0.0


@dataclass
class ModelResult:
    model: str
    has_attention: bool = False
    steps: dict[str, StepResult] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# the rule that picks the timm models

def _family(name: str) -> str:
    return re.match(r"[a-z]+", name).group(0)


def _meta_params(name: str) -> int | None:
    import timm
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name)
    except Exception:  # a model that cannot even be built on meta is not a candidate
        return None
    return sum(p.numel() for p in model.parameters())


def select_timm(log: Callable[[str], None] = lambda s: None) -> list[ZooModel]:
    """Apply the rule (module docstring) to the installed timm; about a minute."""
    import timm
    from timm.models import _registry
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in timm.list_models():
        by_module[_registry._model_to_module[name]].append(name)
    chosen = []
    for module in sorted(by_module):
        counted = [(n, _meta_params(n)) for n in sorted(by_module[module])]
        counted = sorted(((p, n) for n, p in counted if p is not None))
        if not counted:
            log(f"module {module}: no model builds")
            continue
        first = counted[0][1]
        picks = [counted[0]]
        others = [(p, n) for p, n in counted if _family(n) != _family(first)]
        if others:
            picks.append(others[0])
        for p, n in picks:
            cfg = timm.get_pretrained_cfg(n)
            size = int(cfg.input_size[-1]) if cfg is not None else 224
            fixed = bool(getattr(cfg, "fixed_input_size", False)) if cfg is not None else True
            chosen.append(ZooModel("timm", n, p, size, fixed))
    return chosen


def load_selection() -> list[ZooModel]:
    data = json.loads(SELECTION_FILE.read_text())
    return [ZooModel(**m) for m in data["models"]]


def all_models() -> list[ZooModel]:
    return (load_selection() + [ZooModel("torchvision", n) for n in TORCHVISION]
            + [ZooModel("hf", n, size=16) for n in HUGGING_FACE])


# ---------------------------------------------------------------------------------------------------------------
# building models and inputs

def _hf_model(name: str) -> nn.Module:
    import transformers as tf
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=256, max_position_embeddings=64)
    if name == "bert":
        return tf.BertModel(tf.BertConfig(**small))
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=2))
    raise ValueError(name)


def build(m: ZooModel) -> tuple[nn.Module, torch.Tensor]:
    """The model (seed 0, random weights, batch norm statistics randomized) and its input (seed 1)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if m.source == "timm":
            model, side = _timm_model(m)
        elif m.source == "torchvision":
            import torchvision
            model = torchvision.models.get_model(m.name)
            side = 224
        else:
            model = _hf_model(m.name)
        if m.source != "timm":
            side = 224
    _randomize_norms(model)
    model.eval()
    g = torch.Generator().manual_seed(1)
    if m.source == "hf":
        return model, torch.randint(0, 256, (2, m.size), generator=g)
    size = side if m.source == "timm" else 224
    if m.source == "torchvision" or not m.fixed_size:
        for side in SMALL_SIZES:
            small = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
            try:
                with torch.no_grad():
                    model(small)
                return model, small
            except Exception:  # too small for this model, or not a multiple of its patch size: the next
                continue
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _timm_model(m: ZooModel) -> tuple[nn.Module, int]:
    """A fixed-size timm model is built for a smaller image where its constructor takes ``img_size``
    (the first of 64, 96, 128 that runs), else at its own size."""
    import timm
    if m.fixed_size:
        for side in (64, 96, 128):
            try:
                torch.manual_seed(0)
                model = timm.create_model(m.name, img_size=side)
                with torch.no_grad():
                    model.eval()(torch.zeros(1, 3, side, side))
                return model, side
            except Exception:
                continue
    torch.manual_seed(0)
    return timm.create_model(m.name), m.size


def _randomize_norms(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(1 + 0.2 * torch.rand(mod.running_var.shape, generator=g))


def has_attention(gm: torch.fx.GraphModule) -> bool:
    """Self-attention anywhere: a softmax node, scaled_dot_product_attention, or a module kept as a leaf
    that is (or holds) an attention module (the next issue's subject)."""
    for node in gm.graph.nodes:
        target = node.target
        name = getattr(target, "__name__", str(target))
        if "softmax" in name.lower() or "scaled_dot_product_attention" in name:
            return True
        if node.op == "call_module" and modules_have_attention(gm.get_submodule(node.target)):
            return True  # an attention module kept as a leaf, or a leaf holding one (NestLevel)
    return False


def modules_have_attention(model: nn.Module) -> bool:
    """Whether ``model`` or a module inside it is softmax, ``nn.MultiheadAttention``, or of a class
    named for attention. Used for leaves, and for models that do not trace (whose graph is unknown)."""
    return any(isinstance(m, (nn.Softmax, nn.MultiheadAttention)) or "attention" in type(m).__name__.lower()
               for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# the steps

def max_rel(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor):
        scale = max(1.0, float(a.detach().abs().max()))
        return float((a - b).detach().abs().max()) / scale
    if isinstance(a, dict) or hasattr(a, "keys"):
        return max((max_rel(a[k], b[k]) for k in a.keys()), default=0.0)
    if isinstance(a, (tuple, list)):
        return max((max_rel(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0


def train_eval_outputs(model: nn.Module, gm: nn.Module, x: Any) -> dict[bool, tuple[Any, Any]]:
    """``{train: (eager output, traced output)}`` for train and eval mode, each call after
    ``torch.manual_seed(3)`` (so dropout draws the same masks)."""
    out = {}
    for mode in (True, False):
        model.train(mode)
        gm.train(mode)
        torch.manual_seed(3)
        ref = model(x)
        torch.manual_seed(3)
        out[mode] = (ref, gm(x))
    return out


def _trace(model, x, gm_holder):
    gm = netsurgeon.trace(model, x)
    for mode, (ref, got) in train_eval_outputs(model, gm, x).items():
        err = max_rel(ref, got)
        if not err <= 1e-5:
            raise VerificationError(f"traced output differs from eager by {err:.2e} (train={mode})")
    model.eval()
    gm_holder.append(gm.eval())


def _fold(model, x):
    gm = netsurgeon.transform(model.eval(), ["strip_bn"], example_inputs=x).eval()
    with torch.no_grad():
        err = max_rel(model(x), gm(x))
    if not err <= 1e-4:
        raise VerificationError(f"folded output differs from eager by {err:.2e}")


def _analyze(model, x):
    netsurgeon.analyze(model, x)


def pipeline_passes(middle: str, attention: bool = False) -> list:
    """The shaping pipeline; with self-attention, also the issue-17 steps: LayerNorm/RMSNorm removed
    and every self-attention block shaped (E-SPA), after the orthogonal init it must not undo."""
    if attention:
        return [("strip_bn", {"mode": "remove"}), "remove_norms", middle, "maxpool_to_avgpool", "input_norm",
                ("orthogonal_init", {"seed": 0}), "attention_shaping", "tat"]
    return [("strip_bn", {"mode": "remove"}), middle, "maxpool_to_avgpool", "input_norm",
            ("orthogonal_init", {"seed": 0}), "tat"]


class VerificationError(AssertionError):
    """A completed step whose result fails its check (a wrong result, not a refusal)."""


def verify_shaping(gm: torch.fx.GraphModule, x: torch.Tensor) -> None:
    """The conditions, recomputed from the result. Every activation off the gate paths (which keep
    their form by design) is reshaped; for ``tat``: Q(1) = Q'(1) = C'(1) = 1 (smooth) and, with the
    leaky-ReLU family, the network C(0) = eta; for ``dks``: Q(1) = 1, C(0) = 0 and C'(1) = xi."""
    from netsurgeon.analysis.targets import IdealGraph, gate_nodes
    from netsurgeon.graph import Topology
    from netsurgeon.kernels import LocalMaps, get_activation
    from netsurgeon.kernels.transforms import transformed
    from netsurgeon.ops import OpKind
    topo = Topology(gm, x)
    gates = gate_nodes(topo)
    maps, names = {}, {}
    composites = [n for n in topo.nodes_of(OpKind.NORM)
                  if topo.info(n).norm is not None and topo.info(n).norm.activation is not None]
    for name in topo.nodes_of(OpKind.ACTIVATION) + composites:  # a norm+act composite's activation too
        if name in gates or not topo.graph.nodes[name]["signal"]:  # a gate's, or on a constant path (pos bias)
            continue
        info = topo.info(name)
        spec = info.activation if info.activation is not None else info.norm.activation
        if spec.transform is None:
            raise VerificationError(f"activation {name} ({spec.name}) was not reshaped")
        maps[name] = LocalMaps(transformed(get_activation(spec.name, **dict(spec.params)), *spec.transform))
        names[name] = spec.name
    if "tat" in _passes_run(gm):
        der = netsurgeon.derivation(gm, "tat")
        smooth = {n: m for n, m in maps.items() if names[n] != "leaky_relu"}
        for name, m in smooth.items():
            got = (m.q1, m.q_slope_1(), m.c_slope_1())
            if max(abs(v - 1.0) for v in got) > 1e-4:
                raise VerificationError(f"{name}: (Q(1), Q'(1), C'(1)) = {got}")
        if "negative_slope" in der:
            ideal = IdealGraph(topo, "rule", _product_maps(gm, der))
            c0 = ideal.network_c0(lambda n, c: float(maps[n].c_map(c)))
            want = der.get("eta_reached", der["eta"])  # eta unreachable: the closest value, a = 0
            if abs(c0 - want) > 1e-3:
                raise VerificationError(f"network C(0) = {c0:.4f}, target {want:.4f} (eta = {der['eta']})")
    else:
        der = netsurgeon.derivation(gm, "dks")
        for name, m in maps.items():
            got = (m.q1, m.c0(), m.c_slope_1())
            want = (1.0, 0.0, der["xi"])
            if max(abs(a - b) for a, b in zip(got, want)) > 1e-4:
                raise VerificationError(f"{name}: (Q(1), C(0), C'(1)) = {got}, want {want}")
    out = gm(x)
    if not all(torch.isfinite(t).all() for t in (out if isinstance(out, (tuple, list)) else [out])
               if isinstance(t, torch.Tensor)):
        raise VerificationError("non-finite output after the pipeline")


def verify_attention(gm: torch.fx.GraphModule, x: Any) -> None:
    """Every self-attention is shaped: each ShapedAttention gets an exactly zero query on ``x`` (or has a
    zero logit gain) and the softmax of its bias, its pattern's shape, carries the schedule's token kernel to
    the next one up to the row scales that tat refits (A Σ_{l-1} Aᵀ = Σ_l with A's rows renormalized)."""
    import numpy as np
    from netsurgeon.kernels import attention as pat
    from netsurgeon.layers import ShapedAttention
    from netsurgeon.passes.attention import find_attention
    record = next(p for p in netsurgeon.report(gm).passes if p.name == "attention_shaping")
    opts = record.options
    # every attention site left in the graph is one the pass reported as skipped (cross-attention); a site it
    # did not see (DaViT's nn.Softmax windows beside its shaped channel attention) would pass the checks below
    skipped = {s.node for s in record.skipped}
    left = [s.node.name for s in find_attention(gm)[0] if s.node.name not in skipped]
    if left:
        raise VerificationError(f"self-attention {left[0]} was not shaped" +
                                (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))
    mods = {name: m for name, m in gm.named_modules() if isinstance(m, ShapedAttention)}
    if not mods:  # a softmax that is not self-attention (split attention's radix softmax): nothing to shape
        return
    queries: dict[str, torch.Tensor] = {}

    class Spy(torch.fx.Interpreter):
        def call_module(self, target, args, kwargs):
            if target in mods:
                queries[target] = args[0]
            return super().call_module(target, args, kwargs)

    with torch.no_grad():
        Spy(gm).run(*(x if isinstance(x, tuple) else (x,)))
    for l, (name, m) in enumerate(mods.items(), start=1):
        if m.logit_gain is not None:  # the block starts from a zero logit gain (its query has no rows of its own)
            if float(m.logit_gain.detach().abs().max()) != 0.0:
                raise VerificationError(f"{name}: its logit gain is not zero at initialization")
        elif name not in queries or torch.count_nonzero(queries[name]) != 0:
            raise VerificationError(f"{name}: its query is not zero at initialization")
        t = m.length
        rhos = pat.schedule(opts["mode"], t, len(mods), opts["final_cosine"])
        p = m.init_matrix()[0].numpy()
        p = p / p.sum(axis=1, keepdims=True)
        a = pat.transition(pat.family_kernel(opts["mode"], t, rhos[l - 1]), pat.family_kernel(opts["mode"], t, rhos[l]),
                           m.causal)
        err = float(np.abs(p - a / a.sum(axis=1, keepdims=True)).max())  # the pattern, before the row scales
        if err > 1e-4:
            raise VerificationError(f"{name}: its pattern misses the schedule's by {err:.2e}")


def _passes_run(gm: torch.fx.GraphModule) -> list[str]:
    return [p.name for p in netsurgeon.report(gm).passes]


def _product_maps(gm, der) -> dict:
    from netsurgeon.analysis.targets import ProductMap
    return {k: ProductMap(**{f: tuple(v) if isinstance(v, list) else v for f, v in d.items()})
            for k, d in der.get("product_maps", {}).items()}


def _pipeline(middle):
    def run(model, x):
        attention = has_attention(netsurgeon.trace(model, x))
        passes = pipeline_passes(middle, attention)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                gm = netsurgeon.transform(model, passes, example_inputs=x)
            except NetsurgeonError as e:
                if "cannot take a TAT transform" not in str(e) and "TAT cannot shape this activation" not in str(e):
                    raise
                # TAT needs C''(1); activations with kinks (hard-swish) cannot have it, and no TAT transform
                # exists for some (StarReLU's relu(x)²): DKS instead, as the refusal advises
                gm = netsurgeon.transform(model, passes[:-1] + ["dks"], example_inputs=x)
        verify_shaping(gm.eval(), x)
        if attention:
            verify_attention(gm.eval(), x)
    return run


def _single(name):
    def run(model, x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = netsurgeon.transform(model, [name], example_inputs=x)
        out = gm.eval()(x)
        if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
            raise VerificationError(f"non-finite output after {name}")
    return run


STEP_FUNCS = {"fold": _fold, "analyze": _analyze, "pipeline_remove_skips": _pipeline("remove_skips"),
              "pipeline_normalize_sums": _pipeline("normalize_sums"), "farkas": _single("farkas"),
              "identity_residual": _single("identity_residual")}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:400]


def _run_step(fn, *args) -> StepResult:
    t = time.perf_counter()
    try:
        with torch.no_grad() if fn is _analyze else _Null():
            fn(*args)
    except NetsurgeonError as e:
        cause = e.__cause__
        if isinstance(e, PassError) and cause is not None and not isinstance(cause, NetsurgeonError):
            # a pass wraps any exception in PassError: one that is not a NetsurgeonError inside is a crash
            where = traceback.extract_tb(cause.__traceback__)[-1]
            return StepResult("crash", f"{_first_line(e)} ({Path(where.filename).name}:{where.lineno})",
                              time.perf_counter() - t)
        return StepResult("refused", f"{type(e).__name__}: {_first_line(e)}", time.perf_counter() - t)
    except VerificationError as e:  # the step completed but its result is wrong: a bug, shown apart
        return StepResult("wrong", str(e), time.perf_counter() - t)
    except Exception as e:  # a crash: kept with its location
        where = traceback.extract_tb(e.__traceback__)[-1]
        return StepResult("crash", f"{type(e).__name__}: {_first_line(e)} ({Path(where.filename).name}:"
                                   f"{where.lineno})", time.perf_counter() - t)
    return StepResult("ok", "", time.perf_counter() - t)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_model(m: ZooModel, steps: tuple[str, ...] = STEPS,
              report: Callable[[ModelResult], None] = lambda r: None) -> ModelResult:
    """Every step on one model; a step's failure does not stop the others. ``report`` gets the
    result so far after each step (a caller with a timeout keeps the steps that finished)."""
    result = ModelResult(str(m))
    try:
        model, x = build(m)
    except Exception as e:
        result.steps = {s: StepResult("crash", f"build: {type(e).__name__}: {_first_line(e)}") for s in steps}
        return result
    holder: list = []
    result.steps["trace"] = _run_step(_trace, model, x, holder)
    # a model that does not trace is judged by its modules (the denominators of docs/coverage.md)
    result.has_attention = has_attention(holder[0]) if holder else modules_have_attention(model)
    report(result)
    for s in steps:
        if s == "trace":
            continue
        if result.steps["trace"].status != "ok":
            result.steps[s] = StepResult("skipped", "no trace")
            continue
        if s == "pipeline_normalize_sums" and result.steps.get("pipeline_remove_skips", StepResult("")).status == "ok":
            result.steps[s] = StepResult("skipped", "the remove_skips pipeline completed")
            continue
        import copy
        result.steps[s] = _run_step(STEP_FUNCS[s], copy.deepcopy(model), x)
        report(result)
    return result


def result_to_json(r: ModelResult) -> dict:
    return {"model": r.model, "has_attention": r.has_attention, "steps": {k: asdict(v) for k, v in r.steps.items()}}
