"""Tracing ``forward`` methods with optional arguments (``mask=None``, ``patch_coord=None``).

fx makes every parameter of ``forward`` a placeholder, and a placeholder is a proxy, never
``None``: ``if mask is not None:`` takes the branch for a given mask although the eager call
has none (timm's Hiera, NaFlexViT, Gemma4 ViT failed so). netsurgeon traces ``forward`` as it is
called with the example inputs: a parameter they do not supply keeps its default. Each model
here is checked against eager in train and eval mode (same dropout draws), exactly.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import netsurgeon
from netsurgeon.errors import TraceError
from netsurgeon.graph.state import trace_info


class MaskedBlock(nn.Module):
    """A block whose optional ``mask`` (None: all valid) selects what it computes."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.drop(self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2))  # (B, N, C): BN over C
        if mask is not None:
            x = x.masked_fill(~mask, 0.0)
        return x


class OptionalMask(nn.Module):
    """The root takes an optional mask and hands it (None or not) to its blocks."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MaskedBlock(dim), MaskedBlock(dim)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask=mask)
        if mask is None:
            return self.head(x.mean(dim=1))
        return self.head(x.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1))


class Coords(nn.Module):
    """Like timm's NaFlexViT/Gemma4 ViT: coordinates computed when not given, a validity mask derived
    from them only when given, keyword-only options and a ``pre_logits`` flag."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.pos = nn.Linear(2, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, patch_coord: torch.Tensor | None = None,
                patch_valid: torch.Tensor | None = None, *, scale: float = 2.0, pre_logits: bool = False
                ) -> torch.Tensor:
        if patch_valid is None and patch_coord is not None:
            patch_valid = ~(patch_coord == -1).all(dim=-1)
        if patch_coord is None:
            n = x.shape[1]
            patch_coord = torch.stack([torch.arange(n), torch.arange(n)], dim=-1).expand(x.shape[0], n, 2)
        x = self.drop(self.embed(x) + self.pos(patch_coord.to(x.dtype)))
        padding = ~patch_valid if patch_valid is not None else None
        if padding is not None:
            x = x.masked_fill(padding.unsqueeze(-1), 0.0)
        x = self.norm(x * scale).mean(dim=1)
        return x if pre_logits else self.head(x)


def _eager_vs_traced(model: nn.Module, gm: nn.Module, *inputs: torch.Tensor) -> None:
    """Eager and traced outputs are equal in train and eval mode, with the same dropout draws."""
    for training in (True, False):
        model.train(training)
        gm.train(training)
        torch.manual_seed(3)
        ref = model(*inputs)
        torch.manual_seed(3)
        out = gm(*inputs)
        assert torch.equal(ref, out), f"train={training}: max diff {float((ref - out).abs().max()):.2e}"


def _inputs(model: fx.GraphModule) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_optional_mask_not_given_keeps_its_default():
    torch.manual_seed(0)
    model, x = OptionalMask(), torch.randn(2, 5, 8)
    gm = netsurgeon.trace(model, x)
    assert _inputs(gm) == ["x"]  # exactly the supplied input
    assert trace_info(gm).defaulted == ["mask=None"]
    assert not any(n.op == "call_method" and n.target == "masked_fill" for n in gm.graph.nodes)
    _eager_vs_traced(model, gm, x)
    _eager_vs_traced(model, gm, torch.randn(3, 7, 8))  # other shapes: nothing about x was frozen


def test_optional_mask_given_is_an_input():
    torch.manual_seed(0)
    model = OptionalMask()
    x, mask = torch.randn(2, 5, 8), torch.rand(2, 5, 8) > 0.3
    gm = netsurgeon.trace(model, (x, mask))
    assert _inputs(gm) == ["x", "mask"]
    assert trace_info(gm).defaulted == []
    _eager_vs_traced(model, gm, x, mask)
    _eager_vs_traced(model, gm, x, torch.rand(2, 5, 8) > 0.7)  # another mask: it is an input, not a constant


def test_without_example_inputs_timm_style_root_is_unchanged():
    """No inputs and no input size to guess: every parameter stays an input, as before."""
    gm = netsurgeon.trace(OptionalMask())
    assert _inputs(gm) == ["x", "mask"]
    assert trace_info(gm).defaulted == []


def test_coordinates_and_keyword_only_options_default():
    torch.manual_seed(0)
    model, x = Coords(), torch.randn(2, 6, 8)
    gm = netsurgeon.trace(model, x)
    assert _inputs(gm) == ["x"]
    assert trace_info(gm).defaulted == ["patch_coord=None", "patch_valid=None", "scale=2.0", "pre_logits=False"]
    _eager_vs_traced(model, gm, x)


def test_coordinates_given_derive_the_mask():
    torch.manual_seed(0)
    model, x = Coords(), torch.randn(2, 6, 8)
    coord = torch.randint(0, 4, (2, 6, 2))
    coord[0, -2:] = -1  # padding rows
    gm = netsurgeon.trace(model, (x, coord))
    assert _inputs(gm) == ["x", "patch_coord"]
    assert trace_info(gm).defaulted == ["patch_valid=None", "scale=2.0", "pre_logits=False"]
    _eager_vs_traced(model, gm, x, coord)


def test_concrete_args_override_the_default():
    torch.manual_seed(0)
    model, x = Coords(), torch.randn(2, 6, 8)
    gm = netsurgeon.trace(model, x, concrete_args={"pre_logits": True})
    assert "pre_logits=False" not in trace_info(gm).defaulted
    for training in (True, False):
        model.train(training)
        gm.train(training)
        torch.manual_seed(3)
        ref = model(x, pre_logits=True)
        torch.manual_seed(3)
        assert torch.equal(ref, gm(x))
    assert ref.shape == (2, 8)


def test_example_input_given_as_none_is_fixed():
    torch.manual_seed(0)
    model, x = OptionalMask(), torch.randn(2, 5, 8)
    gm = netsurgeon.trace(model, (x, None))
    _eager_vs_traced(model, gm, x, None)
    with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
        gm(x, torch.ones(2, 5, 8, dtype=torch.bool))


def test_optional_argument_forced_to_a_placeholder_names_it():
    """A placeholder forced by the caller (concrete_args with fx's PH) for an argument the inputs
    do not supply: the error names the argument and a remedy that applies."""
    model, x = OptionalMask(), torch.randn(2, 5, 8)
    with pytest.raises(TraceError) as err:
        netsurgeon.trace(model, x, concrete_args={"mask": fx._symbolic_trace.PH})
    first = str(err.value).splitlines()[0]
    assert "'mask'" in first and "concrete_args={'mask': None}" in first
    with_fix = netsurgeon.trace(model, x, concrete_args={"mask": None})
    _eager_vs_traced(model, with_fix, x)


def test_traced_module_is_traced_again_unchanged():
    torch.manual_seed(0)
    model, x = OptionalMask(), torch.randn(2, 5, 8)
    gm = netsurgeon.trace(model, x)
    assert netsurgeon.trace(gm, x) is gm


@pytest.mark.slow
def test_hiera_tiny_traces_exactly():
    pytest.importorskip("timm")
    from harness.broad_zoo import build, load_selection, max_rel, train_eval_outputs

    entry = next(m for m in load_selection() if m.name == "hiera_tiny_224")
    model, x = build(entry)
    gm = netsurgeon.trace(model, x)
    assert trace_info(gm).defaulted == ["mask=None"]
    for training, (ref, got) in train_eval_outputs(model, gm, x).items():
        assert max_rel(ref, got) == 0.0, f"train={training}"
