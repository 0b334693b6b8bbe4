"""Which zoo models does a change to attention reading or tracing touch? Traces every model of the broad zoo
and prints, per model, the constructs that attention_shaping, orthogonal_init and the tracer treat specially:
a softmax module, talking heads, values on the left (``v @ Aᵀ``), a tensor scale on the scores, a layer fed by
constants only, buffers traced as nodes, a torch factory called with a traced size. Used to choose which
models ``zoo_coverage.py --models`` reruns after such a change (docs/transformers.md, "The pipeline on the
broad zoo"); trace only, a few minutes.

Usage:
    python benchmarks/zoo_audit.py                  # every model
    python benchmarks/zoo_audit.py cait_xxs24_224   # some
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netsurgeon  # noqa: E402
from harness.broad_zoo import all_models, build  # noqa: E402
from netsurgeon.graph.running import TORCH_FACTORIES  # noqa: E402
from netsurgeon.graph.state import trace_info  # noqa: E402
from netsurgeon.passes.attention import find_attention  # noqa: E402
from netsurgeon.passes.init import constant_layers  # noqa: E402

_FACTORIES = {getattr(torch, n) for n in TORCH_FACTORIES if hasattr(torch, n)}


def flags(gm: fx.GraphModule) -> list[str]:
    """The special constructs in a traced model."""
    info = trace_info(gm)
    sites = find_attention(gm)[0]
    out = []
    if info.buffers_as_nodes:
        out.append("buffers_as_nodes")
    const = constant_layers(gm)
    if const:
        out.append(f"constant_layers={len(const)}")
    if any(s.value_left for s in sites):
        out.append("value_left")
    if any(s.logit_mix is not None or s.weight_mix is not None for s in sites):
        out.append("talking_heads")
    if any(isinstance(f, fx.Node) for s in sites for _, f in s.factors):
        out.append("tensor_scale")
    if any(n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.Softmax for n in gm.graph.nodes):
        out.append("softmax_module")
    factories = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _FACTORIES]
    if factories:
        out.append(f"traced_factories={len(factories)}")
    return out


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    names = set(argv if argv is not None else sys.argv[1:])
    for m in all_models():
        if names and str(m) not in names:
            continue
        try:
            model, x = build(m)
            print(m, " ".join(flags(netsurgeon.trace(model, x))) or "-", flush=True)
        except Exception as e:  # a model that does not build or trace here: shown, not fatal
            print(m, f"ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
