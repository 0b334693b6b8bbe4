"""One-call registration (issue 15 item 1): a new activation or module op reaches every analysis and pass.

Three made-up activations, registered with ``netsurgeon.register_activation`` alone:

* ``half_xtanh(x) = x tanh(x) / 2 + x / 10``: smooth, a plain function called in ``forward``;
* ``SoftFloor``: ``x`` for ``x > 0``, ``x / (1 - x / floor)`` below (bounded below by ``-floor``,
  one-sided, a kink in φ'' at 0), a module with a parameter;
* ``my_leaky(x, s) = x (x > 0), s x (x ≤ 0)``: the leaky-ReLU family, a function with a parameter.

and two module ops registered with ``netsurgeon.register_module_op`` (a fixed scaling and a
per-example RMS normalization). Every registration is undone with ``with``; the last tests
check that the activation registry and the op classifier agree.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.integrate as si
import torch
import torch.fx
import torch.fx as fx
import torch.nn as nn

import netsurgeon
from netsurgeon import OpKind
from netsurgeon.analysis import measure, operator_norm_bound
from netsurgeon.analysis.rules import KERNEL_RULES, NodeKernel
from netsurgeon.errors import InvalidArgumentError, UnsupportedNodeError
from netsurgeon.kernels import LocalMaps, activation_entry, get_activation, list_activations
from netsurgeon.kernels.transforms import transformed
from netsurgeon.ops import ActivationSpec, activation_module, classify, module_rule, torch_forms
from netsurgeon.ops.registry import _FUNCTION_RULES, _METHOD_RULES, _MODULE_RULES


# ---------------------------------------------------------------- the made-up activations
def half_xtanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * torch.tanh(x) + 0.1 * x


def my_leaky(x: torch.Tensor, s: float = 0.2) -> torch.Tensor:
    return torch.where(x > 0, x, s * x)


torch.fx.wrap("half_xtanh")  # plain functions called in forward are fx leaves this way
torch.fx.wrap("my_leaky")


class SoftFloor(nn.Module):
    def __init__(self, floor: float = 1.0) -> None:
        super().__init__()
        self.floor = floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, x / (1.0 - x / self.floor))


def _np_half_xtanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * np.tanh(x) + 0.1 * x


def _np_soft_floor(x: np.ndarray, floor: float = 1.0) -> np.ndarray:
    return np.where(x > 0, x, x / (1.0 - np.minimum(x, 0.0) / floor))


def _register_half_xtanh():
    return netsurgeon.register_activation("half_xtanh", half_xtanh)


def _register_soft_floor():
    return netsurgeon.register_activation("soft_floor", torch_modules=[SoftFloor], params={"floor": 1.0}, kinks=[0.0],
                                          one_sided=True, lipschitz=1.25)


def _register_my_leaky():
    return netsurgeon.register_activation("my_leaky", my_leaky, params={"s": 0.2}, kinks=[0.0], scale=None,
                                          leaky_slope="s", relu_family=True)


class FunctionalNet(nn.Module):
    """Linear layers with a plain function between them."""

    def __init__(self, fn, width: int = 64, depth: int = 3, **kwargs: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.fn, self.kwargs = fn, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.fn(layer(x), **self.kwargs)
        return x


class HalfXTanhNet(FunctionalNet):
    def __init__(self, width: int = 64, depth: int = 3) -> None:
        super().__init__(None, width, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = half_xtanh(layer(x))
        return x


class LeakyNet(FunctionalNet):
    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__(None, width, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = my_leaky(layer(x), 0.2)
        return x


def _orthogonal(model: nn.Module, seed: int = 0) -> nn.Module:
    """Orthogonal weights (gain 1) and zero biases: Gaussian inputs stay i.i.d. Gaussian."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                q, _ = torch.linalg.qr(torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
                m.weight.copy_(q.to(m.weight.dtype))
                m.bias.zero_()
    return model


def _soft_floor_net(width: int = 64, depth: int = 4) -> nn.Module:
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), SoftFloor(1.0))])


def _output(a: netsurgeon.Analysis) -> str:
    return next(n for n in a.kernels if a.topology.graph.nodes[n]["kind"] is OpKind.OUTPUT)


def _gauss(fn, kinks=(), std: float = 1.0) -> float:
    """E[fn(std z)] by scipy quad, split at the kinks."""
    pdf = lambda z: math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    return si.quad(lambda z: float(fn(np.array(std * z))) * pdf(z), -12, 12,
                   points=[t / std for t in kinks] or None, epsabs=1e-12, epsrel=1e-12, limit=500)[0]


# ---------------------------------------------------------------- a smooth function, functional form
def test_smooth_function_reaches_analyze_with_the_maps_of_its_numpy_twin():
    with _register_half_xtanh():
        model = _orthogonal(HalfXTanhNet(width=512, depth=2))
        info = netsurgeon.topology(model).info("half_xtanh")
        assert info.kind is OpKind.ACTIVATION and str(info.activation) == "half_xtanh"
        a = netsurgeon.analyze(model)
        assert a.status("half_xtanh_1") == ("exact", "")
        # the math comes from the torch function (float64, autograd): it equals an independent numpy twin
        twin = LocalMaps(get_activation(_np_half_xtanh, kinks=[], scale=1.0))
        q1 = float(twin.q_map(a.q("layers_0")))
        assert a.q("half_xtanh") == pytest.approx(q1, rel=1e-9)
        assert a.q("half_xtanh_1") == pytest.approx(float(twin.q_map(a.q("layers_1"))), rel=1e-9)
        assert q1 == pytest.approx(_gauss(lambda x: _np_half_xtanh(x) ** 2), rel=1e-9)
        # and a Monte-Carlo run of the network: 512 features x 256 examples
        g = torch.Generator().manual_seed(0)
        x1, x2 = torch.randn(256, 512, generator=g), torch.randn(256, 512, generator=g)
        stats = measure(model, x1, x2)
        assert stats.nodes["half_xtanh"].q == pytest.approx(a.q("half_xtanh"), rel=0.02)
        assert stats.nodes["half_xtanh_1"].q == pytest.approx(a.q("half_xtanh_1"), rel=0.03)


def test_smooth_function_is_shaped_by_dks_and_tat():
    with _register_half_xtanh():
        torch.manual_seed(0)
        gm = netsurgeon.transform(HalfXTanhNet(), ["orthogonal_init", ("dks", {"zeta": 1.5})])
        base = gm.get_submodule("ns_shaped_act_0").base  # the functional call site, rebuilt
        assert isinstance(base, netsurgeon.layers.FunctionActivation) and base.fn is half_xtanh
        derivation = gm.meta["netsurgeon"]["dks"]
        xi, t = derivation["xi"], derivation["constants"]["half_xtanh"]
        maps = LocalMaps(transformed(get_activation("half_xtanh"), t["alpha"], t["beta"], t["gamma"], t["delta"]))
        assert (maps.q1, maps.q_slope_1(), maps.c0()) == pytest.approx((1.0, 1.0, 0.0), abs=1e-8)
        assert maps.c_slope_1() == pytest.approx(xi, abs=1e-8)  # the local C'(1) target is met
        assert xi ** 3 == pytest.approx(1.5, rel=1e-9)  # 3 activations in a chain: ζ = ξ³
        topo = netsurgeon.topology(gm)
        for name in topo.nodes_of(OpKind.ACTIVATION):  # the installed (float32) constants
            spec = topo.info(name).activation
            assert spec.transform == pytest.approx((t["alpha"], t["beta"], t["gamma"], t["delta"]), rel=1e-6)
        a = netsurgeon.analyze(gm)  # the engine, from the real weights: the network's C'(1) is ζ
        assert a.c_slope_1(_output(a)) == pytest.approx(1.5, rel=1e-5)

        gm = netsurgeon.transform(HalfXTanhNet(), ["orthogonal_init", ("tat", {"tau": 0.3})])
        kappa, t = gm.meta["netsurgeon"]["tat"]["kappa"], gm.meta["netsurgeon"]["tat"]["constants"]["half_xtanh"]
        assert kappa == pytest.approx(0.1)  # tau / 3 activations
        maps = LocalMaps(transformed(get_activation("half_xtanh"), t["alpha"], t["beta"], t["gamma"], t["delta"]))
        assert (maps.q1, maps.q_slope_1(), maps.c_slope_1(), maps.c_curv_1()) == pytest.approx(
            (1.0, 1.0, 1.0, kappa), abs=1e-8)


def test_smooth_function_bound_and_farkas():
    with _register_half_xtanh():
        model = HalfXTanhNet(width=8)
        b = operator_norm_bound(model, torch.randn(1, 8))
        x = np.linspace(-20, 20, 400001)  # no registered constant: max |φ'| measured
        dphi = 0.5 * np.tanh(x) + 0.5 * x / np.cosh(x) ** 2 + 0.1
        assert b.factors["half_xtanh"] == pytest.approx(float(np.max(np.abs(dphi))), rel=1e-6)
        assert b.kinds["half_xtanh"] == "activation"
        gm = netsurgeon.transform(model, ["farkas"], example_inputs=(torch.randn(2, 8),))
        skipped = {s.node: s.why for s in netsurgeon.report(gm).passes[0].skipped}
        assert "is not one-sided" in skipped["layers_0"]  # not one-sided: farkas leaves it


# ---------------------------------------------------------------- a one-sided kinked module
def test_one_sided_module_reaches_analyze_farkas_and_the_bound():
    with _register_soft_floor():
        entry = activation_entry("soft_floor")
        assert entry.one_sided and entry.lipschitz == 1.25 and not entry.relu_family
        model = _orthogonal(_soft_floor_net(width=512, depth=2))
        a = netsurgeon.analyze(model)
        q1 = _gauss(lambda x: _np_soft_floor(x) ** 2, kinks=[0.0])
        assert a.q("_1") == pytest.approx(q1, rel=1e-8)  # Q(1) by scipy quad, split at the kink
        g = torch.Generator().manual_seed(1)
        stats = measure(model, torch.randn(256, 512, generator=g), torch.randn(256, 512, generator=g))
        assert stats.nodes["_1"].q == pytest.approx(a.q("_1"), rel=0.02)
        assert stats.nodes["_3"].q == pytest.approx(a.q("_3"), rel=0.03)

        b = operator_norm_bound(model, torch.randn(1, 512))
        assert b.factors["_1"] == 1.25 and b.factors["_3"] == 1.25  # the registered constant, not measured

        small = _soft_floor_net(width=16, depth=2)
        x = torch.randn(5, 16)
        gm = netsurgeon.transform(small, [("farkas", {"consumer_init": "zero"})], example_inputs=(x,))
        record = netsurgeon.report(gm).passes[0]
        assert [c.node for c in record.changes] == ["_0"]  # the layer feeding the one-sided activation
        assert isinstance(gm.get_submodule("0"), netsurgeon.layers.FarkasLayer)
        torch.testing.assert_close(gm.eval()(x), small.eval()(x))


def test_one_sided_module_is_shaped_by_dks():
    with _register_soft_floor():
        torch.manual_seed(0)
        gm = netsurgeon.transform(_soft_floor_net(), ["orthogonal_init", ("dks", {"zeta": 2.0})])
        shaped = gm.get_submodule("1")
        assert isinstance(shaped, netsurgeon.layers.ShapedActivation) and isinstance(shaped.base, SoftFloor)
        derivation = gm.meta["netsurgeon"]["dks"]
        xi, t = derivation["xi"], derivation["constants"]["soft_floor(floor=1)"]
        assert netsurgeon.topology(gm).info("_1").activation.params == (("floor", 1.0),)
        maps = LocalMaps(transformed(get_activation("soft_floor", floor=1.0), t["alpha"], t["beta"], t["gamma"],
                                     t["delta"]))
        assert (maps.q1, maps.q_slope_1(), maps.c0(), maps.c_slope_1()) == pytest.approx((1.0, 1.0, 0.0, xi), abs=1e-8)
        a = netsurgeon.analyze(gm)
        assert a.c_slope_1(_output(a)) == pytest.approx(2.0, rel=1e-5)


# ---------------------------------------------------------------- the leaky family, functional form
def test_leaky_function_becomes_a_trelu_and_a_modulus():
    with _register_my_leaky():
        assert get_activation("my_leaky").leaky_slope == 0.2  # closed-form maps
        torch.manual_seed(0)
        gm = netsurgeon.transform(LeakyNet(), ["orthogonal_init", ("tat", {"eta": 0.5})])
        a_slope = gm.meta["netsurgeon"]["tat"]["negative_slope"]
        base = gm.get_submodule("ns_shaped_act_0").base
        assert isinstance(base, nn.LeakyReLU) and base.negative_slope == pytest.approx(a_slope)
        a = netsurgeon.analyze(gm)
        assert float(a.cmap(_output(a))(0.0)) == pytest.approx(0.5, abs=1e-6)  # the network's C(0) is eta
        assert a.c_slope_1(_output(a)) == pytest.approx(1.0, abs=1e-6)

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # dks solves the slope parameter s too (as for leaky_relu): no warning
            shaped = netsurgeon.transform(LeakyNet(), ["orthogonal_init", "dks"])
        (key,) = shaped.meta["netsurgeon"]["dks"]["constants"]
        assert key.startswith("my_leaky(s=") and key != "my_leaky(s=0.2)"
        gm = netsurgeon.transform(LeakyNet(), ["modulus"])  # relu_family: the consistency pass replaces it
        assert len(netsurgeon.report(gm).passes[0].changes) == 4
        assert all(isinstance(m, netsurgeon.layers.Modulus) for n, m in gm.named_children() if n.startswith("ns_"))


# ---------------------------------------------------------------- module ops with their kernel rules
class UnitRMS(nn.Module):
    """``gain · x / sqrt(mean(x²) + eps)`` over the features of each example."""

    def __init__(self, gain: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.gain, self.eps = gain, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _unit_rms_rule(ctx, inputs):
    """q = gain² whatever the input's, c unchanged (eps neglected)."""
    k, g2 = inputs[0], ctx.module.gain ** 2
    return NodeKernel(g2, g2, g2 * k.k / np.sqrt(k.q * k.q2), k.dk * g2 / k.q, k.status, k.reason)


class Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, self.s)


def _scaled_rms_net(gain: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), Scale(3.0), UnitRMS(gain), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())


def test_module_op_kernel_rule_reaches_analyze_and_dks():
    model = _scaled_rms_net(0.5)
    with pytest.raises(UnsupportedNodeError):  # unregistered: traced into products and reductions
        netsurgeon.transform(model, ["orthogonal_init", "dks"])
    with netsurgeon.register_module_op(UnitRMS, kind=OpKind.OTHER, kernel_rule=_unit_rms_rule), \
            netsurgeon.register_module_op(Scale, kind=OpKind.AFFINE, kernel_rule=lambda ctx, ins: ins[0].linear(
                ctx.module.s ** 2), lipschitz=lambda m: abs(m.s)):
        topo = netsurgeon.topology(model)
        assert topo.info("_2").kind is OpKind.OTHER and topo.info("_2").name == "unitrms" and not topo.unknown
        a = netsurgeon.analyze(model)
        assert a.q("_1") == pytest.approx(9.0 * a.q("_0"), rel=1e-12)  # the Scale rule's factor
        assert a.q("_2") == pytest.approx(0.25, rel=1e-12)  # the UnitRMS rule: gain², whatever comes in
        assert a.status("_2") == ("exact", "")
        stats = measure(model, torch.randn(64, 32), torch.randn(64, 32))
        assert stats.nodes["_2"].q == pytest.approx(0.25, rel=1e-4)
        assert operator_norm_bound(model, torch.randn(1, 32)).factors["_1"] == 3.0

        # dks propagates the rule's q: 0.25 reaches the tanh, which DKS refuses by name
        with pytest.raises(UnsupportedNodeError, match=r"activation _3 receives q = 0.25"):
            netsurgeon.transform(model, ["orthogonal_init", "dks"])
        gm = netsurgeon.transform(_scaled_rms_net(1.0), ["orthogonal_init", ("dks", {"zeta": 1.5})])
        a = netsurgeon.analyze(gm)
        assert a.q("_2") == 1.0 and a.q("_3") == pytest.approx(1.0, rel=1e-6)  # Q(1) = 1 (float32 constants)
        assert a.c_slope_1(_output(a)) == pytest.approx(1.5, rel=1e-5)
    assert module_rule(UnitRMS()) is None and KERNEL_RULES.for_module(UnitRMS()) is None  # all taken back


def test_an_infinite_q_is_named_where_it_starts():
    """A rule that makes q infinite (a product against an operand zero at initialization, CoaT) is named,
    with the op that received it, instead of failing inside the activation's map."""
    with netsurgeon.register_module_op(Scale, kind=OpKind.AFFINE, kernel_rule=lambda ctx, ins: ins[0].linear(
            float("inf")), lipschitz=lambda m: abs(m.s)):
        with pytest.raises(UnsupportedNodeError, match=r"q is infinite at the input of _2: it becomes infinite at _1"):
            netsurgeon.analyze(nn.Sequential(nn.Linear(32, 32), Scale(3.0), nn.Tanh()))


def test_a_module_rule_that_changes_c_is_refused_by_dks():
    def squash(ctx, inputs):  # halves every cosine: not a DKS-transparent op
        k = inputs[0]
        return NodeKernel(k.q, k.q2, 0.5 * k.k, 0.5 * k.dk, k.status, k.reason)

    with netsurgeon.register_module_op(UnitRMS, kind=OpKind.OTHER, kernel_rule=squash):
        a = netsurgeon.analyze(_scaled_rms_net(1.0))
        before = a.topology.graph.nodes["_2"]["signal_operands"][0]  # Scale, traced into a mul
        c = np.linspace(-1, 1, 9)
        np.testing.assert_allclose(a.cmap("_2")(c), 0.5 * a.cmap(before)(c), atol=1e-12)
        with pytest.raises(UnsupportedNodeError, match="kernel rule changes the C map"):
            netsurgeon.transform(_scaled_rms_net(1.0), ["orthogonal_init", "dks"])


# ---------------------------------------------------------------- undo, errors
def test_registrations_are_undone_and_never_served_stale():
    model = HalfXTanhNet(width=8)
    with _register_half_xtanh():
        assert "half_xtanh" in list_activations() and torch_forms("half_xtanh").functions == (half_xtanh,)
        q_first = netsurgeon.analyze(model).q("half_xtanh")
    assert activation_entry("half_xtanh") is None and "half_xtanh" not in list_activations()
    assert half_xtanh not in _FUNCTION_RULES and torch_forms("half_xtanh") is None
    with pytest.raises(UnsupportedNodeError, match="no kernel rule"):  # an unknown function again
        netsurgeon.transform(model, ["dks"])
    with netsurgeon.register_activation("half_xtanh", lambda x: 2.0 * half_xtanh(x), torch_functions=[half_xtanh]):
        assert netsurgeon.analyze(model).q("half_xtanh") == pytest.approx(4.0 * q_first, rel=1e-9)

    reg = _register_soft_floor()
    assert module_rule(SoftFloor()) is not None
    reg.remove()
    reg.remove()  # a second remove does nothing
    assert module_rule(SoftFloor()) is None and activation_entry("soft_floor") is None


def test_registration_errors_name_the_problem():
    with pytest.raises(InvalidArgumentError, match="already registered"):
        netsurgeon.register_activation("tanh", torch.tanh, kinks=[])
    with pytest.raises(InvalidArgumentError, match="already recognised"):
        netsurgeon.register_activation("my_tanh", torch.tanh)  # torch.tanh is the built-in tanh's
    assert activation_entry("my_tanh") is None  # nothing half-registered
    with pytest.raises(InvalidArgumentError, match="leaky_slope='t' names no parameter"):
        netsurgeon.register_activation("bad", my_leaky, params={"s": 0.2}, leaky_slope="t")
    with pytest.raises(InvalidArgumentError, match="pass fn"):
        netsurgeon.register_activation("nothing")
    with pytest.raises(InvalidArgumentError, match="already recognised"):
        netsurgeon.register_module_op(nn.Linear, kind=OpKind.LINEAR)
    # an existing activation gains a torch form without touching its math
    with netsurgeon.register_activation("tanh", torch_modules=[SoftFloor]):
        assert str(netsurgeon.topology(nn.Sequential(SoftFloor())).info("_0").activation) == "tanh"
    assert module_rule(SoftFloor()) is None
    with pytest.raises(InvalidArgumentError, match="registered already"):
        netsurgeon.register_activation("tanh", one_sided=True)


def test_every_kernel_activation_can_be_rebuilt_as_a_module():
    """dks rebuilds functional call sites from the registry: every activation the kernels know."""
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    for name in list_activations():
        if name == "identity":
            continue
        act = get_activation(name)
        m = activation_module(ActivationSpec(name, act.params))
        with torch.no_grad():  # a rebuilt module may hold learnable parameters (StarReLU's s and b)
            y = m.double()(x)
        np.testing.assert_allclose(y.numpy(), act.phi(x.numpy()), atol=1e-12, err_msg=name)


# ---------------------------------------------------------------- the registry and the classifier agree
class _Ctx:
    """A classification context where every node is a signal."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def is_signal(self, arg) -> bool:
        return isinstance(arg, fx.Node)

    def info(self, node: fx.Node):
        return classify(node, self)


def _classified(target, op: str):
    """Classify ``target(x)`` (a module instance, a function or a method name) on its own."""
    root, g = nn.Module(), fx.Graph()
    x = g.placeholder("x")
    if op == "call_module":
        root.add_module("m", target)
        node = g.call_module("m", (x,))
    else:
        node = g.create_node(op, target, (x,))
    g.output(node)
    return classify(node, _Ctx(root))


def test_every_torch_form_of_an_activation_is_classified_as_it():
    for name in list_activations():
        forms = torch_forms(name)
        entry = activation_entry(name)
        if forms is None or entry.name != name:
            continue
        for t in forms.modules:
            info = _classified(t(), "call_module")
            assert info.activation is not None and activation_entry(info.activation.name).name == name, (name, t)
        for f in forms.functions:
            assert _classified(f, "call_function").activation.name == name, (name, f)
        for m in forms.methods:
            assert _classified(m, "call_method").activation.name == name, (name, m)


def test_every_activation_the_classifier_produces_has_a_registry_entry():
    produced = set()
    for t in list(_MODULE_RULES):
        try:
            m = t()
        except Exception:  # needs constructor arguments: not an activation module of its own
            continue
        try:
            info = _classified(m, "call_module")
        except Exception:
            continue
        if info.activation is not None:
            produced.add(info.activation.name)
    for table, op in ((_FUNCTION_RULES, "call_function"), (_METHOD_RULES, "call_method")):
        for target in list(table):
            try:
                info = _classified(target, op)
            except Exception:  # a rule that needs more arguments (sums, concatenations...)
                continue
            if info.activation is not None:
                produced.add(info.activation.name)
    assert {"relu", "gelu", "gelu_tanh", "prelu", "abs", "hardtanh", "quick_gelu", "hard_mish"} <= produced
    assert not {n for n in produced if activation_entry(n) is None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_act = __import__("timm").layers.get_act_layer("silu")()
    assert _classified(timm_act, "call_module").activation.name == "silu"


def test_every_op_kind_has_its_traits_and_rules():
    from netsurgeon.analysis import targets  # noqa: F401  (registers the ideal rules)
    from netsurgeon.analysis.rules import BOUND_RULES, IDEAL_RULES
    from netsurgeon.ops import KIND_TRAITS

    assert set(KIND_TRAITS) == set(OpKind)
    signal_kinds = [k for k in OpKind if k.traits.signal]
    assert not [k for k in signal_kinds if IDEAL_RULES.for_kind(k) is None]  # none falls to "no DKS target rule"
    assert {k for k in OpKind if k.traits.unchanged} == {OpKind.IDENTITY, OpKind.RESHAPE, OpKind.OUTPUT}
    assert all(KERNEL_RULES.for_kind(k) is not None for k in OpKind if k.traits.unchanged or k.traits.merge)
    assert all(BOUND_RULES.for_kind(k) is not None for k in OpKind if k.traits.unchanged or k.traits.merge)


def soft_step(x, floor=1.0):  # module level, as user code is; never passed to torch.fx.wrap
    return torch.where(x > 0, x, x / (1.0 - x / floor))


class _SoftStepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return soft_step(self.lin(x))


def test_a_registered_python_function_is_traced_as_one_call_without_fx_wrap():
    traced_through = [n.op for n in netsurgeon.trace(_SoftStepNet()).graph.nodes if n.op == "call_function"]
    assert len(traced_through) > 1  # unregistered: torch.fx records its body, op by op
    with netsurgeon.register_activation("soft_step_test", soft_step, params={"floor": 1.0}, kinks=[0.0],
                                        one_sided=True, lipschitz=1.0):
        gm = netsurgeon.trace(_SoftStepNet())
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert [c.target for c in calls] == [soft_step]
        assert netsurgeon.topology(gm).activations() == {"soft_step_test(floor=1)": 1}


# ----------------------------------------------------------- function and method ops with kernel rules
def unit_rms(x, gain=1.0):  # module level, as user code is: traced as one call once registered
    return gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _FunctionalRMSNet(nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.lin2, self.gain = nn.Linear(32, 32), nn.Linear(32, 32), gain

    def forward(self, x):
        return torch.tanh(self.lin2(torch.tanh(unit_rms(self.lin1(x), self.gain))))


def _functional_rms_rule(ctx, inputs):
    """q = gain² (the call's second argument), c unchanged."""
    gain = ctx.node.args[1] if len(ctx.node.args) > 1 else 1.0
    k, g2 = inputs[0], float(gain) ** 2
    return NodeKernel(g2, g2, g2 * k.k / np.sqrt(k.q * k.q2), k.dk * g2 / k.q, k.status, k.reason)


def test_function_op_kernel_rule_reaches_analyze_dks_and_the_bound():
    with pytest.raises(UnsupportedNodeError):  # unregistered: traced into products and reductions
        netsurgeon.transform(_FunctionalRMSNet(0.5), ["orthogonal_init", "dks"])
    with netsurgeon.register_function_op(unit_rms, kind=OpKind.OTHER, kernel_rule=_functional_rms_rule,
                                         lipschitz=2.0):
        model = _FunctionalRMSNet(0.5)
        topo = netsurgeon.topology(model)
        node = next(n for n in topo.gm.graph.nodes if n.op == "call_function" and n.target is unit_rms)
        assert topo.info(node.name).kind is OpKind.OTHER and not topo.unknown
        a = netsurgeon.analyze(model)
        assert a.q(node.name) == pytest.approx(0.25, rel=1e-12) and a.status(node.name) == ("exact", "")
        assert operator_norm_bound(model, torch.randn(1, 32)).factors[node.name] == 2.0
        with pytest.raises(UnsupportedNodeError, match=r"receives q = 0.25"):
            netsurgeon.transform(model, ["orthogonal_init", "dks"])
        gm = netsurgeon.transform(_FunctionalRMSNet(1.0), ["orthogonal_init", ("dks", {"zeta": 1.5})])
        assert netsurgeon.analyze(gm).c_slope_1(_output(netsurgeon.analyze(gm))) == pytest.approx(1.5, rel=1e-5)
    assert unit_rms not in _FUNCTION_RULES  # taken back


def test_method_op_kernel_rule_reaches_analyze():
    class Halve(nn.Module):
        def forward(self, x):
            return x.halve_for_test()

    torch.Tensor.halve_for_test = lambda self: self * 0.5
    try:
        model = nn.Sequential(nn.Linear(8, 8), Halve(), nn.Tanh())
        with netsurgeon.register_function_op("halve_for_test", kind=OpKind.AFFINE,
                                             kernel_rule=lambda ctx, ins: ins[0].linear(0.25)):
            a = netsurgeon.analyze(model)
            node = next(n for n in a.topology.gm.graph.nodes if n.op == "call_method")
            assert a.q(node.name) == pytest.approx(0.25 * a.q("_0"), rel=1e-12)
        assert "halve_for_test" not in _METHOD_RULES
    finally:
        del torch.Tensor.halve_for_test
