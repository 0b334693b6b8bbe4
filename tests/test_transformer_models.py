"""The Pre-LN transformers of benchmarks/train_transformer.py (``harness.transformer_models``): shapes,
causality of the char LM (also after the benchmark's rewrites), the Pre-LN layout and the init."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import load_benchmark

from harness.transformer_models import Block, CharTransformer, VisionTransformer, lm_loss
from netsurgeon.errors import InvalidArgumentError

V, T = 11, 16


def _lm(**kw) -> CharTransformer:
    torch.manual_seed(0)
    return CharTransformer(V, **{"width": 32, "depth": 3, "heads": 2, "context": T, **kw}).eval()


def _assert_causal(model: nn.Module, context: int = T) -> None:
    """Changing the tokens after position t leaves the logits at positions 0..t unchanged, and changing
    token t changes the logits at t."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, context), generator=g)
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, context - 2):
            y = x.clone()
            y[:, t + 1:] = (y[:, t + 1:] + 1 + torch.randint(0, V - 1, y[:, t + 1:].shape, generator=g)) % V
            out = model(y)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5)
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-4, t  # the later positions did change
            z = x.clone()
            z[:, t] = (z[:, t] + 1) % V
            assert (model(z)[:, t] - base[:, t]).abs().max() > 1e-4, t


def test_shapes_and_loss():
    lm = _lm()
    x = torch.randint(0, V, (4, T))
    assert lm(x).shape == (4, T, V)
    assert lm(x[:, :7]).shape == (4, 7, V)  # shorter sequences use the first positions
    loss = lm_loss(lm(x), x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    vit = VisionTransformer(width=32, depth=2, heads=2).eval()
    assert vit(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert vit.pos_emb.shape == (1, 64, 32)  # patch 4 on 32x32: 8 x 8 tokens
    small = VisionTransformer(width=16, depth=1, heads=2, patch=8, num_classes=3)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_default_dimensions_are_the_benchmarks():
    lm = CharTransformer(85)
    assert len(lm.blocks) == 12 and lm.tok_emb.embedding_dim == 128 and lm.context == 128
    assert lm.blocks[0].mlp.fc1.out_features == 4 * 128 and lm.blocks[0].attn.qkv.out_features == 3 * 128
    vit = VisionTransformer()
    assert len(vit.blocks) == 12 and vit.patch_embed.kernel_size == (4, 4)


def test_char_lm_is_causal():
    _assert_causal(_lm())
    _assert_causal(_lm(act="relu"))


def test_vit_attention_is_bidirectional():
    vit = VisionTransformer(width=32, depth=2, heads=2).eval()
    assert not any(b.attn.causal for b in vit.blocks)
    blocks = vit.blocks
    x = torch.randn(2, 64, 32)
    y = x.clone()
    y[:, -1] += torch.randn(32)  # not a constant shift, which the LayerNorms would remove
    with torch.no_grad():
        assert (blocks(y)[:, 0] - blocks(x)[:, 0]).abs().max() > 1e-4  # the first token sees the last one


def test_block_is_pre_ln():
    torch.manual_seed(0)
    b = Block(16, 2, causal=True).eval()
    x = torch.randn(2, 5, 16)
    h = x + b.attn(b.ln1(x))
    torch.testing.assert_close(b(x), h + b.mlp(b.ln2(h)))


def test_init():
    lm = _lm(width=64)
    norms = lm.tok_emb.weight.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 8.0))  # q = 1 per token
    w = lm.blocks[0].attn.qkv.weight.detach()
    assert 0.015 < float(w.std()) < 0.025 and float(w.abs().max()) <= 0.04 + 1e-6
    assert float(lm.blocks[0].attn.qkv.bias.detach().abs().max()) == 0.0


def test_bad_arguments_are_refused():
    with pytest.raises(InvalidArgumentError, match="norm='post-ln'"):
        CharTransformer(V, norm="post-ln")
    with pytest.raises(InvalidArgumentError, match="divisible"):
        CharTransformer(V, width=30, heads=4)
    with pytest.raises(InvalidArgumentError, match="act="):
        VisionTransformer(act="tanh")
    with pytest.raises(InvalidArgumentError, match="img_size"):
        VisionTransformer(img_size=30)


@pytest.mark.parametrize("config", ["vanilla", "nf+shaped+tat", "vanilla+shaped+tat", "value-skipinit"])
def test_rewritten_lm_stays_causal(config):
    """The benchmark's configurations (netsurgeon rewrites of the Pre-LN LM) keep the causal mask."""
    tt = load_benchmark("train_transformer")
    dims = tt.Dims(depth=2, width=32, heads=2, context=T)
    torch.manual_seed(0)
    gm = tt.build_model("lm", config, 0, dims, V).eval()
    assert isinstance(gm, torch.fx.GraphModule)
    if config == "vanilla":  # its signal vanishes at init; give it weights that carry one
        with torch.no_grad():
            for m in gm.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    _assert_causal(gm)
