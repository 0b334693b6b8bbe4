"""Tracing Hugging Face transformers (issue 16 §4) with the same train/eval fidelity as timm models,
and ConViT, whose GPSA made tracing run for minutes."""
from __future__ import annotations

import sys
import warnings

import pytest
import timm
import torch
import torch.nn as nn

import netsurgeon
from netsurgeon import TraceError
from netsurgeon.graph.state import trace_info

from harness.broad_zoo import max_rel, train_eval_outputs

tf = pytest.importorskip("transformers", reason="Hugging Face models need the 'hf' extra (transformers)")

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
             max_position_embeddings=64)
NAMES = ["bert", "gpt2", "llama"]


def _build(name: str, seed: int = 0) -> nn.Module:
    """The configs of benchmarks/harness/broad_zoo.py's ``_hf_model``."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "bert":
            return tf.BertModel(tf.BertConfig(**SMALL))
        if name == "gpt2":
            return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=2))


def _ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_rel(ref, got) -> float:
    """Largest relative difference over the eager output's tensors; the traced output must have
    the same keys in the same order, and None where eager holds a cache object."""
    assert list(ref.keys()) == list(got.keys())
    errs = []
    for k in ref.keys():
        if isinstance(ref[k], torch.Tensor):
            scale = max(1.0, float(ref[k].detach().abs().max()))
            errs.append(float((ref[k] - got[k]).detach().abs().max()) / scale)
        else:
            assert got[k] is None, k  # the KV cache: the trace runs with use_cache=False
    return max(errs)


@pytest.fixture(scope="module", params=NAMES)
def traced(request):
    model = _build(request.param)
    return request.param, model, netsurgeon.trace(model, _ids())


def test_traced_transformer_matches_eager_in_train_and_eval(traced):
    name, model, gm = traced
    x = _ids()
    outs = {}
    for mode, (ref, got) in train_eval_outputs(model, gm, x).items():
        assert _max_rel(ref, got) <= 1e-5, f"{name} train={mode}"
        outs[mode] = next(iter(got.values()))
    if name != "llama":  # llama's config has no dropout: its modes compute the same thing
        assert not torch.allclose(outs[True], outs[False], atol=1e-4)
    model.eval()
    gm.eval()
    other = _ids(batch=3, length=9, seed=2)  # sizes stay symbolic in the graph
    with torch.no_grad():
        assert _max_rel(model(other), gm(other)) <= 1e-5


def test_traced_transformer_classifies_and_round_trips_its_state_dict(traced):
    name, model, gm = traced
    topo = netsurgeon.topology(gm)
    assert topo.kind_counts()["linear"] > 0
    assert set(gm.state_dict()) == set(model.state_dict())
    twin = _build(name, seed=1).eval()  # other weights, same structure
    twin.load_state_dict(gm.state_dict())
    gm.load_state_dict(twin.state_dict())
    gm.eval()
    with torch.no_grad():
        assert _max_rel(twin(_ids()), gm(_ids())) == 0.0


def test_branches_taken_on_shapes_are_listed_with_the_transformers_line(traced):
    _, _, gm = traced
    specialized = trace_info(gm).specialized
    assert specialized and all("transformers" in s and " -> " in s for s in specialized), specialized


def test_a_transformer_traces_without_example_inputs_and_returns_the_eager_keys():
    cfg = tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)
    model = tf.GPT2LMHeadModel(cfg).eval()
    gm = netsurgeon.trace(model)
    ids = torch.zeros(1, 4, dtype=torch.long)
    out = gm(ids)
    assert list(out) == ["logits", "cache"] and out["cache"] is None
    assert torch.equal(out["logits"], model(ids).logits)


def test_eager_attention_masks_built_from_proxies_trace():
    """torch.finfo(x.dtype) and torch.ones(x.shape[0], n) reject proxies before __torch_function__."""
    cfg = tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=256, n_positions=16, attn_implementation="eager")
    model = tf.GPT2LMHeadModel(cfg)
    gm = netsurgeon.trace(model, _ids(length=8))
    for mode in (True, False):
        model.train(mode)
        gm.train(mode)
        torch.manual_seed(3)
        ref = model(_ids(length=8))
        torch.manual_seed(3)
        assert _max_rel(ref, gm(_ids(length=8))) <= 1e-6
    assert torch.finfo in {n.target for n in gm.graph.nodes}  # the mask's dtype is read when it runs


def test_concrete_args_are_fixed_keyword_arguments_of_forward():
    model = _build("bert").eval()
    gm = netsurgeon.trace(model, _ids(), concrete_args={"output_hidden_states": True})
    with torch.no_grad():
        ref, got = model(_ids(), output_hidden_states=True), gm(_ids())
    assert list(got) == list(ref.keys()) and len(got["hidden_states"]) == 3
    for a, b in zip([ref.last_hidden_state, *ref.hidden_states], [got["last_hidden_state"], *got["hidden_states"]]):
        assert torch.equal(a, b)
    # the capture hooks transformers installs once (it marks the model) were not installed again by each trace
    assert len(model.encoder.layer[0]._forward_hooks) == 1


@pytest.mark.parametrize("kwargs, expected", [
    ({"example_inputs": (_ids(),) * 20}, "20 example inputs given"),
    ({"example_inputs": _ids(), "concrete_args": {"input_ids": None}}, "'input_ids', which is also an example input"),
])
def test_front_end_errors_are_one_line_with_a_remedy(kwargs, expected):
    with pytest.raises(TraceError) as info:
        netsurgeon.trace(_build("llama"), **kwargs)
    msg = str(info.value)
    assert expected in msg and "remedy:" in msg and "\n" not in msg


def test_a_model_holding_a_transformer_traces_through_it():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = _build("bert")
            self.head = nn.Linear(64, 3)

        def forward(self, ids):
            return self.head(self.bert(ids).last_hidden_state[:, 0])

    model = Classifier()
    gm = netsurgeon.trace(model, _ids())
    for mode in (True, False):
        model.train(mode)
        gm.train(mode)
        torch.manual_seed(3)
        ref = model(_ids())
        torch.manual_seed(3)
        assert torch.equal(ref, gm(_ids()))


@pytest.mark.timeout(120)
def test_convit_traces_through_its_gpsa_modules_twice():
    """GPSA (timm's register_notrace_module) builds its relative positions by item assignment into a
    tensor sized by the token count and caches them in a buffer: traced as copies, the proxy put back
    after each trace and the buffer after the eager check, so no GPSA is a leaf, the model is left as
    it was, and a second trace of it (what transform does after analyze) gives the same graph."""
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    before = model.blocks[0].attn.rel_indices
    first, second = netsurgeon.trace(model, x), netsurgeon.trace(model, x)
    assert trace_info(first).auto_leaves == [] and trace_info(second).auto_leaves == []
    assert model.blocks[0].attn.rel_indices is before
    assert first.code == second.code
    for ref, got in train_eval_outputs(model, second, x).values():
        assert max_rel(ref, got) <= 1e-6


@pytest.mark.timeout(60)
def test_a_branch_after_a_parameter_is_decided_without_recursing():
    """Deciding a branch runs the graph so far; its GraphModule copied the root's parameters as
    fx proxies, so the run extended the trace and ``bool`` of its result recursed (ConViT: minutes)."""
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.ones(4))

        def forward(self, x):
            y = x + self.p
            return y * 2 if y.shape[0] > 1 else y

    gm = netsurgeon.trace(Gate(), torch.randn(2, 4))
    assert len(trace_info(gm).specialized) == 1
    assert torch.equal(gm(torch.ones(2, 4)), torch.full((2, 4), 4.0))


def test_netsurgeon_traces_without_transformers_installed(monkeypatch):
    """The front-end is imported only for models with transformers modules."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # ``import transformers`` now fails
    monkeypatch.delitem(sys.modules, "netsurgeon.graph.hf", raising=False)
    gm = netsurgeon.trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), torch.randn(1, 2))
    assert "netsurgeon.graph.hf" not in sys.modules and len(trace_info(gm).specialized) == 0
