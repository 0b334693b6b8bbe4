"""``attention_shaping`` (issue 17 §2): E-SPA / U-SPA patterns and value-skipinit, on hand-written,
timm, Hugging Face and ``nn.TransformerEncoder`` transformers; the pattern math; refusals by name."""
from __future__ import annotations

import operator
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from netsurgeon.errors import PassOptionError, UnsupportedNodeError
from netsurgeon.graph.state import get_report, trace_info
from netsurgeon.kernels import attention as pat
from netsurgeon.layers import ShapedAttention, ValueSkipInit


# ------------------------------------------------------------------------------------------ a small causal LM

class Block(nn.Module):
    def __init__(self, d: int, h: int, written: bool) -> None:
        super().__init__()
        self.h, self.written = h, written
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("tril", torch.tril(torch.ones(64, 64)))
        self.softmax = nn.Softmax(dim=-1)  # "temperature": Swin's softmax module and XCA's per-head temperature
        self.temperature = nn.Parameter(0.5 + torch.rand(h, 1, 1))

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        if self.written == "temperature":
            s = (q @ k.transpose(-2, -1)) * self.temperature * (c // self.h) ** -0.5
            s = s.masked_fill(self.tril[:t, :t] == 0, float("-inf"))
            y = self.softmax(s) @ v
        elif self.written:  # nanoGPT's form; "permuted": LeViT's key, permuted to [b, h, d, t] without a transpose
            kt = k.permute(0, 1, 3, 2) if self.written == "permuted" else k.transpose(-2, -1)
            s = q @ kt * (c // self.h) ** -0.5
            s = s.masked_fill(self.tril[:t, :t] == 0, float("-inf"))
            y = F.softmax(s, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class LM(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 64, depth: int = 4, h: int = 4, t: int = 16,
                 written: bool = False) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, t, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, h, written) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(ids) + self.pos)))


def _lm(written: bool = False, seed: int = 0, **kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return LM(written=written, **kw), torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))


def _modules(gm: nn.Module, kind: type = ShapedAttention) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, kind)]


class _Inputs(torch.fx.Interpreter):
    """The arguments each attention module receives."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.args: dict[str, tuple] = {}

    def call_module(self, target, args, kwargs):
        if isinstance(self.module.get_submodule(target), (ShapedAttention, ValueSkipInit)):
            self.args[target] = args
        return super().call_module(target, args, kwargs)


# ------------------------------------------------------------------------------------------ pattern math

@pytest.mark.parametrize("family", pat.FAMILIES)
@pytest.mark.parametrize("causal", [True, False])
def test_transitions_carry_the_schedule_exactly(family: str, causal: bool) -> None:
    t, blocks = 24, 6
    rhos = pat.schedule(family, t, blocks, 0.4)
    assert rhos[0] == 0.0 and all(a < b for a, b in zip(rhos, rhos[1:]))
    assert pat.mean_off_diagonal(pat.family_kernel(family, t, rhos[-1])) == pytest.approx(0.4, abs=1e-9)
    sigma = pat.family_kernel(family, t, 0.0)
    for l in range(1, blocks + 1):
        a = pat.transition(pat.family_kernel(family, t, rhos[l - 1]), pat.family_kernel(family, t, rhos[l]), causal)
        assert a.min() >= 0.0
        if causal:
            assert np.allclose(a, np.tril(a))
        d, b = pat.as_softmax(a, causal)
        e = np.exp(b - b.max(axis=1, keepdims=True))
        realized = d[:, None] * e / e.sum(axis=1, keepdims=True)
        assert np.abs(realized - a).max() < 1e-12
        sigma = realized @ sigma @ realized.T
        assert np.abs(sigma - pat.family_kernel(family, t, rhos[l])).max() < 1e-9
    assert np.allclose(np.diag(sigma), 1.0)


def test_pattern_errors() -> None:
    with pytest.raises(ValueError, match="target cosine"):
        pat.final_rho("e-spa", 8, 1.0)
    with pytest.raises(pat.PatternError, match="negative"):  # a correlation that decreases needs negative weights
        pat.transition(pat.family_kernel("u-spa", 8, 0.5), pat.family_kernel("u-spa", 8, 0.2), causal=True)


# ------------------------------------------------------------------------------------------ the modules

def test_shaped_attention_module() -> None:
    t = 12
    rhos = pat.schedule("e-spa", t, 3, 0.3)
    a = pat.transition(pat.family_kernel("e-spa", t, rhos[0]), pat.family_kernel("e-spa", t, rhos[1]), True)
    d, b = pat.as_softmax(a, True)
    m = ShapedAttention(torch.tensor(b), torch.tensor(d), heads=2, causal=True)
    assert torch.allclose(m.init_matrix()[1], torch.tensor(a), atol=1e-6)
    q = torch.zeros(3, 2, t, 8)
    k, v = torch.randn(3, 2, t, 8), torch.randn(3, 2, t, 8, requires_grad=True)
    out = m(q, k, v)
    assert torch.allclose(out, torch.tensor(a, dtype=torch.float32) @ v, atol=1e-5)
    out.square().sum().backward()
    assert m.bias.grad is not None and m.bias.grad.abs().sum() > 0  # the position bias trains
    # causal: position 4's output does not depend on later values, even with a trained bias
    with torch.no_grad():
        m.bias.add_(torch.randn_like(m.bias))
        v2 = v.detach().clone()
        v2[..., 5:, :] += 1.0
        assert torch.allclose(m(q, k, v.detach())[..., :5, :], m(q, k, v2)[..., :5, :])
    with pytest.raises(RuntimeError, match="at most 12 tokens"):
        m(torch.zeros(1, 2, 13, 8), torch.zeros(1, 2, 13, 8), torch.zeros(1, 2, 13, 8))


def test_value_skipinit_module_is_the_identity_at_init() -> None:
    m = ValueSkipInit(heads=2, causal=True)
    q, k, v = torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    assert torch.equal(m(q, k, v), v)
    assert torch.equal(m.init_matrix(10)[0], torch.eye(10, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ the pass

@pytest.mark.parametrize("written", [False, True])
def test_espa_on_a_causal_lm(written: bool) -> None:
    model, ids = _lm(written)
    gm = netsurgeon.transform(model, ["attention_shaping"], example_inputs=(ids,))
    mods = _modules(gm)
    assert len(mods) == 4 and all(m.causal and m.length == 16 for m in mods)
    rhos = pat.schedule("e-spa", 16, 4, 0.3)
    for l, m in enumerate(mods, start=1):  # the l-th block carries the schedule's kernel l-1 to l
        want = pat.transition(pat.family_kernel("e-spa", 16, rhos[l - 1]), pat.family_kernel("e-spa", 16, rhos[l]),
                              causal=True)
        assert np.abs(m.init_matrix()[0].numpy() - want).max() < 1e-6
    rec = get_report(gm).passes[-1]
    assert len(rec.changes) == 4 and all("query rows zeroed: 64 of 192" in c.what for c in rec.changes)
    cap = _Inputs(gm)
    cap.run(ids)
    for args in cap.args.values():  # the query is exactly zero: the attention matrix is the pattern
        q, k, v = args[:3]
        assert torch.count_nonzero(q) == 0 and torch.count_nonzero(k) > 0
    assert torch.isfinite(gm(ids)).all()


def test_sdpa_and_written_out_attention_become_the_same_function() -> None:
    a, ids = _lm(False)
    b, _ = _lm(True)
    b.load_state_dict(a.state_dict())
    ga = netsurgeon.transform(a, ["attention_shaping"], example_inputs=(ids,))
    gb = netsurgeon.transform(b, ["attention_shaping"], example_inputs=(ids,))
    assert torch.allclose(ga(ids), gb(ids), atol=1e-5)


def _shaped_like_sdpa(written: str) -> tuple[nn.Module, torch.Tensor]:
    """The LM written as ``written``, with the sdpa LM's weights: after attention_shaping both have 4 shaped
    blocks and compute the same function. Returns the written model (unshaped) and the ids."""
    a, ids = _lm(False)
    b, _ = _lm(written)
    b.load_state_dict(a.state_dict())
    ga = netsurgeon.transform(a, ["attention_shaping"], example_inputs=(ids,))
    gb = netsurgeon.transform(copy_of(b), ["attention_shaping"], example_inputs=(ids,))
    assert len(_modules(gb)) == 4
    assert torch.allclose(ga(ids), gb(ids), atol=1e-5)
    return b, ids


def test_a_key_permuted_to_d_by_t_is_read_as_the_key() -> None:
    """``q @ k.permute(0, 1, 3, 2)`` (LeViT writes ``k.permute(0, 2, 3, 1)``): the right operand is ``kᵀ``
    whatever op made it; the pass transposes it back and shapes the site like the sdpa one."""
    _shaped_like_sdpa("permuted")


def test_a_softmax_module_and_a_per_head_temperature_are_read() -> None:
    """``nn.Softmax`` modules (timm's Swin, DaViT) are softmax attention like the functional form (they were
    missed: the pass reported no attention and left the blocks unshaped); a per-head temperature ``[h, 1, 1]``
    on the scores (XCA, Swin V2's logit scale) moves onto the query: ``(t ⊙ q) kᵀ = t ⊙ (q kᵀ)``, exactly."""
    b, ids = _shaped_like_sdpa("temperature")
    # the temperature is applied, not dropped: with the logit gain at 1 and the pattern's bias and row scales
    # neutral, the shaped block computes the original attention
    c, _ = _lm("temperature")
    c.load_state_dict(b.state_dict())
    gc = netsurgeon.transform(c, [("attention_shaping", {"query": "zero-gain"})], example_inputs=(ids,))
    with torch.no_grad():
        for m in _modules(gc):
            m.logit_gain.fill_(1.0)
            m.bias.zero_()
            m.row_scale.fill_(1.0)
    assert torch.allclose(gc(ids), c(ids), atol=1e-5)

    class Keyed(nn.Module):  # a scale that varies along the keys cannot move onto the query
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.w = nn.Linear(16, 48), nn.Parameter(torch.rand(5))

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch.softmax((q @ k.transpose(-2, -1)) * self.w, dim=-1) @ v

    with pytest.raises(UnsupportedNodeError, match="matmul.*varies along the keys"):
        netsurgeon.transform(Keyed(), ["attention_shaping"], example_inputs=(torch.randn(2, 5, 16),))


def test_values_on_the_left_are_read() -> None:
    """``v @ Aᵀ`` with ``v`` in ``[.., d, T]`` layout (EfficientViT's cascaded group attention) is attention:
    it was missed (the model passed as having none); the rewrite computes ``(A @ vᵀ)ᵀ``."""
    class Att(nn.Module):
        def __init__(self, left: bool) -> None:
            super().__init__()
            self.qkv, self.left = nn.Linear(16, 48), left

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            a = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
            return (v.transpose(-2, -1) @ a.transpose(-2, -1)).transpose(-2, -1) if self.left else a @ v

    torch.manual_seed(0)
    a, b = Att(False), Att(True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 16)
    ga = netsurgeon.transform(a, ["attention_shaping"], example_inputs=(x,))
    gb = netsurgeon.transform(b, ["attention_shaping"], example_inputs=(x,))
    assert len(_modules(gb)) == 1
    assert torch.allclose(ga(x), gb(x), atol=1e-6)


class _TalkingHeads(nn.Module):
    """Talking-heads attention, CaiT's form (linear layers between permutes) or EfficientFormerV2's (1x1 convs
    over the heads, a position bias added before the logit mix)."""

    def __init__(self, conv: bool, h: int = 4, t: int = 6) -> None:
        super().__init__()
        self.qkv, self.conv, self.h = nn.Linear(16, 48), conv, h
        self.pre = nn.Conv2d(h, h, 1) if conv else nn.Linear(h, h)
        self.post = nn.Conv2d(h, h, 1) if conv else nn.Linear(h, h)
        self.pos = nn.Parameter(torch.randn(h, t, t))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        a = q @ k.transpose(-2, -1) * 0.5
        if self.conv:
            a = self.post(self.pre(a + self.pos).softmax(dim=-1))
        else:
            a = self.pre(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
            a = self.post(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return (a @ v).transpose(1, 2).reshape(b, t, c)


class _Calls(torch.fx.Interpreter):
    """Each attention module's arguments and keyword arguments."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.calls: dict[str, tuple] = {}

    def call_module(self, target, args, kwargs):
        if isinstance(self.module.get_submodule(target), ShapedAttention):
            self.calls[target] = (args, kwargs)
        return super().call_module(target, args, kwargs)


@pytest.mark.parametrize("conv", [False, True], ids=["cait", "efficientformerv2"])
def test_talking_heads_keep_their_mixes_and_start_at_the_pattern(conv: bool) -> None:
    """Talking heads (a head mix between the scores and the softmax, and one after it) are shaped: the logit
    mix is kept (with a position bias added before it mixed into the offset), the weight mix starts as the
    identity, so the matrix at initialization is the pattern; with the query, the pattern's bias and the
    weight mix put back, the block is the model's attention again."""
    x = torch.randn(2, 6, 16)
    torch.manual_seed(0)
    model = _TalkingHeads(conv)
    gm = netsurgeon.transform(copy_of(model), ["attention_shaping"], example_inputs=(x,))
    (name, m), = [(n, m) for n, m in gm.named_modules() if isinstance(m, ShapedAttention)]
    assert m.logit_mix is not None and torch.equal(m.weight_mix.detach(), torch.eye(4))
    spy = _Calls(gm)
    spy.run(x)
    (q, k, v), kwargs = spy.calls[name]
    assert torch.count_nonzero(q) == 0 and (("premix_mask" in kwargs) == conv)
    assert torch.allclose(m(q, k, v, **kwargs), (m.init_matrix().float() @ v), atol=1e-5)  # the pattern, exactly
    a = m.init_matrix().numpy()
    rhos = pat.schedule("e-spa", 6, 1, 0.3)
    want = pat.transition(pat.family_kernel("e-spa", 6, rhos[0]), pat.family_kernel("e-spa", 6, rhos[1]), False)
    assert np.allclose(a[0] / a[0].sum(1, keepdims=True), want / want.sum(1, keepdims=True), atol=1e-6)

    g2 = netsurgeon.transform(copy_of(model), [("attention_shaping", {"query": "zero-gain"})], example_inputs=(x,))
    m2 = _modules(g2)[0]
    with torch.no_grad():
        m2.logit_gain.fill_(1.0)
        m2.bias.zero_()
        m2.row_scale.fill_(1.0)
        w = model.post.weight[:, :, 0, 0] if conv else model.post.weight
        m2.weight_mix.copy_(w)
        m2.weight_mix_bias.copy_(model.post.bias)
    assert torch.allclose(g2(x), model(x), atol=1e-5)
    with pytest.raises(UnsupportedNodeError, match="talking heads.*value-skipinit"):
        netsurgeon.transform(copy_of(model), [("attention_shaping", {"mode": "value-skipinit"})], example_inputs=(x,))


def copy_of(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model)


def test_zero_gain_matches_zero_weights_at_init_and_keeps_the_weights() -> None:
    a, ids = _lm()
    b, _ = _lm()
    ga = netsurgeon.transform(a, ["attention_shaping"], example_inputs=(ids,))
    gb = netsurgeon.transform(b, [("attention_shaping", {"query": "zero-gain"})], example_inputs=(ids,))
    assert torch.allclose(ga(ids), gb(ids), atol=1e-5)
    assert torch.count_nonzero(gb.get_submodule("blocks.0.qkv").weight[:64]) == 64 * 64  # untouched
    assert all(m.logit_gain is not None and float(m.logit_gain.detach().abs().max()) == 0.0 for m in _modules(gb))


def test_shaped_lm_trains_query_bias_and_all() -> None:
    model, ids = _lm()
    gm = netsurgeon.transform(model, ["remove_norms", "remove_skips", "input_norm", "attention_shaping", "tat"],
                              example_inputs=(ids,))
    loss = F.cross_entropy(gm(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    qkv = gm.get_submodule("blocks.0.qkv")
    assert torch.count_nonzero(qkv.weight[:64]) == 0 and qkv.weight.grad[:64].abs().sum() > 0  # zeroed rows train
    assert all(m.bias.grad is not None and m.bias.grad.abs().sum() > 0 for m in _modules(gm))
    sd = gm.state_dict()
    assert any(k.endswith("ns_attention_0.bias") for k in sd) and any(k.endswith("row_scale") for k in sd)


def test_u_spa_and_value_skipinit() -> None:
    model, ids = _lm()
    gu = netsurgeon.transform(model, [("attention_shaping", {"mode": "u-spa", "final_cosine": 0.5})],
                              example_inputs=(ids,))
    last = _modules(gu)[-1].init_matrix()[0].numpy()
    rhos = pat.schedule("u-spa", 16, 4, 0.5)
    want = pat.transition(pat.family_kernel("u-spa", 16, rhos[3]), pat.family_kernel("u-spa", 16, rhos[4]), True)
    assert np.abs(last - want).max() < 1e-6
    model, ids = _lm()
    gv = netsurgeon.transform(model, [("attention_shaping", {"mode": "value-skipinit"})], example_inputs=(ids,))
    mods = _modules(gv, ValueSkipInit)
    assert len(mods) == 4 and all(m.causal for m in mods)
    assert torch.count_nonzero(gv.get_submodule("blocks.0.qkv").weight[:64]) > 0  # value-skipinit keeps the query
    cap = _Inputs(gv)
    cap.run(ids)
    for target, args in cap.args.items():  # the attention output is the value
        assert torch.equal(gv.get_submodule(target)(*args), args[2])


def test_bad_options_are_refused() -> None:
    with pytest.raises(PassOptionError, match="mode"):
        netsurgeon.transform(nn.Linear(2, 2), [("attention_shaping", {"mode": "spa"})])
    with pytest.raises(PassOptionError, match="final_cosine"):
        netsurgeon.transform(nn.Linear(2, 2), [("attention_shaping", {"final_cosine": 1.0})])


def test_refusals_name_the_node() -> None:
    model, ids = _lm()
    with pytest.raises(UnsupportedNodeError, match="opaque leaf.*blocks_1"):
        netsurgeon.transform(netsurgeon.trace(model, (ids,), leaf_modules=["blocks.1"]), ["attention_shaping"],
                             example_inputs=(ids,))

    class Odd(nn.Module):  # scores passed through an op the pass cannot read
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch.softmax(torch.tanh(q @ k.transpose(-2, -1)), dim=-1) @ v

    with pytest.raises(UnsupportedNodeError, match="softmax.*tanh"):
        netsurgeon.transform(Odd(), ["attention_shaping"], example_inputs=(torch.randn(2, 5, 16),))

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x, mask):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    mask = torch.ones(2, 5, 5, dtype=torch.bool)
    mask[1, :, 3:] = False
    with pytest.raises(UnsupportedNodeError, match="padding"):
        netsurgeon.transform(Padded(), ["attention_shaping"], example_inputs=(torch.randn(2, 5, 16), mask))


def test_cross_attention_is_left_and_reported() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.kv = nn.Linear(16, 16), nn.Linear(16, 32)

        def forward(self, x, memory):
            k, v = self.kv(memory).chunk(2, dim=-1)
            return F.scaled_dot_product_attention(self.q(x), k, v)

    gm = netsurgeon.transform(Cross(), ["attention_shaping"], example_inputs=(torch.randn(2, 5, 16),
                                                                            torch.randn(2, 5, 16)))
    rec = get_report(gm).passes[-1]
    assert not _modules(gm) and "cross-attention" in rec.skipped[0].why


def test_no_attention_is_a_note() -> None:
    gm = netsurgeon.transform(nn.Sequential(nn.Linear(4, 4)), ["attention_shaping"],
                              example_inputs=(torch.randn(2, 4),))
    assert "no self-attention" in get_report(gm).passes[-1].notes[0]


# ------------------------------------------------------------------------------------------ real models

def test_timm_vit_bidirectional_pipeline() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=4)
    x = torch.randn(2, 3, 32, 32)
    shaping = ["remove_norms", "remove_skips", "input_norm", "attention_shaping"]
    gm = netsurgeon.transform(model, shaping, example_inputs=(x,))
    mods = _modules(gm)
    assert len(mods) == 4 and not any(m.causal for m in mods) and mods[0].length == 5  # 4 patches + cls
    first = mods[0].init_matrix()[0].numpy()
    assert np.allclose(first, first.T, atol=1e-6)  # bidirectional patterns are symmetric square roots
    gm = netsurgeon.transform(model, shaping + ["tat"], example_inputs=(x,))
    mods = _modules(gm)  # tat refits the rows to the tokens' kernel (the cls token's q differs): softmax kept
    p = mods[0].init_matrix()[0].numpy()
    p = p / p.sum(axis=1, keepdims=True)
    assert np.allclose(p, first / first.sum(axis=1, keepdims=True), atol=1e-6)
    assert torch.isfinite(gm(x)).all()


def test_transformer_encoder_pipeline() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    x = torch.randn(2, 10, 32)
    gm = netsurgeon.trace(model, (x,))
    assert len(trace_info(gm).written_out) == 4  # nn.MultiheadAttention written out
    model.eval()
    gm.eval()
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 layers are too shallow for eta = 0.9: tat says so
        out = netsurgeon.transform(model, ["remove_norms", "remove_skips", "input_norm", "attention_shaping", "tat"],
                                   example_inputs=(x,))
    assert len(_modules(out)) == 4 and torch.isfinite(out(x)).all()
    rec = {p.name: p for p in get_report(out).passes}
    assert len(rec["remove_skips"].changes) == 8  # both residuals of every layer


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_hugging_face_pipelines(name: str) -> None:
    pytest.importorskip("transformers", reason="Hugging Face models need the 'hf' extra (transformers)")
    from harness.broad_zoo import _hf_model
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _hf_model(name)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    gm = netsurgeon.transform(model, ["remove_norms", "remove_skips", "input_norm", "attention_shaping", "tat"],
                              example_inputs=(ids,))
    mods = _modules(gm)
    assert len(mods) == 2 and all(m.causal == (name != "bert") for m in mods)
    out = gm(ids)
    out = out["logits"] if "logits" in out else out["last_hidden_state"]
    assert torch.isfinite(out).all()


def test_mode_dependent_attention_dropout_is_kept() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2, attn_drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    gm = netsurgeon.trace(model, (x,))
    info = trace_info(gm)
    assert not info.auto_leaves and len(info.mode_dropouts) == 2  # attention stays in the graph
    gm.eval()
    model.eval()
    assert torch.equal(gm(x), model(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x))  # dropout acts in training mode


def test_orthogonal_init_after_shaping_keeps_the_zeroed_query() -> None:
    model, ids = _lm()
    gm = netsurgeon.transform(model, ["attention_shaping", ("orthogonal_init", {"seed": 0})], example_inputs=(ids,))
    qkv = gm.get_submodule("blocks.2.qkv")
    assert torch.count_nonzero(qkv.weight[:64]) == 0 and torch.count_nonzero(qkv.weight[64:]) > 0
    assert any("query rows" in n for n in get_report(gm).passes[-1].notes)


def test_conv_projections_position_biases_and_a_shared_query_fall_back_by_name():
    """A 1x1-conv query projection is zeroed by its output channels; a model's own relative position
    bias is subtracted from the pattern's at initialization (so softmax(B + M) is the pattern); a query
    without rows of its own starts at zero through a logit gain, and the block says why."""
    class ConvAttn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Conv2d(16, 48, 1)
            self.rel = nn.Parameter(torch.randn(2, 9, 9))  # a per-head relative position bias, trainable

        def forward(self, x):
            b, c, h, w = x.shape
            q, k, v = self.qkv(x).reshape(b, 3, 2, 8, h * w).transpose(-2, -1).unbind(1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel)
            return y.transpose(-2, -1).reshape(b, c, h, w)

    class Shared(nn.Module):  # the query is the input itself: no projection of its own
        def __init__(self) -> None:
            super().__init__()
            self.kv = nn.Linear(16, 32)

        def forward(self, x):
            k, v = self.kv(x).chunk(2, dim=-1)
            return F.scaled_dot_product_attention(x, k, v)

    torch.manual_seed(0)
    model, x = ConvAttn(), torch.randn(2, 16, 3, 3)
    gm = netsurgeon.transform(model, ["attention_shaping"], example_inputs=(x,))
    (mod,) = _modules(gm)
    assert torch.count_nonzero(gm.get_submodule("qkv").weight[:16]) == 0  # the query channels
    assert torch.count_nonzero(gm.get_submodule("qkv").weight[16:]) > 0
    want = pat.transition(np.eye(9), pat.family_kernel("e-spa", 9, pat.schedule("e-spa", 9, 1, 0.3)[1]), False)
    assert np.abs(mod.init_matrix().numpy() - want).max() < 1e-5  # the offset included
    cap = _Inputs(gm)
    cap.run(x)
    (args,) = cap.args.values()
    logits = mod.bias + model.rel  # what the call adds at initialization (zero query-key logits)
    a = torch.softmax(logits.double(), -1) * mod.row_scale[:, None].double()
    assert torch.allclose(a[0], torch.tensor(want), atol=1e-5) and torch.allclose(a[1], torch.tensor(want), atol=1e-5)
    assert "own position bias" in get_report(gm).passes[-1].changes[0].what

    gs = netsurgeon.transform(Shared(), ["attention_shaping"], example_inputs=(torch.randn(2, 5, 16),))
    (mod,) = _modules(gs)
    what = get_report(gs).passes[-1].changes[0].what
    assert mod.logit_gain is not None and "logit gain 0" in what and "no linear projection" in what


def test_tat_refits_the_rows_so_every_token_keeps_its_q():
    """The MLPs between shaped blocks raise the cosines the patterns were built for, so q would grow
    with depth and position; tat refits each block's row scales to the kernel it now receives from
    the example tokens."""
    torch.manual_seed(0)
    model = LM(vocab=4096, d=128, depth=8)
    ids = torch.randperm(4096, generator=torch.Generator().manual_seed(1))[:64].reshape(4, 16)
    passes = ["remove_norms", "remove_skips", "input_norm", ("orthogonal_init", {"seed": 0}), "attention_shaping",
              "tat"]
    gm = netsurgeon.transform(model, passes, example_inputs=(ids,))
    note = next(n for n in get_report(gm).passes[-1].notes if "rows rescaled" in n)
    assert float(note.split("removed: ")[1].split("x")[0]) > 1.01  # there was a spread to remove
    tk = netsurgeon.token_kernels(gm, (ids,))  # the kernel of the example tokens, as the fit saw it
    for node in tk.attention:
        q = np.diag(tk.matrix(node, "predicted"))
        assert q.max() / q.min() < 1 + 1e-6 and abs(q.mean() - 1) < 0.05, node  # this network's own gains


def test_unshaped_cross_attention_is_a_product_whose_value_carries_the_signal():
    """CaiT/CrossViT-style class attention (one query over all tokens) is left by attention_shaping;
    tat then follows it as a product of signals whose main operand is the value, not the softmax."""
    from netsurgeon.analysis.targets import main_operand

    class ClassAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.kv, self.fc = nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(16, 16)

        def forward(self, x):
            q = self.q(x[:, :1])
            k, v = self.kv(x).chunk(2, dim=-1)
            a = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
            return self.fc(torch.relu(a @ v))

    x = torch.randn(2, 6, 16)
    gm = netsurgeon.transform(ClassAttention(), ["attention_shaping"], example_inputs=(x,))
    assert "cross-attention" in get_report(gm).passes[-1].skipped[0].why
    topo = netsurgeon.topology(gm)
    product = next(n for n in topo.graph if topo.info(n).kind is netsurgeon.OpKind.MULTIPLY
                   and topo.graph.nodes[n]["signal_operands"][0].startswith("softmax"))
    v = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 1
             and n.args[0].op == "call_method" and n.args[0].target == "chunk")
    assert main_operand(topo, product) == v.name  # v, the chunk's second half
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        netsurgeon.transform(ClassAttention(), ["input_norm", "tat"], example_inputs=(x,))  # completes
