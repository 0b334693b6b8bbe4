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
    with pytest.raises(TypeError, match="example_inputs"):  # without example inputs it fails, and says why
        netsurgeon.graph.tracer.NetsurgeonTracer().trace(_SlicedMask())


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
