"""analyze on token-id models (docs/theory.md §3.10): the signal starts at the embedding lookup."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import netsurgeon


class TinyLM(nn.Module):
    """Embedding -> Linear -> tanh -> Linear on tokens folded into the batch axis ([B*L, D]) -> a
    product of dependent signals (measured, through the layout probe) -> reshaped back."""

    def __init__(self, vocab: int = 64, width: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(self.emb(ids)))
        b, n, d = h.shape
        g = self.b(h.reshape(b * n, d))
        return (g * torch.tanh(g)).reshape(b, n, d)


def test_embedding_is_the_source_and_measured_nodes_get_gaussian_pairs():
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 64, (2, 12))
    a = netsurgeon.analyze(model, ids)
    q_table = float(model.emb.weight.detach().double().pow(2).mean())
    assert a.q("emb") == pytest.approx(q_table, rel=1e-12)
    assert a.status("emb") == ("approximate", "token embeddings taken as Gaussian features with the table's mean "
                                              "square and cosine c_in")
    assert a.c("emb") == pytest.approx(0.0, abs=1e-12) and float(a.cmap("emb")(0.5)) == pytest.approx(0.5)
    # the product of dependent signals is measured: on Gaussian pairs injected at the lookup, not on ids
    status, reason = a.status("mul_1")
    assert status == "unsupported" and "measured" in reason and "product of dependent signals" in reason
    # at c_in = 0 the pair's features g, g' are independent N(0, q_b): c = E[f(g)]² / E[f(g)²], f(g) = g tanh(g)
    g = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * a.q("b") ** 0.5
    f = g * torch.tanh(g)
    assert a.q("mul_1") == pytest.approx(float((f * f).mean()), rel=0.1)
    assert a.c("mul_1") == pytest.approx(float(f.mean() ** 2 / (f * f).mean()), abs=0.05)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_hugging_face_models_analyse(name):
    pytest.importorskip("transformers", reason="the Hugging Face models need the 'hf' extra (transformers)")
    from harness.broad_zoo import ZooModel, build

    model, ids = build(ZooModel("hf", name, size=16))
    a = netsurgeon.analyze(model, ids)
    out = [r for r in a.table() if r.kind == "output"]
    assert out and all(r.q > 0 and -1 <= r.c <= 1 for r in out)
