"""Fold the batch norms of a timm model and show what changed.

Run: python examples/fold_and_inspect.py [model-name]
"""
import sys

import timm
import torch

import netsurgeon

name = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
model = timm.create_model(name).eval()
print(netsurgeon.topology(model).summary())

gm = netsurgeon.transform(model, ["strip_bn"]).eval()
x = torch.randn(2, 3, 224, 224)
with torch.no_grad():
    diff = (model(x) - gm(x)).abs().max().item()
print(netsurgeon.report(gm))
print(f"max output difference after folding: {diff:.2e}")
