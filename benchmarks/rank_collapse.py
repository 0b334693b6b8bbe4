"""Rank collapse of a deep skip-free transformer, and E-SPA attention that avoids it (issue 17 §1).

A 24-block causal transformer without skips and norms (token embedding, then blocks of fused
``qkv`` linear -> ``scaled_dot_product_attention(is_causal=True)`` -> ``proj`` -> MLP), width 256,
4 heads, 32 tokens, orthogonal weights and zero biases, is analysed by
``netsurgeon.analysis.token_kernels.token_kernels``: the predicted and the measured mean
off-diagonal token cosine at the output of every block. The same network is then given E-SPA
attention (He et al. arXiv:2302.10322) by ``netsurgeon.transform(model, ["attention_shaping"])``
when that pass is registered, else by hand (the query rows of ``qkv`` zeroed and each sdpa replaced
by a ``ShapedAttention`` carrying the schedule's pattern, as the pass does). Two MLPs: the identity
(``Linear -> Linear``: attention alone decides the token geometry) and ReLU (``Linear -> ReLU ->
Linear`` with gain sqrt(2)), whose C map pushes cosines up by itself.

Each configuration is built with ``--nets`` weight seeds and measured on ``--seeds`` x ``--batch``
random token sequences. Outputs a figure (two panels: the predicted mean token cosine as lines,
the measured one as points with ± 2 standard errors over the networks) and a markdown table.

Usage:
    python benchmarks/rank_collapse.py                               # docs/figures/rank_collapse.png
    python benchmarks/rank_collapse.py --seeds 4 --out /tmp/rc.png  # a quick look
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from netsurgeon._fileio import write_atomic
from netsurgeon.analysis.token_kernels import TokenAnalysis, token_kernels
from netsurgeon.kernels import attention as patterns
from netsurgeon.layers import ShapedAttention

REPO = Path(__file__).resolve().parent.parent
FIGURE = REPO / "docs" / "figures" / "rank_collapse.png"


class Block(nn.Module):
    """No skip, no norm: fused qkv -> attention -> proj -> fc1 -> act -> fc2."""

    def __init__(self, width: int, heads: int, act: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.attn: nn.Module | None = None
        self.proj = nn.Linear(width, width)
        self.fc1, self.act, self.fc2 = nn.Linear(width, width), act, nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True) if self.attn is None else self.attn(q, k, v)
        return self.fc2(self.act(self.fc1(self.proj(y.transpose(1, 2).reshape(b, n, c)))))


class CausalLM(nn.Module):
    def __init__(self, depth: int, width: int, heads: int, vocab: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*[Block(width, heads, act()) for _ in range(depth)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.emb(ids))


def vanilla(act: type[nn.Module], depth: int, width: int, heads: int, vocab: int, seed: int) -> CausalLM:
    """Orthogonal weights (q, k and v of ``qkv`` each; the MLP's second layer with gain sqrt(2) after
    a ReLU), zero biases."""
    torch.manual_seed(seed)
    model = CausalLM(depth, width, heads, vocab, act)
    with torch.no_grad():
        for blk in model.blocks:
            for lin in (blk.proj, blk.fc1, blk.fc2):
                nn.init.orthogonal_(lin.weight, gain=math.sqrt(2.0) if lin is blk.fc2 and act is nn.ReLU else 1.0)
                lin.bias.zero_()
            for part in blk.qkv.weight.chunk(3):  # q, k and v each orthogonal
                nn.init.orthogonal_(part)
            blk.qkv.bias.zero_()
    return model


def shaped_by_hand(model: CausalLM, tokens: int, final: float = 0.3) -> CausalLM:
    """What ``attention_shaping`` does, by hand: E-SPA patterns from ``netsurgeon.kernels.attention``."""
    depth = len(model.blocks)
    rhos = patterns.schedule("e-spa", tokens, depth, final)
    with torch.no_grad():
        for l, blk in enumerate(model.blocks):
            a = patterns.transition(patterns.family_kernel("e-spa", tokens, rhos[l]),
                                    patterns.family_kernel("e-spa", tokens, rhos[l + 1]), causal=True)
            d, b = patterns.as_softmax(a, causal=True)
            blk.attn = ShapedAttention(torch.tensor(b), torch.tensor(d), heads=blk.heads, causal=True)
            blk.qkv.weight[: blk.qkv.in_features].zero_()
            blk.qkv.bias[: blk.qkv.in_features].zero_()
    return model


def shaped(model: CausalLM, ids: torch.Tensor, tokens: int) -> tuple[nn.Module, str]:
    try:
        netsurgeon.get_pass("attention_shaping")
    except netsurgeon.UnknownPassError:
        return shaped_by_hand(model, tokens), "E-SPA (by hand)"
    return netsurgeon.transform(model, passes=["attention_shaping"], example_inputs=(ids,)), "E-SPA (attention_shaping)"


def block_series(tk: TokenAnalysis) -> list[str]:
    """The start node, then each block's output (its ``fc2``)."""
    return [tk.start] + [n for n in tk.nodes if n.startswith("blocks_") and n.endswith("_fc2")]


@dataclass
class Series:
    """Mean token cosine at the start and after each block, one row per network."""

    predicted: np.ndarray  # [nets, depth + 1]
    measured: np.ndarray
    se_inputs: np.ndarray  # each network's standard error over its input sequences
    attention: str  # how the attention nodes were predicted (their status)

    def mean(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted and measured means over the networks, and the SE of the measured mean: over
        the networks when there are several (finite-width fluctuations of one network's weights
        are shared by all its inputs), else over the one network's inputs."""
        nets = self.measured.shape[0]
        se = self.measured.std(0, ddof=1) / math.sqrt(nets) if nets > 1 else self.se_inputs[0]
        return self.predicted.mean(0), self.measured.mean(0), se


def run(args: argparse.Namespace) -> dict[tuple[str, str], Series]:
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    rows: dict[tuple[str, str], list] = {}
    for act in (nn.Identity, nn.ReLU):
        for net in range(args.net_seed, args.net_seed + args.nets):
            base = vanilla(act, args.depth, args.width, args.heads, args.vocab, net)
            model, label = shaped(vanilla(act, args.depth, args.width, args.heads, args.vocab, net), ids, args.tokens)
            for kind, m in (("vanilla sdpa", base), (label, model)):
                tk = token_kernels(m, ids, seeds=args.seeds)
                names = block_series(tk)
                rows.setdefault((act.__name__, kind), []).append(
                    ([tk.nodes[n].predicted_cos for n in names], [tk.nodes[n].measured_cos for n in names],
                     [tk.nodes[n].se for n in names], tk.nodes[tk.attention[0]].status))
                print(f"{act.__name__:8s} net {net} {kind:26s} {tk.summary()}", flush=True)
    return {key: Series(*(np.array([r[i] for r in v]) for i in range(3)), v[0][3]) for key, v in rows.items()}


def table(results: dict[tuple[str, str], Series]) -> str:
    keys = list(results)
    head = "| block | " + " | ".join(f"{a} MLP, {k} ({results[(a, k)].attention})" for a, k in keys) + " |"
    lines = [head, "|" + " ---: |" * (len(keys) + 1)]
    means = {key: s.mean() for key, s in results.items()}
    depth = next(iter(results.values())).predicted.shape[1] - 1
    for l in sorted({0, 1, 2, 4, 8, 12, 16, 20, depth}):
        if l > depth:
            continue
        cells = [f"{p[l]:.4f} / {m[l]:.4f} ± {se[l]:.4f}" for p, m, se in means.values()]
        lines.append(f"| {l if l else 'start'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: dict[tuple[str, str], Series], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, act in zip(axes, ("Identity", "ReLU")):
        for (a, kind), series in results.items():
            if a != act:
                continue
            p, m, se = series.mean()
            x = np.arange(len(p))
            line, = ax.plot(x, p, "-", label=f"{kind}: predicted")
            ax.errorbar(x, m, yerr=2 * se, fmt="o", ms=3.5, color=line.get_color(), alpha=0.75,
                        label=f"{kind}: measured (± 2 SE)")
        ax.axhline(0.3, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("block (0: token embedding)")
        ax.set_title(f"MLP activation: {act.lower()}", fontsize=10)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7, loc="center right")
    axes[0].set_ylabel("mean off-diagonal token cosine")
    fig.suptitle(f"{args.depth}-block causal transformer without skips or norms: width {args.width}, {args.heads} "
                 f"heads, {args.tokens} tokens; {args.nets} networks x {args.seeds * args.batch} sequences",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seeds", type=int, default=8, help="random input batches per network (default 8)")
    p.add_argument("--batch", type=int, default=4, help="sequences per seed (default 4)")
    p.add_argument("--nets", type=int, default=4, help="networks (weight seeds) per configuration (default 4)")
    p.add_argument("--net-seed", type=int, default=0, help="the first network's weight seed (default 0)")
    p.add_argument("--out", type=Path, default=FIGURE, help=f"the figure (default {FIGURE.relative_to(REPO)})")
    p.add_argument("--table", type=Path, default=None, help="also write the markdown table there")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = run(args)
    text = table(results)
    print(text)
    if args.table is not None:
        args.table.write_text(text + "\n")
    figure(results, args.out, args)
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
