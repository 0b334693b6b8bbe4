"""Bare constant factors on the signal path (NF-Net's alpha, beta and gains) under dks/tat and remove_skips."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import netsurgeon


class Scaled(nn.Module):
    """h * 0.2 between layers, 2.0 * h after a tanh, and a residual branch scaled by alpha = 0.2."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x)) * 0.2
        h = 2.0 * torch.tanh(self.b(h))
        return h + torch.tanh(self.c(h)) * 0.2


def _changes(gm, pass_name):
    rec = next(p for p in netsurgeon.report(gm).passes if p.name == pass_name)
    return [c.what for c in rec.changes]


def test_tat_sets_bare_factors_to_their_sign_and_remove_skips_the_branch_factor():
    x = torch.randn(8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = netsurgeon.transform(Scaled(), ["remove_skips", "input_norm", "tat"], example_inputs=x)
    assert any("branch factor 0.2 set to 1" in w for w in _changes(gm, "remove_skips"))
    tat = _changes(gm, "tat")
    assert any("constant factor 0.2 set to 1" in w for w in tat) and any("constant factor 2 set to 1" in w for w in tat)
    numbers = [a for n in gm.graph.nodes for a in n.args if isinstance(a, float)]
    assert 0.2 not in numbers and 2.0 not in numbers


def test_factors_feeding_a_product_are_kept():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.q(x) * 0.25 * torch.tanh(self.k(x)))

    # kept (attention's 1/sqrt(d) is such a factor), so here it is named as what changes q
    with pytest.raises(netsurgeon.PassError, match="constant factor 0.25 at mul"):
        netsurgeon.transform(Attn(), ["tat"], example_inputs=torch.randn(8, 16))


class AffineEnded(nn.Module):
    """A residual branch ending in a learned scale and shift (hgnetv2's LearnableAffineBlock)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = nn.Parameter(torch.tensor([0.1]))
        self.bias = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.scale * torch.relu(self.fc(x)) + self.bias)


@pytest.mark.parametrize("middle", ["remove_skips", "normalize_sums"])
def test_layer_scale_reset_sets_the_scale_not_the_shift(middle):
    gm = netsurgeon.transform(AffineEnded(), [middle], example_inputs=torch.randn(4, 16))
    assert float(gm.get_parameter("scale")) == 1.0  # the layer scale
    assert float(gm.get_parameter("bias")) == 0.0  # a shift: set to 1 it doubled q (hgnetv2)


class DenseScaled(nn.Module):
    """RDNet's dense block: new features scaled by gamma = 1e-6, concatenated with the old ones."""

    def __init__(self, width: int = 16, growth: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, growth)
        self.gamma = nn.Parameter(1e-6 * torch.ones(growth))
        self.out = nn.Linear(width + growth, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([x, torch.relu(self.fc(x)).mul(self.gamma)], 1))


@pytest.mark.parametrize("middle", ["remove_skips", "normalize_sums"])
def test_layer_scale_ending_a_concatenated_branch_is_reset(middle):
    gm = netsurgeon.transform(DenseScaled(), [middle], example_inputs=torch.randn(4, 16))
    assert bool((gm.get_parameter("gamma") == 1.0).all())
    assert any("layer scale gamma set to 1" in w for w in _changes(gm, middle))
    kept = netsurgeon.transform(DenseScaled(), [(middle, {"reset_layer_scale": False})],
                                example_inputs=torch.randn(4, 16))
    assert float(kept.get_parameter("gamma").max()) == pytest.approx(1e-6)


class DenseAfterResidual(nn.Module):
    """A residual sum whose output is layer-scaled into a concatenation (ghostnetv3 mixes both)."""

    def __init__(self, width: int = 16, growth: int = 8) -> None:
        super().__init__()
        self.res, self.fc = nn.Linear(width, width), nn.Linear(width, growth)
        self.gamma = nn.Parameter(1e-6 * torch.ones(growth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + torch.relu(self.res(x))
        return torch.cat([x, torch.relu(self.fc(h)), h * self.gamma[:1]], 1)


def test_concat_scale_reset_runs_before_the_sums_are_rewritten():
    """The reset walks the graph the topology describes; after the rewrite it met new sum nodes (KeyError)."""
    gm = netsurgeon.transform(DenseAfterResidual(), ["normalize_sums"], example_inputs=torch.randn(4, 16))
    assert bool((gm.get_parameter("gamma") == 1.0).all())


class StrayLayerScale(nn.Module):
    """MobileNetV5's block without a shortcut still ends in its layer scale (1e-5); the norm that
    followed it made that harmless. A uniform 0.5 scale and a per-channel pattern are not layer scales."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.gamma = nn.Parameter(1e-5 * torch.ones(width))
        self.mid = nn.Parameter(0.5 * torch.ones(width))
        self.pattern = nn.Parameter(torch.linspace(0.01, 0.05, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)) * self.gamma  # ends no residual branch
        return torch.relu(self.fc2(h * self.mid)) * self.pattern


@pytest.mark.parametrize("middle", ["remove_skips", "normalize_sums"])
def test_layer_scale_ending_no_residual_branch_is_reset(middle):
    gm = netsurgeon.transform(StrayLayerScale(), [middle], example_inputs=torch.randn(4, 16))
    assert bool((gm.get_parameter("gamma") == 1.0).all())
    assert any("layer scale gamma set to 1" in w and "ends no residual branch" in w for w in _changes(gm, middle))
    assert float(gm.get_parameter("mid").max()) == 0.5  # uniform but not near zero: a real scale
    assert float(gm.get_parameter("pattern").min()) == pytest.approx(0.01)  # not one value
    kept = netsurgeon.transform(StrayLayerScale(), [(middle, {"reset_layer_scale": False})],
                                example_inputs=torch.randn(4, 16))
    assert float(kept.get_parameter("gamma").max()) == pytest.approx(1e-5)
