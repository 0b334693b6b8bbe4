"""Property tests for tracing and the topology view on random small DAG models.

A hypothesis strategy draws a *description* of a model: a sequence of items, each a
plain layer (Conv2d 3x3 / 1x1 or Linear over channels, optional BatchNorm2d and
activation), a residual block (k layers in the branch, identity or 1x1-projection
shortcut), a concat block (2-3 branches: layers, max-pool or the input itself,
``torch.cat`` on channels) or a two-branch add that is not residual. Branches may
hold one level of nested blocks. :func:`build` turns the description into an
``nn.Module`` of real ``torch.nn`` layers whose ``forward`` executes it. The
description knows its convs, linears, activations, norms, adds, concats and residual
blocks, and which weight layers sit on each branch, so the tests compare
``netsurgeon.trace`` / ``netsurgeon.topology`` with it:

1. the traced GraphModule reproduces the eager model in eval mode and in train mode
   (batch statistics and running-stat updates included);
2. ``kind_counts()`` equals the generated counts;
3. ``blocks`` / ``residual_blocks()`` report exactly the generated merges: kind,
   entry, shortcut kind, shortcut nodes and branch weight layers (node names, in order);
4. the DOT and GraphML exports hold every node and edge.

Residual versus other merges is decided by path weight (``netsurgeon/graph/blocks.py``):
a sum is residual when its lightest operand path has no activation and at most one
weight layer. So the generator builds projection-residual branches that are strictly
heavier than a conv(+BN) shortcut, and non-residual two-branch adds whose branches
both hold an activation or two weight layers: the expected answer is never a tie.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netsurgeon
from netsurgeon.ops import OpKind


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convs on 2 busy cores spend ~20 ms each in OpenMP hand-offs; one thread
    makes them ~100x faster. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ======================================================================== descriptions

MODULE_ACTS = ("relu", "relu_inplace", "tanh", "gelu")
FUNCTION_ACTS = ("F.relu", "torch.tanh", "method.relu")
ACTS = MODULE_ACTS + FUNCTION_ACTS
ADD_STYLES = ("+", "torch.add", "method.add")
WIDTHS = st.integers(4, 8)
WEIGHT_KINDS = (OpKind.CONV, OpKind.LINEAR)


@dataclass(frozen=True)
class Layer:
    """One weight layer, optionally followed by BatchNorm2d and an activation."""

    op: str  # "conv3" (3x3, pad 1), "conv1" (1x1) or "linear" (over channels, via permute)
    cin: int
    cout: int
    bn: bool = False
    act: str | None = None


@dataclass(frozen=True)
class Residual:
    branch: tuple  # of items
    projection: bool = False  # 1x1 conv shortcut (else identity)
    proj_bn: bool = False
    shortcut_first: bool = True  # operand order of the sum
    add_style: str = "+"
    post_act: str | None = None
    marker: bool = False  # nn.Identity at the block input: the block's entry


@dataclass(frozen=True)
class BranchAdd:
    """Two non-trivial parallel branches summed: not a residual block."""

    left: tuple
    right: tuple
    add_style: str = "+"
    post_act: str | None = None
    marker: bool = False


@dataclass(frozen=True)
class Concat:
    """``torch.cat`` on channels of 2-3 branches: ("identity", ()), ("pool", ()) or ("layers", items)."""

    branches: tuple
    marker: bool = False


Item = Union[Layer, Residual, BranchAdd, Concat]


@dataclass(frozen=True)
class ModelSpec:
    in_ch: int
    body: tuple  # of items
    head: tuple[int, str | None] | None = None  # pool + flatten + Linear(features) + activation


def cout_of(item: Item, cin: int) -> int:
    if isinstance(item, Layer):
        return item.cout
    if isinstance(item, Residual):
        return seq_cout(item.branch, cin)
    if isinstance(item, BranchAdd):
        return seq_cout(item.left, cin)
    return sum(cin if k != "layers" else seq_cout(ls, cin) for k, ls in item.branches)


def seq_cout(items: tuple, cin: int) -> int:
    for it in items:
        cin = cout_of(it, cin)
    return cin


def weights_of(items: tuple, prefix: str) -> list[str]:
    """Module paths of the weight layers of ``items`` (an nn.Sequential at ``prefix``), in execution order."""
    out: list[str] = []
    for j, it in enumerate(items):
        p = f"{prefix}.{j}"
        if isinstance(it, Layer):
            out.append(f"{p}.weight")
        elif isinstance(it, Residual):
            out += ([f"{p}.proj"] if it.projection else []) + weights_of(it.branch, f"{p}.branch")
        elif isinstance(it, BranchAdd):
            out += weights_of(it.left, f"{p}.left") + weights_of(it.right, f"{p}.right")
        else:
            for b, (_, ls) in enumerate(it.branches):
                out += weights_of(ls, f"{p}.branches.{b}")
    return out


def merges_of(items: tuple, prefix: str) -> list[tuple[str, Item]]:
    """(module path, spec) of every merge block, in the order their merge nodes execute."""
    out: list[tuple[str, Item]] = []
    for j, it in enumerate(items):
        p = f"{prefix}.{j}"
        if isinstance(it, Residual):
            out += merges_of(it.branch, f"{p}.branch") + [(p, it)]
        elif isinstance(it, BranchAdd):
            out += merges_of(it.left, f"{p}.left") + merges_of(it.right, f"{p}.right") + [(p, it)]
        elif isinstance(it, Concat):
            for b, (_, ls) in enumerate(it.branches):
                out += merges_of(ls, f"{p}.branches.{b}")
            out.append((p, it))
    return out


def counts_of(items: tuple) -> dict[str, int]:
    c = dict.fromkeys(("conv", "linear", "activation", "norm", "add", "concat"), 0)

    def add(d: dict[str, int]) -> None:
        for k, v in d.items():
            c[k] += v

    for it in items:
        if isinstance(it, Layer):
            c["conv" if it.op.startswith("conv") else "linear"] += 1
            c["norm"] += it.bn
            c["activation"] += it.act is not None
        elif isinstance(it, Residual):
            add(counts_of(it.branch))
            c["conv"] += it.projection
            c["norm"] += it.projection and it.proj_bn
            c["add"] += 1
            c["activation"] += it.post_act is not None
        elif isinstance(it, BranchAdd):
            add(counts_of(it.left))
            add(counts_of(it.right))
            c["add"] += 1
            c["activation"] += it.post_act is not None
        else:
            for _, ls in it.branches:
                add(counts_of(ls))
            c["concat"] += 1
    return c


def expected_counts(spec: ModelSpec) -> dict[str, int]:
    c = counts_of(spec.body)
    if spec.head is not None:
        c["linear"] += 1
        c["activation"] += spec.head[1] is not None
    return c


def is_heavy(items: tuple) -> bool:
    """Strictly heavier than a conv(+BN) shortcut: two weight layers or an activation."""
    c = counts_of(items)
    return c["conv"] + c["linear"] >= 2 or c["activation"] >= 1


# ======================================================================== strategies

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


# ======================================================================== building


class Act(nn.Module):
    """An activation slot: an nn activation module ``m``, a functional one, or nothing."""

    def __init__(self, name: str | None) -> None:
        super().__init__()
        self.fn = name if name in FUNCTION_ACTS else None
        self.m = {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "tanh": nn.Tanh(),
                  "gelu": nn.GELU()}.get(name) if name in MODULE_ACTS else None

    def forward(self, x):
        if self.m is not None:
            return self.m(x)
        if self.fn == "F.relu":
            return F.relu(x)
        if self.fn == "torch.tanh":
            return torch.tanh(x)
        if self.fn == "method.relu":
            return x.relu()
        return x


def do_add(style: str, a, b):
    if style == "+":
        return a + b
    if style == "torch.add":
        return torch.add(a, b)
    return a.add(b)


class LayerMod(nn.Module):
    def __init__(self, l: Layer) -> None:
        super().__init__()
        self.linear = l.op == "linear"
        self.weight = {"conv3": lambda: nn.Conv2d(l.cin, l.cout, 3, padding=1),
                       "conv1": lambda: nn.Conv2d(l.cin, l.cout, 1),
                       "linear": lambda: nn.Linear(l.cin, l.cout)}[l.op]()
        self.norm = nn.BatchNorm2d(l.cout) if l.bn else None
        self.act = Act(l.act)

    def forward(self, x):
        x = self.weight(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.linear else self.weight(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x)


class Block(nn.Module):
    def __init__(self, marker: bool) -> None:
        super().__init__()
        self.inp = nn.Identity() if marker else None

    def enter(self, x):
        return self.inp(x) if self.inp is not None else x


class ResidualBlock(Block):
    def __init__(self, b: Residual, cin: int) -> None:
        super().__init__(b.marker)
        self.spec = b
        self.branch = make_seq(b.branch, cin)
        if b.projection:
            cout = seq_cout(b.branch, cin)
            self.proj = nn.Conv2d(cin, cout, 1)
            self.proj_bn = nn.BatchNorm2d(cout) if b.proj_bn else None
        self.post = Act(b.post_act)

    def forward(self, x):
        x = self.enter(x)
        sc = x
        if self.spec.projection:
            sc = self.proj(x)
            if self.proj_bn is not None:
                sc = self.proj_bn(sc)
        h = self.branch(x)
        s = self.spec
        return self.post(do_add(s.add_style, sc, h) if s.shortcut_first else do_add(s.add_style, h, sc))


class BranchAddBlock(Block):
    def __init__(self, b: BranchAdd, cin: int) -> None:
        super().__init__(b.marker)
        self.spec = b
        self.left, self.right = make_seq(b.left, cin), make_seq(b.right, cin)
        self.post = Act(b.post_act)

    def forward(self, x):
        x = self.enter(x)
        return self.post(do_add(self.spec.add_style, self.left(x), self.right(x)))


class ConcatBlock(Block):
    def __init__(self, b: Concat, cin: int) -> None:
        super().__init__(b.marker)
        self.kinds = [k for k, _ in b.branches]
        self.branches = nn.ModuleList(
            [nn.Identity() if k == "identity" else nn.MaxPool2d(3, 1, 1) if k == "pool" else make_seq(ls, cin)
             for k, ls in b.branches])

    def forward(self, x):
        x = self.enter(x)
        return torch.cat([x if k == "identity" else m(x) for k, m in zip(self.kinds, self.branches)], dim=1)


def make_item(it: Item, cin: int) -> nn.Module:
    if isinstance(it, Layer):
        assert it.cin == cin
        return LayerMod(it)
    return {Residual: ResidualBlock, BranchAdd: BranchAddBlock, Concat: ConcatBlock}[type(it)](it, cin)


def make_seq(items: tuple, cin: int) -> nn.Sequential:
    mods = []
    for it in items:
        mods.append(make_item(it, cin))
        cin = cout_of(it, cin)
    return nn.Sequential(*mods)


class Generated(nn.Module):
    """Executes a :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.body = make_seq(spec.body, spec.in_ch)
        if spec.head is not None:
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(seq_cout(spec.body, spec.in_ch), spec.head[0])
            self.head_act = Act(spec.head[1])

    def forward(self, x):
        x = self.body(x)
        if self.spec.head is not None:
            x = self.head_act(self.fc(torch.flatten(self.pool(x), 1)))
        return x


def build(spec: ModelSpec, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = Generated(spec)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters: eval and train differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, torch.randn(2, spec.in_ch, 8, 8)


# ======================================================================== checks


def module_nodes(gm) -> dict[str, str]:
    """Qualified module path -> fx node name, for call_module nodes."""
    return {n.target: n.name for n in gm.graph.nodes if n.op == "call_module"}


def weight_nodes(topo, path: list[str]) -> list[str]:
    return [x for x in path if topo.graph.nodes[x]["kind"] in WEIGHT_KINDS]


def check_equivalence(model: nn.Module, x: torch.Tensor) -> None:
    eager = copy.deepcopy(model)
    gm = netsurgeon.trace(model, x)  # trace also checks itself against eager, eval mode
    assert gm.training and eager.training
    eager.eval(), gm.eval()
    with torch.no_grad():
        ref, out = eager(x), gm(x)
    assert ref.shape == out.shape
    assert torch.equal(ref, out)
    # train mode: batch statistics, and the same running-stat updates, step after step
    eager.train(), gm.train()
    for _ in range(2):
        ref, out = eager(x), gm(x)
        assert torch.equal(ref, out)
    sd_ref, sd_out = eager.state_dict(), gm.state_dict()
    assert set(sd_ref) == set(sd_out)
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_out[k]), k
    # and back to eval with the updated statistics
    eager.eval(), gm.eval()
    with torch.no_grad():
        assert torch.equal(eager(x), gm(x))
    # a model traced in eval mode gives an eval-mode GraphModule that still trains like the model
    frozen = copy.deepcopy(eager).eval()
    gm2 = netsurgeon.trace(frozen)
    assert not gm2.training and not frozen.training
    frozen.train(), gm2.train()
    assert torch.equal(frozen(x), gm2(x))


def check_counts(spec: ModelSpec, topo) -> None:
    counts = topo.kind_counts()
    want = expected_counts(spec)
    assert {k: counts[k] for k in want} == want
    assert counts["other"] == 0 and counts["multiply"] == 0 and not topo.unknown, topo.unknown


def check_blocks(spec: ModelSpec, topo) -> None:
    """The merge blocks found are the generated ones, in graph order."""
    names = module_nodes(topo.gm)
    order = {n: d["index"] for n, d in topo.graph.nodes(data=True)}
    merges = sorted(topo.blocks, key=lambda b: order[b.merge])
    assert sorted(b.merge for b in merges) == sorted(topo.nodes_of("add") + topo.nodes_of("concat")), \
        "every add/concat node is one merge block"
    gen = merges_of(spec.body, "body")
    assert [type(b).__name__ for _, b in gen] == [
        {"residual": "Residual", "branch_merge": "BranchAdd", "concat": "Concat"}[mb.kind] for mb in merges], \
        f"generated {[p for p, _ in gen]}, found {[(mb.merge, mb.kind) for mb in merges]}"
    for (p, b), mb in zip(gen, merges):
        where = f"{p} ({type(b).__name__}) reported as {mb}"
        if b.marker:
            assert mb.entry == names[f"{p}.inp"], where
        if isinstance(b, Residual):
            assert topo.graph.nodes[mb.merge]["kind"] is OpKind.ADD, where
            assert mb.shortcut_kind == ("projection" if b.projection else "identity"), where
            assert mb.shortcut == ([names[f"{p}.proj"]] + ([names[f"{p}.proj_bn"]] if b.proj_bn else [])
                                   if b.projection else []), where
            assert mb.branch_layers == [[names[w] for w in weights_of(b.branch, f"{p}.branch")]], where
            assert len(mb.operands) == 2 and mb.weights == [1.0, 1.0], where
        elif isinstance(b, BranchAdd):
            assert topo.graph.nodes[mb.merge]["kind"] is OpKind.ADD, where
            got = sorted([weight_nodes(topo, mb.shortcut)] + mb.branch_layers)
            want = sorted([names[w] for w in weights_of(ls, f"{p}.{side}")]
                          for side, ls in (("left", b.left), ("right", b.right)))
            assert got == want, where
        else:
            assert topo.graph.nodes[mb.merge]["kind"] is OpKind.CONCAT, where
            assert len(mb.operands) == len(b.branches), where
            got = sorted([weight_nodes(topo, mb.shortcut)] + mb.branch_layers)
            want = sorted([names[w] for w in weights_of(ls, f"{p}.branches.{j}")]
                          for j, (_, ls) in enumerate(b.branches))
            assert got == want, where
    assert len(topo.residual_blocks()) == sum(isinstance(b, Residual) for _, b in gen)
    assert all(b.kind == "residual" for b in topo.residual_blocks())


def check_exports(topo, directory: Path) -> None:
    dot = topo.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    for n in topo.graph.nodes:
        assert f'"{n}"' in dot, n
    for a, b in topo.graph.edges:
        assert f'"{a}" -> "{b}";' in dot, (a, b)
    path = topo.to_graphml(directory / "g.graphml")
    back = nx.read_graphml(path)
    assert back.number_of_nodes() == topo.graph.number_of_nodes()
    assert set(back.nodes) == set(topo.graph.nodes)
    assert set(back.edges) == set(topo.graph.edges)
    for n, d in topo.graph.nodes(data=True):
        assert back.nodes[n]["kind"] == str(d["kind"])
        if "shape" in d:
            assert back.nodes[n]["shape"] == "x".join(map(str, d["shape"]))


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


# ======================================================================== hand-written regressions

C = 6
HAND_WRITTEN = {
    # two parallel conv-bn-act-conv branches summed, then a ResNet basic block (identity shortcut)
    "two_branch_add": ModelSpec(C, (
        BranchAdd((Layer("conv3", C, C, True, "relu"), Layer("conv3", C, C)),
                  (Layer("conv1", C, C, True, "gelu"), Layer("conv1", C, C)), "+", "relu", marker=True),
        Residual((Layer("conv3", C, C, True, "relu"), Layer("conv3", C, C, True)), post_act="relu", marker=True,
                 shortcut_first=False),
    )),
    # the lightest non-residual sum: one activated conv per branch; then the lightest residual block
    "parallel_conv_act": ModelSpec(C, (
        BranchAdd((Layer("conv3", C, C, act="relu"),), (Layer("conv1", C, C, True, "tanh"),), "torch.add"),
        Residual((Layer("conv1", C, C),), marker=True),
        Residual((Layer("linear", C, 4, act="gelu"),), True, False, False, "method.add"),
    )),
    # Inception-like: 1x1 | 1x1 -> 3x3 | max-pool, concatenated; a projection block; a linear head
    "inception_concat": ModelSpec(C, (
        Concat((("layers", (Layer("conv1", C, 4, True, "relu"),)),
                ("layers", (Layer("conv1", C, 4, False, "relu"), Layer("conv3", 4, 5, True, "relu"))),
                ("pool", ()))),
        Residual((Layer("conv3", 15, 8, True, "relu"), Layer("conv3", 8, 8, True)), True, True, True,
                 "torch.add", "relu"),
    ), (5, None)),
    # DenseNet-like concat with the input itself, linear layers, functional activations, and a
    # residual block nested in another one's branch
    "dense_nested": ModelSpec(4, (
        Concat((("identity", ()), ("layers", (Layer("linear", 4, 4, act="F.relu"), Layer("conv3", 4, 4)))),
               marker=True),
        Layer("conv1", 8, C, True, "method.relu"),
        Residual((Layer("linear", C, C, act="torch.tanh"),
                  Residual((Layer("conv3", C, C, True, "relu"),), add_style="method.add", marker=True),
                  Layer("conv1", C, C, True)), marker=True),
    ), (3, "tanh")),
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written(name: str, tmp_path: Path) -> None:
    spec = HAND_WRITTEN[name]
    model, x = build(spec, 0)
    check_equivalence(model, x)
    topo = netsurgeon.topology(model, x)
    check_counts(spec, topo)
    check_blocks(spec, topo)
    check_exports(topo, tmp_path)


def test_hand_written_spot_values() -> None:
    """Values written out directly, independent of the checking helpers."""
    topo = netsurgeon.topology(*build(HAND_WRITTEN["two_branch_add"], 0))
    assert [b.kind for b in topo.blocks] == ["branch_merge", "residual"]
    merge, res = topo.blocks
    assert merge.entry == "body_0_inp"
    assert sorted([weight_nodes(topo, merge.shortcut)] + merge.branch_layers) == [
        ["body_0_left_0_weight", "body_0_left_1_weight"], ["body_0_right_0_weight", "body_0_right_1_weight"]]
    assert res.shortcut_kind == "identity" and res.shortcut == [] and res.entry == "body_1_inp"
    assert res.operands[0] == "body_1_inp"  # shortcut first even though the sum is branch + x
    assert res.branch_layers == [["body_1_branch_0_weight", "body_1_branch_1_weight"]]
    assert topo.kind_counts()["conv"] == 6 and topo.kind_counts()["add"] == 2

    model, x = build(HAND_WRITTEN["inception_concat"], 0)
    topo = netsurgeon.topology(model, x)
    assert [b.kind for b in topo.blocks] == ["concat", "residual"]
    cat, res = topo.blocks
    assert cat.entry == "x" and len(cat.operands) == 3
    assert topo.graph.nodes[cat.merge]["shape"] == (2, 15, 8, 8)
    assert res.shortcut_kind == "projection" and res.shortcut == ["body_1_proj", "body_1_proj_bn"]
    assert res.branch_layers == [["body_1_branch_0_weight", "body_1_branch_1_weight"]]
    assert len(topo.residual_blocks()) == 1

    topo = netsurgeon.topology(*build(HAND_WRITTEN["dense_nested"], 0))
    assert [b.kind for b in topo.blocks] == ["concat", "residual", "residual"]
    cat, inner, outer = topo.blocks
    assert cat.shortcut == [] and cat.operands[0] == "body_0_inp"
    assert inner.entry == "body_2_branch_1_inp" and inner.branch_layers == [["body_2_branch_1_branch_0_weight"]]
    assert outer.entry == "body_2_inp" and outer.shortcut_kind == "identity"
    assert outer.branch_layers == [["body_2_branch_0_weight", "body_2_branch_1_branch_0_weight",
                                    "body_2_branch_2_weight"]]
