"""Control flow decided on the example inputs: attribute proxies (``x.is_nested``) and ``len`` of a
traced shape, as ``nn.TransformerEncoder`` has them (``_get_seq_len``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import netsurgeon
import netsurgeon.graph.tracer
from netsurgeon.errors import TraceError
from netsurgeon.graph.state import trace_info

from harness.broad_zoo import train_eval_outputs


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_nested:  # an attribute proxy: its node is made only when asked for
            return x
        if len(x.size()) == 3:
            x = x.mean(1)
        return self.fc(x)


class _LenOfTensor(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * len(x)  # the batch size: not decided on the example (it would be frozen)


def test_attribute_branch_and_len_of_a_shape_are_decided_on_the_example():
    x = torch.randn(2, 5, 4)
    model = _Branchy()
    gm = netsurgeon.trace(model, x)
    torch.testing.assert_close(gm(x), model(x))
    decided = trace_info(gm).specialized
    assert any(d.endswith("-> False") for d in decided) and any(d.endswith("-> len = 3") for d in decided)


def test_len_of_a_tensor_is_still_refused():
    with pytest.raises(TraceError, match="len"):
        netsurgeon.trace(_LenOfTensor(), torch.randn(2, 3))


@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_traces_exactly(norm_first):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    gm = netsurgeon.trace(model, x)
    for ref, got in train_eval_outputs(model, gm, x).values():  # dropout draws the same masks
        torch.testing.assert_close(got, ref)


class _SlicedMask(nn.Module):
    """nanoGPT's causal mask: a buffer sliced by the traced sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(32, 32)))

    def forward(self, s):
        t = s.shape[-1]
        return s.masked_fill(self.tril[:t, :t] == 0, float("-inf")).softmax(-1) \
            + torch.from_numpy(np.ones(t, dtype=np.float32))


def test_a_traced_size_used_as_an_integer_is_read_on_the_example():
    model = _SlicedMask()
    x = torch.randn(2, 7, 7)
    gm = netsurgeon.trace(model, x)
    torch.testing.assert_close(gm(x), model(x))
    decisions = trace_info(gm).specialized
    assert sum("size or index = 7" in d for d in decisions) == 2  # the slice bound and numpy's length


class _Repeated(nn.Module):
    def forward(self, s):
        return torch.stack([s for _ in range(s.shape[-1])])  # a traced length as a Python loop bound


def test_a_traced_integer_without_example_inputs_fails_and_says_why():
    with pytest.raises(TypeError, match="example_inputs"):
        netsurgeon.graph.tracer.NetsurgeonTracer().trace(_Repeated())
    x = torch.randn(2, 3)
    torch.testing.assert_close(netsurgeon.trace(_Repeated(), x)(x), _Repeated()(x))


def test_attention_that_caches_its_bias_unless_jit_tracing_is_traced_through():
    """timm's TinyViT attention (LeViT's, EfficientViT's and EfficientFormerV2's alike) computes its
    position bias directly ``if torch.jit.is_tracing() or self.training`` and otherwise caches it by
    ``str(device)``: the train and eval traces differed and the attention became an opaque leaf. fx
    tracing now answers ``torch.jit.is_tracing()`` with True (and restores it): the attention's
    layers are in the graph, exact in both modes."""
    import timm.models.tiny_vit as tiny_vit

    torch.manual_seed(0)
    attn, x = tiny_vit.Attention(16, 4, num_heads=2, attn_ratio=2, resolution=(3, 3)), torch.randn(2, 9, 16)
    model = nn.Sequential(attn, nn.Linear(16, 16))  # inside a model, as in TinyViT
    gm = netsurgeon.trace(model, x)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "0.proj" in called and "0" not in called
    assert any("softmax" in str(n.target) or "scaled_dot_product" in str(n.target) for n in gm.graph.nodes)
    for mode in (True, False):
        model.train(mode), gm.train(mode)
        torch.testing.assert_close(gm(x), model(x))
    assert torch.jit.is_tracing() is False


class _Assigns(nn.Module):
    """Item assignment during a trace: into a tensor sized by the traced token count (ConViT's
    relative positions) and into a slice of a signal (MViTv2 adds relative positions that way)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        pos = torch.zeros(1, n, 2)
        pos[:, :, 0] = torch.arange(n, dtype=torch.float32)
        s = self.fc(x) @ x.transpose(1, 2)
        s[:, 1:, 1:] = s[:, 1:, 1:] + 1.0
        return s.sum(-1, keepdim=True) + pos[..., :1]


class _CachesInBuffer(nn.Module):
    """Caches what it builds from the token count in a buffer (ConViT's GPSA)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rel", torch.zeros(1, 1, 4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if self.rel.shape[1] != n:
            self.rel = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(1, n, 4) * 0.1
        return x + self.rel


def test_item_assignments_are_traced_as_copies_and_exact():
    model, x = nn.Sequential(_Assigns()), torch.randn(2, 5, 4)
    gm = netsurgeon.trace(model, x)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert netsurgeon.graph.tracer.assign_items in targets and not any("setitem" in str(t) for t in targets)
    for mode in (True, False):
        model.train(mode), gm.train(mode)
        torch.testing.assert_close(gm(x), model(x))
    netsurgeon.analyze(gm, x)  # no in-place node the analysis cannot follow


def test_a_submodule_caching_a_traced_value_is_traced_through_and_put_back():
    """The train trace stores a proxy in the buffer; put back, the eval trace builds its own and the
    two graphs agree (before, the eval trace read the train trace's proxy and the module became a leaf)."""
    inner = _CachesInBuffer()
    model, x = nn.Sequential(inner, nn.Linear(4, 4)), torch.randn(2, 5, 4)
    gm = netsurgeon.trace(model, x)
    assert "0" not in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert isinstance(inner.rel, torch.Tensor)
    for mode in (True, False):
        model.train(mode), gm.train(mode)
        torch.testing.assert_close(gm(x), model(x))


class _Rotary(nn.Module):
    """Rotary frequencies in a buffer, expanded by the traced batch size (Gemma 4's 2-D rotary embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.rand(4))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        f = self.inv_freq[None, :, None].float().expand(x.shape[0], -1, 1)
        return self.fc(x) * f.sum(dim=(1, 2))[:, None]


def test_a_buffer_method_called_with_a_traced_size_traces_with_buffers_as_nodes():
    """fx reads buffers as constant tensors, on which ``expand(x.shape[0], ...)`` fails: the trace is retried
    with buffers as graph nodes (and says so) instead of leaving the module opaque."""
    model, x = _Rotary(), torch.randn(3, 8)
    gm = netsurgeon.trace(model, x)
    info = trace_info(gm)
    assert info.buffers_as_nodes and not info.untraceable_leaves and not info.auto_leaves
    torch.testing.assert_close(gm(x), model(x))
    y = torch.randn(5, 8)
    torch.testing.assert_close(gm(y), model(y))  # the batch size stays symbolic
    assert not trace_info(netsurgeon.trace(_SlicedMask(), torch.randn(2, 7, 7))).buffers_as_nodes
