"""The Pre-LN transformers of ``benchmarks/train_transformer.py``: a character-level causal LM and a small ViT.

Both are the standard Pre-LN transformer (Xiong et al. 2020, arXiv:2002.04745; GPT-2's layout):
every block is ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``, and a final LayerNorm comes before
the head. The attention is timm's ``Attention`` (fused ``qkv`` linear, heads, then
``F.scaled_dot_product_attention``, then the ``proj`` linear), causal for the LM
(``is_causal=True``) and bidirectional for the ViT (Dosovitskiy et al. 2020, arXiv:2010.11929).
The MLP is ``fc2(act(fc1(x)))`` with ratio 4. The normalization-free and skip-free
configurations of the benchmark are not separate classes: they are these models rewritten by
``netsurgeon.transform`` (``remove_norms``, ``remove_skips``, ...).

Example:
    >>> import torch
    >>> lm = CharTransformer(vocab_size=65, width=32, depth=2, heads=2, context=16)
    >>> lm(torch.randint(0, 65, (3, 16))).shape      # (batch, tokens, vocab): one logit row per position
    torch.Size([3, 16, 65])
    >>> vit = VisionTransformer(width=32, depth=2, heads=2)
    >>> vit(torch.randn(3, 3, 32, 32)).shape
    torch.Size([3, 10])
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from netsurgeon.errors import InvalidArgumentError

__all__ = ["NORMS", "Attention", "Mlp", "Block", "CharTransformer", "VisionTransformer", "lm_loss"]

NORMS = ("pre-ln",)
"""The ``norm`` layouts the model classes build. Every other configuration is a rewrite of this one."""

_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Attention(nn.Module):
    """Multi-head self-attention as in timm: ``proj(sdpa(q, k, v))`` with ``q, k, v`` from one ``qkv`` linear.

    Args:
        width: model width, divisible by ``heads``.
        heads: attention heads.
        causal: mask future positions (``is_causal=True``). Default: False.
    """

    def __init__(self, width: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise InvalidArgumentError(f"width={width} is not divisible by heads={heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with hidden width ``ratio * width``.

    Args:
        width: model width.
        ratio: hidden width over model width. Default: 4.
        act: "gelu" or "relu". Default: "gelu".
    """

    def __init__(self, width: int, ratio: int = 4, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width)
        self.act = _ACTS[act]()
        self.fc2 = nn.Linear(ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """The Pre-LN block ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int, causal: bool, act: str = "gelu", mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, mlp_ratio, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _check(norm: str, act: str, depth: int) -> None:
    if norm not in NORMS:
        raise InvalidArgumentError(f"norm={norm!r}: the model is built as {NORMS}; the other configurations "
                                   "are netsurgeon rewrites of it (remove_norms, remove_skips, ...)")
    if act not in _ACTS:
        raise InvalidArgumentError(f"act={act!r}: expected one of {sorted(_ACTS)}")
    if depth < 1:
        raise InvalidArgumentError(f"depth={depth} must be >= 1")


def _init(module: nn.Module) -> None:
    """timm ViT / GPT-2 init of the linear layers: weights N(0, 0.02²) truncated at ±2σ, zero biases;
    LayerNorms at (1, 0). Token embeddings: Gaussian rows (PyTorch's default) rescaled to norm
    ``sqrt(width)``, so that every token has q = 1 exactly, the input scale DKS/TAT assume
    (docs/theory.md §4.7); the reference trained better with them than with GPT-2's N(0, 0.02²) rows
    (docs/benchmarks.md, issue 17)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            with torch.no_grad():
                w = torch.randn_like(m.weight)
                m.weight.copy_(w * (w.shape[1] ** 0.5 / w.norm(dim=1, keepdim=True)))
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CharTransformer(nn.Module):
    """Character-level causal language model: token + learned position embeddings, ``depth``
    Pre-LN blocks with causal attention, a final LayerNorm and a linear head.

    Input ``(B, T)`` int64 token ids with ``T <= context``; output ``(B, T, vocab_size)`` logits,
    the prediction at position ``t`` depending only on tokens ``0..t``.

    Args:
        vocab_size: number of token ids.
        width: model width. Default: 128.
        depth: blocks. Default: 12.
        heads: attention heads. Default: 4.
        context: longest sequence (positions embedded). Default: 128.
        norm: "pre-ln", the only layout built. Default: "pre-ln".
        act: MLP activation, "gelu" or "relu". Default: "gelu".
        mlp_ratio: MLP hidden width over model width. Default: 4.
    """

    def __init__(self, vocab_size: int, width: int = 128, depth: int = 12, heads: int = 4, context: int = 128,
                 norm: str = "pre-ln", act: str = "gelu", mlp_ratio: int = 4) -> None:
        super().__init__()
        _check(norm, act, depth)
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Parameter(torch.zeros(1, context, width))
        self.blocks = nn.Sequential(*(Block(width, heads, True, act, mlp_ratio) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        _init(self)
        nn.init.trunc_normal_(self.pos_emb, std=0.02, a=-0.04, b=0.04)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb[:, :idx.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))


class VisionTransformer(nn.Module):
    """Small ViT: a ``patch x patch`` patchify conv, learned position embeddings, ``depth`` Pre-LN
    blocks with bidirectional attention, a final LayerNorm, the mean over tokens and a linear head.

    Args:
        img_size: square input side. Default: 32.
        patch: patch side (stride = kernel). Default: 4.
        in_chans: input channels. Default: 3.
        num_classes: classes. Default: 10.
        width: model width. Default: 128.
        depth: blocks. Default: 12.
        heads: attention heads. Default: 4.
        norm: "pre-ln", the only layout built. Default: "pre-ln".
        act: MLP activation, "gelu" or "relu". Default: "gelu".
        mlp_ratio: MLP hidden width over model width. Default: 4.
    """

    def __init__(self, img_size: int = 32, patch: int = 4, in_chans: int = 3, num_classes: int = 10,
                 width: int = 128, depth: int = 12, heads: int = 4, norm: str = "pre-ln", act: str = "gelu",
                 mlp_ratio: int = 4) -> None:
        super().__init__()
        _check(norm, act, depth)
        if img_size % patch:
            raise InvalidArgumentError(f"img_size={img_size} is not divisible by patch={patch}")
        self.patch_embed = nn.Conv2d(in_chans, width, patch, patch)
        self.pos_emb = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2, width))
        self.blocks = nn.Sequential(*(Block(width, heads, False, act, mlp_ratio) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        _init(self)
        nn.init.trunc_normal_(self.pos_emb, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_emb
        return self.head(self.ln_f(self.blocks(x)).mean(1))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``(B, T, V)`` logits against ``(B, T)`` targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
