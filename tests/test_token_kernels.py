"""Token kernels of sequence models (issue 17 §1, docs/transformers.md): the T x T Gram of one
sequence's tokens, measured and predicted at every node with a token axis."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from netsurgeon.analysis.token_kernels import TokenAnalysis, token_kernels
from netsurgeon.errors import InvalidArgumentError, MissingAnalysisError, UnknownNodeError
from netsurgeon.kernels import attention as patterns
from netsurgeon.layers import ShapedAttention, ValueSkipInit

WIDTH, HEADS, DEPTH, T, VOCAB = 256, 4, 24, 32, 16384


# ---------------------------------------------------------------- models
class Block(nn.Module):
    """No skip, no norm: fused qkv -> attention -> proj -> fc1 -> act -> fc2."""

    def __init__(self, width: int, heads: int, act: nn.Module, attention: nn.Module | None = None,
                 causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.attn = attention
        self.proj = nn.Linear(width, width)
        self.fc1, self.act, self.fc2 = nn.Linear(width, width), act, nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal) if self.attn is None else self.attn(q, k, v)
        return self.fc2(self.act(self.fc1(self.proj(y.transpose(1, 2).reshape(b, n, c)))))


class CausalLM(nn.Module):
    """Token embedding, then ``depth`` skip-free, norm-free blocks."""

    def __init__(self, blocks: list[nn.Module], vocab: int = VOCAB, width: int = WIDTH) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.emb(ids))


def _orthogonal(lin: nn.Linear, gain: float = 1.0) -> None:
    with torch.no_grad():
        nn.init.orthogonal_(lin.weight, gain=gain)
        lin.bias.zero_()


def vanilla(act: type[nn.Module], depth: int = DEPTH, seed: int = 0) -> CausalLM:
    """Orthogonal weights, zero biases, the MLP's second layer with gain sqrt(2)."""
    torch.manual_seed(seed)
    model = CausalLM([Block(WIDTH, HEADS, act()) for _ in range(depth)])
    for blk in model.blocks:
        for lin in (blk.qkv, blk.proj, blk.fc1):
            _orthogonal(lin)
        _orthogonal(blk.fc2, math.sqrt(2.0))
    return model


def espa_rhos(depth: int = DEPTH, t: int = T, final: float = 0.3) -> list[float]:
    return patterns.schedule("e-spa", t, depth, final)


def shaped_attention(rho_in: float, rho_out: float, t: int, heads: int, causal: bool, family: str = "e-spa"
                     ) -> ShapedAttention:
    a = patterns.transition(patterns.family_kernel(family, t, rho_in), patterns.family_kernel(family, t, rho_out),
                            causal=causal)
    d, b = patterns.as_softmax(a, causal=causal)
    return ShapedAttention(torch.tensor(b), torch.tensor(d), heads=heads, causal=causal, mode=family)


def espa(depth: int = DEPTH, seed: int = 0) -> CausalLM:
    """The same network with each sdpa replaced by an E-SPA ShapedAttention, built by hand as
    ``attention_shaping`` does: query rows of ``qkv`` zeroed, orthogonal key/value/proj/MLP
    weights, zero biases, and an identity activation in the MLP (its pair maps are the identity)."""
    torch.manual_seed(seed)
    rhos = espa_rhos(depth)
    model = CausalLM([Block(WIDTH, HEADS, nn.Identity(), shaped_attention(rhos[l], rhos[l + 1], T, HEADS, True))
                      for l in range(depth)])
    with torch.no_grad():
        for blk in model.blocks:
            for lin in (blk.qkv, blk.proj, blk.fc1, blk.fc2):
                _orthogonal(lin)
            blk.qkv.weight[:WIDTH].zero_()
            nn.init.orthogonal_(blk.qkv.weight[WIDTH:2 * WIDTH])
            nn.init.orthogonal_(blk.qkv.weight[2 * WIDTH:])
    return model


def _ids(batch: int = 4, t: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(123))


def block_outputs(tk: TokenAnalysis) -> list[str]:
    return [n for n in tk.nodes if n.startswith("blocks_") and n.endswith("_fc2")]


# ---------------------------------------------------------------- (1) rank collapse
@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU])
def test_vanilla_causal_transformer_collapses_in_prediction_and_measurement(act):
    tk = token_kernels(vanilla(act), _ids(), seeds=4)
    outs = block_outputs(tk)
    assert len(outs) == DEPTH and tk.start == "emb" and len(tk.attention) == DEPTH
    pred = np.array([tk.nodes[n].predicted_cos for n in outs])
    meas = np.array([tk.nodes[n].measured_cos for n in outs])
    se = np.array([tk.nodes[n].se for n in outs])
    assert pred[-1] > 0.9 and meas[-1] > 0.9  # rank collapse
    assert abs(tk.nodes["emb"].measured_cos) < 0.02  # from nearly orthogonal tokens
    for series, slack in ((pred, 1e-6), (meas, 3 * se[:-1] + 1e-3)):
        assert np.all(np.diff(series) >= -slack), series  # rising with depth
    assert pred[0] < 0.8 and pred[-1] - pred[0] > 0.2
    np.testing.assert_allclose(pred, meas, atol=0.02)
    for name in tk.attention:  # ordinary attention: A read from the run, not a fixed pattern
        node = tk.nodes[name]
        assert node.attention and node.status == "approximate" and "A measured" in node.reason


def test_uniform_causal_attention_is_exact_and_carries_per_token_q():
    """Zero queries make sdpa's attention the uniform causal average: for independent tokens of
    mean square q, token i's output has mean square q / (i + 1) and two outputs share
    q / (max(i, j) + 1) (a closed form); a ReLU after it keeps sqrt(q_i q_j) f(c_ij)."""
    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = nn.Linear(WIDTH, WIDTH, bias=False)
            nn.init.orthogonal_(self.v.weight)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(F.scaled_dot_product_attention(x * 0.0, x, self.v(x), is_causal=True))

    x = torch.randn(8, 12, WIDTH, generator=torch.Generator().manual_seed(0))
    tk = token_kernels(Mix(), x, start="independent")
    q = float(np.mean(np.diag(tk.matrix("x", "measured"))))
    i = np.arange(12)
    want = q / (np.maximum.outer(i, i) + 1)
    sdpa = tk.nodes["scaled_dot_product_attention"]
    assert sdpa.status == "exact" and "zero queries" in sdpa.reason
    np.testing.assert_allclose(tk.matrix("scaled_dot_product_attention"), want, rtol=1e-6)
    d = np.diag(want)
    c = np.clip(want / np.sqrt(np.outer(d, d)), -1, 1)
    relu = np.sqrt(np.outer(d, d)) * (np.sqrt(1 - c * c) + (math.pi - np.arccos(c)) * c) / (2 * math.pi)
    np.testing.assert_allclose(tk.matrix("act"), relu, rtol=1e-6)
    assert tk.nodes["act"].status == "exact"  # ReLU is positively homogeneous: unequal q are exact
    # measured: one finite-width network, within a few standard errors of the closed form
    for name in ("scaled_dot_product_attention", "act"):
        node = tk.nodes[name]
        assert abs(node.measured_cos - node.predicted_cos) < 4 * node.se + 1e-3


def test_unequal_token_q_through_a_non_homogeneous_activation_is_exact():
    class Mix(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(F.scaled_dot_product_attention(x * 0.0, x, x, is_causal=True))

    tk = token_kernels(Mix(), torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(0)), start="independent")
    node = tk.nodes["gelu"]
    assert node.status == "exact", node.reason
    s = tk.matrix("scaled_dot_product_attention")
    q = np.diag(s)
    assert np.ptp(q) > 0.5 * q.mean()  # the causal average gives the tokens very different q
    # every pair at its own two q: E[gelu(sqrt(q_i) u) gelu(sqrt(q_j) v)], corr(u, v) = c_ij, by quadrature
    z, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / math.sqrt(2 * math.pi)
    gelu = lambda v: 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))  # noqa: E731
    want = np.empty_like(s)
    for i in range(len(q)):
        for j in range(len(q)):
            c = s[i, j] / math.sqrt(q[i] * q[j])
            u = z[:, None] + 0 * z[None, :]
            v = c * z[:, None] + math.sqrt(max(1 - c * c, 0.0)) * z[None, :]
            want[i, j] = float(np.sum(w[:, None] * w[None, :] * gelu(math.sqrt(q[i]) * u) * gelu(math.sqrt(q[j]) * v)))
    np.testing.assert_allclose(tk.matrix("gelu"), want, rtol=1e-5, atol=1e-7)


def test_examples_are_predicted_one_by_one():
    """Examples whose tokens have different q: a per-token RMS norm and a fixed attention are exact
    per example, so the mean of the predicted kernels is the mean of the measured ones. (The
    example-mean kernel pushed through the norm is not: its tokens' q are averaged first.)"""
    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = netsurgeon.layers.LocationNorm(dim=-1, eps=1e-12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(x)
            return F.scaled_dot_product_attention(y * 0.0, y, y, is_causal=True)

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 1, 64, generator=g)
    x = base + 0.7 * torch.randn(6, 10, 64, generator=g)  # correlated tokens
    x = x * torch.linspace(0.2, 3.0, 6)[:, None, None] * torch.linspace(0.5, 2.0, 10)[None, :, None]
    tk = token_kernels(Mix(), x)
    for name in ("norm", "scaled_dot_product_attention"):
        assert tk.nodes[name].status == "exact"
        np.testing.assert_allclose(tk.matrix(name), tk.matrix(name, "measured"), rtol=1e-5, atol=1e-7)
    # the example-mean kernel's own normalization differs visibly: what the per-example rule avoids
    s = tk.matrix("x", "measured")
    d = np.sqrt(np.diag(s))
    assert np.abs(s / np.outer(d, d) - tk.matrix("norm", "measured")).max() > 1e-2


class Conv1D(nn.Module):
    """Hugging Face GPT-2's projection: ``x @ W + b`` with ``W`` ``[in, out]``, through ``view(-1, C)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(out)


class GPT2Block(nn.Module):
    def __init__(self, width: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn, self.c_proj = Conv1D(3 * width, width), Conv1D(width, width)
        self.c_fc, self.c_out = Conv1D(2 * width, width), Conv1D(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (a.view(b, t, self.heads, -1).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        return self.c_out(F.gelu(self.c_fc(self.c_proj(y))))


def test_projections_that_fold_tokens_into_the_batch_keep_the_token_axis():
    """GPT-2's Conv1D flattens [B, T, C] to [B*T, C] around an addmm: the tokens are followed through
    the merge, orthogonal_init initializes the addmm weights, and the query rows of the fused
    projection are known, so every node is predicted exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(GPT2Block(), GPT2Block()).eval()
    x = torch.randn(4, 12, 128, generator=torch.Generator().manual_seed(1))
    gm = netsurgeon.transform(model, [("orthogonal_init", {"seed": 0}), "attention_shaping"], example_inputs=(x,))
    w = gm.get_parameter("0.c_fc.weight").detach().double()  # [in, out] = [128, 256]: W Wᵀ = 2 I (gain sqrt 2)
    np.testing.assert_allclose((w @ w.T).numpy(), 2 * np.eye(128), atol=1e-6)
    tk = token_kernels(gm, (x,))
    assert len(tk.attention) == 2
    addmm = [n for n in tk.nodes if n.startswith("addmm")]
    assert len(addmm) == 8 and all(tk.nodes[n].tokens == 12 for n in addmm)
    values = [n for n in tk.nodes if n.startswith("getitem") and tk.nodes[n].reason.startswith("outputs 256:384 of addmm")]
    assert len(values) == 2  # the v of each block's fused projection, by its rows
    bad = {n: tk.nodes[n].reason for n in tk.nodes if tk.nodes[n].status == "approximate"}
    assert not bad, bad
    # the linear rule reads Conv1D's [in, out] weight the right way round: σw² = in · mean(W²)
    w = gm.get_parameter("0.c_attn.weight").detach().double()
    sw = w.shape[0] * float(w.pow(2).mean())
    assert 0.6 < sw < 0.7  # 2/3: the zeroed query third of an orthogonal projection that keeps q
    np.testing.assert_allclose(tk.matrix("addmm"), sw * tk.matrix("input_1", "measured"), rtol=1e-6)
    a = netsurgeon.analyze(gm, (x,))
    assert a.status("addmm")[0] == "exact"


# ---------------------------------------------------------------- (2) E-SPA
@pytest.mark.parametrize("seeds", [4, 16])
def test_espa_token_cosines_follow_the_schedule(seeds):
    model = espa()
    tk = token_kernels(model, _ids(), seeds=seeds, start="independent")
    rhos = espa_rhos()
    assert tk.start == "emb" and len(tk.attention) == DEPTH
    q0 = float(np.mean(np.diag(tk.matrix("emb", "measured"))))
    for l, name in enumerate(tk.attention):
        node = tk.nodes[name]
        kernel = patterns.family_kernel("e-spa", T, rhos[l + 1])
        assert node.status == "exact" and "init_matrix" in node.reason
        assert node.predicted_cos == pytest.approx(patterns.mean_off_diagonal(kernel), abs=1e-6)
        # q carried along too (float32 weights: sigma_w^2 = 1 to about 1e-7 per layer)
        np.testing.assert_allclose(tk.matrix(name), q0 * kernel, atol=1e-5 * q0)
    assert tk.nodes[tk.attention[-1]].predicted_cos == pytest.approx(0.3, abs=1e-6)
    for name in block_outputs(tk):  # the identity MLP and orthogonal layers keep it, exactly
        node = tk.nodes[name]
        assert node.status == "exact"
        z = (node.measured_cos - node.predicted_cos) / node.se
        assert abs(z) < 3, (name, node.measured_cos, node.predicted_cos, node.se)
    last = tk.nodes[block_outputs(tk)[-1]]
    assert last.se < 0.01 and abs(last.measured_cos - 0.3) < 0.02


def test_value_skipinit_and_bidirectional_shaped_attention_are_exact():
    """A bidirectional U-SPA block, then a ValueSkipInit block (the identity at initialization)."""
    t, width = 10, 64
    rho = 0.4
    u = shaped_attention(0.0, rho, t, 2, causal=False, family="u-spa")

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u, self.s = u, ValueSkipInit(heads=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            h = x.reshape(b, n, 2, c // 2).transpose(1, 2)
            y = self.u(h * 0.0, h, h)
            return self.s(y * 0.0, y, y).transpose(1, 2).reshape(b, n, c)

    tk = token_kernels(Two(), torch.randn(6, t, width), start="independent")
    q0 = float(np.mean(np.diag(tk.matrix("x", "measured"))))
    assert tk.nodes["u"].status == tk.nodes["s"].status == "exact"
    np.testing.assert_allclose(tk.matrix("u"), q0 * patterns.family_kernel("u-spa", t, rho), atol=1e-6)
    np.testing.assert_allclose(tk.matrix("s"), tk.matrix("u"), atol=1e-12)


def test_written_out_attention_uses_its_measured_softmax():
    class Written(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(64, 192)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 4, c // 4).permute(2, 0, 3, 1, 4).unbind(0)
            att = ((q @ k.transpose(-2, -1)) * (c // 4) ** -0.5).softmax(dim=-1)
            return (att @ v).transpose(1, 2).reshape(b, n, c)

    torch.manual_seed(0)
    model = Written().eval()
    x = torch.randn(5, 9, 64)
    tk = token_kernels(model, x)
    gm = netsurgeon.trace(model, (x,))
    out = next(n.name for n in gm.graph.nodes if n.name.startswith("matmul") and n.name in tk.attention)
    assert tk.attention == [out] and tk.nodes[out].status == "approximate"
    assert not any(n.startswith("softmax") or n.startswith("mul") for n in tk.nodes)  # attention weights
    with torch.no_grad():  # the softmax by hand, in float64
        q, k, v = model.qkv(x).double().reshape(5, 9, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
        p = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1).numpy()  # [B, H, T, T]
        w, bias = model.qkv.weight[128:].double(), model.qkv.bias[128:].double()
        xd = x.double()
        # each example's value kernel: the linear rule of the v rows on its own input Gram
        sv = (64 * w.pow(2).mean() * (xd @ xd.transpose(1, 2)) / 64 + bias.pow(2).mean()).numpy()
    v_node = [n for n in tk.nodes if n.startswith("getitem")][-1]
    np.testing.assert_allclose(tk.matrix(v_node), sv.mean(0), rtol=1e-6)
    want = np.mean([np.mean([a @ sv[b] @ a.T for a in p[b]], axis=0) for b in range(5)], axis=0)
    np.testing.assert_allclose(tk.matrix(out), want, rtol=1e-6)


# ---------------------------------------------------------------- (3) ViTs through analyze
class TinyViT(nn.Module):
    """Patch embedding, cls token, position embedding, pre-LN bidirectional blocks, cls pooling."""

    def __init__(self, width: int = 64, depth: int = 3, heads: int = 4, img: int = 32, patch: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, width) * 0.02)
        self.norms1 = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.norms2 = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.blocks = nn.ModuleList(Block(width, heads, nn.GELU(), causal=False) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for n1, blk in zip(self.norms1, self.blocks):
            x = x + blk(n1(x))
        return self.head(x[:, 0])


def _check_vit(model: nn.Module, x: torch.Tensor, heads_tokens: int) -> netsurgeon.Analysis:
    a = netsurgeon.analyze(model, x, tokens=True)
    tk = a.tokens
    assert isinstance(tk, TokenAnalysis)
    gm = a.topology.gm
    pos_add = next(n.name for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith("add")
                   and any(u.op == "get_attr" and "pos" in str(u.target) for u in n.all_input_nodes))
    assert tk.start == pos_add  # the patch embedding with its position embedding added
    assert tk.nodes[pos_add].tokens == heads_tokens
    cat = next(n for n in tk.nodes if n.startswith("cat"))
    assert tk.nodes[cat].status == "measured" and "along the tokens" in tk.nodes[cat].reason
    table = {r.node: r for r in tk.table()}
    assert tk.attention and all("scaled_dot_product_attention" in n for n in tk.attention)
    for name in tk.attention:
        row = table[name]
        assert row.status == "approximate" and "A measured" in row.reason and row.tokens == heads_tokens
        # approximate: A and the value kernel of one example come from the same tokens; width 64 here
        assert abs(row.predicted_cos - row.measured_cos) < 0.03
    text = str(a.table())
    assert "token cos" in text
    rows = {r.name: r for r in a.table()}
    assert rows[tk.attention[0]].token_cos == pytest.approx(tk.nodes[tk.attention[0]].predicted_cos)
    assert rows["output"].token_cos is None
    line = next(l for l in str(tk.table()).splitlines() if l.startswith(tk.attention[0] + " "))
    assert "approximate (attention: A measured" in line
    return a


def test_hand_written_vit_through_analyze():
    torch.manual_seed(0)
    a = _check_vit(TinyViT(), torch.randn(4, 3, 32, 32), 17)
    assert {n.tokens for n in a.tokens.nodes.values()} == {16, 17}  # patches, then patches and cls
    assert "patch" not in a.tokens.nodes and "head" not in a.tokens.nodes  # no token axis there
    flat = next(n for n in a.tokens.nodes if n.startswith("flatten"))
    assert a.tokens.nodes[flat].tokens == 16 and "first token node" in a.tokens.nodes[flat].reason


def test_timm_vit_tiny_through_analyze(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10)
    a = _check_vit(model, torch.randn(4, 3, 64, 64), 17)
    assert len(a.tokens.attention) == 12
    fig = a.plot_token_cosines()
    assert fig.axes and fig.axes[0].get_ylabel() == "mean token cosine"
    path = a.tokens.save_plot(tmp_path / "tokens.png", nodes=a.tokens.attention)
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------- API
def test_analyze_default_is_unchanged_and_tokens_on_a_flat_model_warns():
    mlp = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    a = netsurgeon.analyze(mlp, torch.randn(4, 16))
    assert a.tokens is None and "token cos" not in str(a.table())
    with pytest.raises(MissingAnalysisError, match="tokens=True"):
        a.plot_token_cosines()
    with pytest.warns(UserWarning, match="no node with a token axis"):
        b = netsurgeon.analyze(mlp, torch.randn(4, 16), tokens=True)
    assert b.tokens is None
    with pytest.raises(InvalidArgumentError):
        netsurgeon.analyze(mlp, torch.randn(4, 16), tokens="yes")


def test_matrix_and_arguments_are_checked():
    tk = token_kernels(vanilla(nn.ReLU, depth=1), _ids(batch=3, t=8))
    assert tk.matrix("emb", "measured").shape == (8, 8)
    with pytest.raises(UnknownNodeError):
        tk.matrix("nope")
    with pytest.raises(InvalidArgumentError):
        tk.matrix("emb", kind="both")
    with pytest.raises(InvalidArgumentError):
        token_kernels(vanilla(nn.ReLU, depth=1), _ids(batch=3, t=8), seeds=0)
    with pytest.raises(InvalidArgumentError):
        token_kernels(vanilla(nn.ReLU, depth=1), _ids(batch=3, t=8), start=np.eye(3))
    given = token_kernels(vanilla(nn.ReLU, depth=1), _ids(batch=3, t=8), start=2.0 * np.eye(8))
    assert given.nodes["emb"].predicted_q == pytest.approx(2.0)
    assert "start of the prediction (given" in given.nodes["emb"].reason
