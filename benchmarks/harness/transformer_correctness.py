"""Issue 17 §3: after the normalization- and skip-free pipeline, predicted and measured token kernels
agree at every attention block over independently initialized networks, and the output's token
cosines stay where the prediction puts them instead of collapsing.

Used by ``benchmarks/transformer_correctness.py``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon

WIDTH = 256
PIPELINE = ["remove_norms", "remove_skips", "input_norm", "orthogonal_init", "attention_shaping", "tat"]
VANILLA = ["remove_norms", "remove_skips"]


class _Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CausalLM(nn.Module):
    """A hand-written Pre-LN causal transformer (token + position embeddings, 24 blocks by default)."""

    def __init__(self, vocab: int = 8192, d: int | None = None, depth: int = 24, heads: int = 4, t: int = 32) -> None:
        super().__init__()
        d = WIDTH if d is None else d  # read at call time: the benchmark's --width sets WIDTH
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, t, d) * 0.02)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(ids) + self.pos)))


def _distinct_ids(vocab: int, batch: int, t: int, seed: int) -> torch.Tensor:
    """Token ids with no repeats in a sequence: the independent tokens the patterns are built for."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.stack([torch.randperm(vocab, generator=g)[:t] for _ in range(batch)])


def _hf(name: str) -> Callable[[int], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build(seed: int):
        import transformers as tf
        torch.manual_seed(seed)
        small = dict(hidden_size=WIDTH, num_hidden_layers=4, num_attention_heads=4, intermediate_size=4 * WIDTH,
                     vocab_size=4096, max_position_embeddings=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "bert":
                model = tf.BertModel(tf.BertConfig(**small))
            elif name == "gpt2":
                model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=WIDTH, n_layer=4, n_head=4, vocab_size=4096,
                                                         n_positions=64))
            else:
                model = tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=2))
        return model.eval(), (_distinct_ids(4096, 8, 32, seed),)
    return build


def _timm(name: str) -> Callable[[int], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build(seed: int):
        import timm
        torch.manual_seed(seed)
        model = timm.create_model(name, img_size=64, num_classes=10, embed_dim=WIDTH, num_heads=4)
        x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1000 + seed))
        return model.eval(), (x,)
    return build


def _causal(seed: int):
    torch.manual_seed(seed)
    return CausalLM().eval(), (_distinct_ids(8192, 8, 32, seed),)


FAMILIES: dict[str, Callable[[int], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "causal24": _causal, "vit_tiny": _timm("vit_tiny_patch16_224"), "deit_tiny": _timm("deit_tiny_patch16_224"),
    "gpt2": _hf("gpt2"), "llama": _hf("llama"), "bert": _hf("bert"),
}


def _offdiag(m: np.ndarray) -> float:
    return float(m[~np.eye(m.shape[0], dtype=bool)].mean())


STATS = ("q", "k", "cos")  # mean token q, mean off-diagonal kernel entry, mean token cosine


@dataclass
class Result:
    """Per network (rows) and block (columns): each statistic of the predicted and the measured
    token kernel (means over the network's examples). ``q`` and ``k`` are entries of the kernel itself
    (unbiased at finite width through a linear layer); ``cos`` is their ratio (biased at O(1/width))."""

    family: str
    blocks: list[str]
    predicted: dict[str, np.ndarray]  # stat -> [seeds, blocks]
    measured: dict[str, np.ndarray]
    vanilla_output: list[float] = field(default_factory=list)  # measured output cosine, untransformed
    # per vanilla network: the last node whose measured q is still positive in float32 (its cosine is the
    # one in vanilla_output), when the signal vanishes before the output (Llama's gated MLPs square q)
    vanilla_vanished: list[str | None] = field(default_factory=list)

    def z(self, stat: str) -> np.ndarray:
        """Per block: (mean measured - mean predicted) / its standard error over the networks; a
        difference below the float32 resolution of the measured Gram (``1e-6`` relative) counts as 0."""
        diff = self.measured[stat] - self.predicted[stat]
        se = diff.std(axis=0, ddof=1) / math.sqrt(diff.shape[0])
        floor = 1e-6 * np.abs(self.measured[stat]).mean(axis=0)
        mean = diff.mean(axis=0)
        return np.where(np.abs(mean) <= floor, 0.0, mean / np.maximum(se, 1e-300))

    def worst(self, stats: tuple[str, ...] = ("q", "k")) -> tuple[str, str, float, float]:
        """``(block, stat, z, mean difference)`` with the largest |z| over ``stats``."""
        best = ("", "", 0.0, 0.0)
        for stat in stats:
            z = self.z(stat)
            i = int(np.argmax(np.abs(z)))
            if abs(z[i]) >= abs(best[2]):
                best = (self.blocks[i], stat, float(z[i]),
                        float((self.measured[stat] - self.predicted[stat]).mean(axis=0)[i]))
        return best


def run(family: str, seeds: int = 16, vanilla: bool = True) -> Result:
    """The pipeline on ``seeds`` networks of ``family``; token kernels after every attention block
    (and at the last token node) predicted and measured on each network's own example batch."""
    build = FAMILIES[family]
    pred = {s: [] for s in STATS}
    meas = {s: [] for s in STATS}
    names, van, gone = None, [], []
    for seed in range(seeds):
        model, inputs = build(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            passes = [p if p != "orthogonal_init" else ("orthogonal_init", {"seed": seed}) for p in PIPELINE]
            gm = netsurgeon.transform(model, passes, example_inputs=inputs)
            tk = netsurgeon.token_kernels(gm, inputs)
        last = list(tk.nodes)[-1]
        blocks = list(tk.attention) + [last]
        names = names or blocks
        for kind, out in (("predicted", pred), ("measured", meas)):
            mats = [tk.matrix(b, kind) for b in blocks]
            out["q"].append([float(np.mean(np.diag(m))) for m in mats])
            out["k"].append([_offdiag(m) for m in mats])
            out["cos"].append([tk.cos(b, kind) for b in blocks])
        if vanilla and seed < 4:
            model, inputs = build(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g0 = netsurgeon.transform(model, VANILLA, example_inputs=inputs)
                t0 = netsurgeon.token_kernels(g0, inputs)
            rows = t0.table()
            alive = [r for r in rows if r.measured_q > 0 and math.isfinite(r.measured_cos)]
            van.append(float(alive[-1].measured_cos) if alive else math.nan)
            gone.append(None if alive and alive[-1] is rows[-1] else (alive[-1].node if alive else "input"))
    return Result(family, names, {s: np.array(v) for s, v in pred.items()}, {s: np.array(v) for s, v in meas.items()},
                  van, gone)
