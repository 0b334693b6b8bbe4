"""Norm classes recognized by what they compute (``netsurgeon.ops.recognized``): Hugging Face's
RMSNorms and a user's own, so that the analysis has their rule and ``remove_norms`` finds them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon.graph import Topology
from netsurgeon.graph.state import trace_info
from netsurgeon.ops import OpKind


class MyRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MyLayerNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x - x.mean(-1, keepdim=True)
        return h / (h.pow(2).mean(-1, keepdim=True) + self.eps).sqrt() * self.weight + self.bias


class OffsetRMSNorm(MyRMSNorm):
    """Gemma's form, ``(1 + w)``: not the plain formula, so not recognized (traced through)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class Gain(nn.Module):
    """A weight and an eps, but no norm."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.eps


def test_norm_classes_are_recognized_by_what_they_compute():
    model = nn.Sequential(nn.Linear(8, 8), MyRMSNorm(8), nn.Linear(8, 8), MyLayerNorm(8), OffsetRMSNorm(8), Gain(8))
    x = torch.randn(2, 3, 8)
    gm = netsurgeon.trace(model, x)
    assert trace_info(gm).recognized_norms == ["MyRMSNorm (rms)", "MyLayerNorm (layer)"]
    topo = Topology(gm)
    assert topo.nodes_of(OpKind.NORM) == ["_1", "_3"]
    assert [topo.info(n).norm.family for n in topo.nodes_of(OpKind.NORM)] == ["rms", "layer"]
    torch.testing.assert_close(gm(x), model(x))
    a = netsurgeon.analyze(gm, x)
    assert a.q("_1") == pytest.approx(1.0, rel=1e-6)  # an RMS norm with unit gain: q = 1 exactly
    gm2 = netsurgeon.transform(model, ["remove_norms"], example_inputs=x)
    assert Topology(gm2).nodes_of(OpKind.NORM) == []


def test_llama_rms_norms_are_found_and_removed():
    transformers = pytest.importorskip("transformers", reason="Hugging Face models need the 'hf' extra")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    gm = netsurgeon.trace(model, ids)
    assert len(Topology(gm).nodes_of(OpKind.NORM)) == 2 * 2 + 1
    gm2 = netsurgeon.transform(model, ["remove_norms"], example_inputs=ids)
    assert Topology(gm2).nodes_of(OpKind.NORM) == []
    assert torch.isfinite(gm2(ids).logits if hasattr(gm2(ids), "logits") else gm2(ids)["logits"]).all()


# ---------------------------------------------------------------------------------------------- activations

class _NewGelu(nn.Module):  # Hugging Face's NewGELUActivation, written out
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _Configured(nn.Module):  # computes what its instance says: its type stands for no one activation
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return torch.relu(x) if self.kind == "relu" else torch.tanh(x)


def test_parameter_free_activation_classes_are_recognized_by_what_they_compute():
    from netsurgeon.graph.state import trace_info
    model = nn.Sequential(nn.Linear(8, 8), _NewGelu(), nn.Linear(8, 8), _Configured("relu"), nn.Linear(8, 8),
                          _Configured("tanh"))
    gm = netsurgeon.trace(model, torch.randn(2, 8))
    assert trace_info(gm).recognized_activations == ["_NewGelu (as GELU(approximate='tanh'))"]
    topo = netsurgeon.topology(gm)
    acts = [topo.info(n).activation.name for n in topo.nodes_of(netsurgeon.OpKind.ACTIVATION)]
    assert acts == ["gelu_tanh", "relu", "tanh"]  # the configured class is traced through, per instance
