"""Property tests for tracing and the topology view on random small DAG models.

A hypothesis strategy draws a *description* of a model (``tests/topology_specs.py``: plain
layers, residual blocks, concatenations and non-residual two-branch adds, with one level of
nested blocks); ``tests/topology_models.py`` builds it out of real ``torch.nn`` layers and
``tests/topology_checks.py`` compares ``netsurgeon.trace`` / ``netsurgeon.topology`` with it:
equivalence in eval and train mode, ``kind_counts()``, the merge blocks found, and the DOT and
GraphML exports. The generated merges are never a tie between residual and other sums (see
``tests/topology_checks.py``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netsurgeon

from topology_checks import check_blocks, check_counts, check_equivalence, check_exports
from topology_models import _one_thread  # noqa: F401  (module-scoped autouse fixture)
from topology_models import build
from topology_specs import (ACTS, ADD_STYLES, BranchAdd, Concat, Item, Layer, ModelSpec, Residual, cout_of,
                            is_heavy, seq_cout)

# ======================================================================== strategies

WIDTHS = st.integers(4, 8)
ACT_OR_NONE = st.none() | st.sampled_from(ACTS)


@st.composite
def layers(draw, cin: int, cout: int | None = None) -> Layer:
    return Layer(draw(st.sampled_from(("conv3", "conv1", "linear"))), cin,
                 draw(WIDTHS) if cout is None else cout, draw(st.booleans()), draw(ACT_OR_NONE))


@st.composite
def seqs(draw, cin: int, depth: int, cout: int | None = None, heavy: bool = False, n_max: int = 3) -> tuple:
    """1..n_max items from ``cin`` channels; ends at ``cout`` when given, holds at least one
    plain layer, and is :func:`is_heavy` when asked. Nested blocks only while ``depth > 0``."""
    n = draw(st.integers(1, n_max))
    items: list[Item] = []
    c = cin
    for _ in range(n):
        if depth > 0 and draw(st.integers(0, 3)) == 0:
            it, c = draw(blocks(c, depth - 1))
        else:
            it = draw(layers(c))
            c = it.cout
        items.append(it)
    if (cout is not None and c != cout) or not any(isinstance(it, Layer) for it in items):
        items.append(draw(layers(c, cout)))
    if heavy and not is_heavy(tuple(items)):  # a single bare layer: add an activated 1x1 conv
        c = seq_cout(tuple(items), cin)
        items.append(Layer("conv1", c, c, draw(st.booleans()), draw(st.sampled_from(ACTS))))
    return tuple(items)


@st.composite
def blocks(draw, cin: int, depth: int):
    """A merge block from ``cin`` channels (branches nested up to ``depth``), and its output channels."""
    kind = draw(st.sampled_from(("residual", "branch_add", "concat")))
    marker = draw(st.booleans())
    if kind == "concat":
        n = draw(st.integers(2, 3))
        kinds = draw(st.lists(st.sampled_from(("identity", "pool", "layers", "layers")), min_size=n, max_size=n)
                     .filter(lambda ks: ks.count("identity") <= 1 and ks.count("pool") <= 1))
        branches = tuple((k, draw(seqs(cin, depth, n_max=2)) if k == "layers" else ()) for k in kinds)
        b = Concat(branches, marker)
        return b, cout_of(b, cin)
    post, style = draw(ACT_OR_NONE), draw(st.sampled_from(ADD_STYLES))
    if kind == "residual":
        projection = draw(st.booleans())
        cout = draw(WIDTHS) if projection else cin
        branch = draw(seqs(cin, depth, cout, heavy=projection))
        return Residual(branch, projection, draw(st.booleans()), draw(st.booleans()), style, post, marker), cout
    cout = draw(WIDTHS)
    return BranchAdd(draw(seqs(cin, depth, cout, heavy=True)), draw(seqs(cin, depth, cout, heavy=True)),
                     style, post, marker), cout


@st.composite
def model_specs(draw, max_items: int = 4, depth: int = 1) -> ModelSpec:
    in_ch = draw(WIDTHS)
    n = draw(st.integers(1, max_items))
    items: list[Item] = []
    c = in_ch
    for _ in range(n):
        if c > 8 or draw(st.integers(0, 2)) == 0:  # plain layer; squeezes wide concat outputs
            it = draw(layers(c))
            c = it.cout
        else:
            it, c = draw(blocks(c, depth))
        items.append(it)
    head = draw(st.none() | st.tuples(st.integers(3, 6), ACT_OR_NONE))
    return ModelSpec(in_ch, tuple(items), head)


# ======================================================================== properties

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**16)


@SETTINGS
@given(spec=model_specs(), seed=SEEDS)
def test_trace_matches_eager(spec: ModelSpec, seed: int) -> None:
    model, x = build(spec, seed)
    check_equivalence(model, x)


@SETTINGS
@given(spec=model_specs(), seed=SEEDS)
def test_kind_counts_match_generated(spec: ModelSpec, seed: int) -> None:
    model, x = build(spec, seed)
    check_counts(spec, netsurgeon.topology(model))
    check_counts(spec, netsurgeon.topology(netsurgeon.trace(model), x))  # from a GraphModule, with shapes


@SETTINGS
@given(spec=model_specs(), seed=SEEDS)
def test_merge_blocks_match_generated(spec: ModelSpec, seed: int) -> None:
    model, _ = build(spec, seed)
    check_blocks(spec, netsurgeon.topology(model))


@SETTINGS
@given(spec=model_specs(), seed=SEEDS)
def test_exports_hold_every_node(spec: ModelSpec, seed: int) -> None:
    model, x = build(spec, seed)
    topo = netsurgeon.topology(model, x)
    with tempfile.TemporaryDirectory() as d:  # tmp_path is function-scoped: not shared across examples
        check_exports(topo, Path(d))
