"""Every rewrite trains the same on two devices: each pass family's output (Farkas rows, identity
at init, DKS/TAT, the consistency passes) and the layer-wise optimizer.

The procedure: transform on CPU, copy to the device, check that every tensor constant is a
registered parameter or buffer (so ``.to()`` moves it), train 3 steps in train mode, switch to
eval, compare outputs and ``state_dict`` with the same run on CPU, and reload the state
into a fresh transform. The CPU-vs-CPU case runs everywhere (the harness and the passes'
train/eval and ``state_dict`` behaviour); the CPU-vs-CUDA case runs where CUDA exists and is
skipped, with that reason, elsewhere.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from netsurgeon.optim import LayerwiseLM

REMOVE = ("strip_bn", {"mode": "remove"})
CASES = {
    "farkas": ("resnet10t", ["farkas"]),
    "farkas_block": ("resnet18", [("farkas", {"mode": "block"})]),
    "fixup": ("resnet10t", [REMOVE, ("identity_residual", {"mode": "fixup", "seed": 0})]),
    "skipinit": ("resnet10t", [("identity_residual", {"mode": "skipinit"})]),
    "hardt_ma": ("resnet10t", [REMOVE, ("identity_residual", {"mode": "hardt_ma", "seed": 0})]),
    "identity_reparam": ("resnet10t", [("identity_reparam", {"init": "convert"})]),
    "tat": ("resnet18", [REMOVE, "normalize_sums", "maxpool_to_avgpool", "input_norm", "orthogonal_init",
                          ("tat", {"eta": 0.8})]),
    "dks": ("resnet18", [REMOVE, "remove_skips", "maxpool_to_avgpool", "input_norm", "orthogonal_init", "dks"]),
    "rms_norm+modulus": ("resnet10t", ["rms_norm", "modulus"]),
}
OPTIMIZERS = {"sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9),
              "layerwise_lm": lambda m: LayerwiseLM(m, lr=0.005, update_every=1, chunk_size=32)}


def _registered(gm: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(gm.named_parameters(remove_duplicate=False))
    out.update(dict(gm.named_buffers(remove_duplicate=False)))
    return out


def _plain_tensor_attrs(gm: nn.Module) -> list[str]:
    return [f"{path}.{k}" if path else k for path, mod in gm.named_modules()
            for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]


def _build(case: str) -> fx.GraphModule:
    name, passes = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with warnings_off():
        return netsurgeon.transform(model, passes=passes, example_inputs=torch.randn(1, 3, 32, 32))


def warnings_off():
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")

    class _Exit:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            ctx.__exit__(*exc)
    return _Exit()


def _train(gm: fx.GraphModule, device: str, optimizer: str) -> tuple[list[float], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    gm.to(device).train()
    opt = OPTIMIZERS[optimizer](gm)
    xd, yd = x.to(device), y.to(device)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(gm(xd), yd)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        out = gm.eval()(xd).cpu()
        again = gm(xd).cpu()
    torch.testing.assert_close(out, again, rtol=0, atol=0)  # eval mode is deterministic
    return losses, out


def _check(case: str, optimizer: str, device: str) -> None:
    ref = _build(case)
    dev = copy.deepcopy(ref)
    assert not _plain_tensor_attrs(dev), "tensors held as plain attributes are not moved by .to()"
    before = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    loss_ref, out_ref = _train(ref, "cpu", optimizer)
    loss_dev, out_dev = _train(dev, device, optimizer)
    assert all(t.device.type == torch.device(device).type for t in _registered(dev).values())
    assert all(map(torch.isfinite, map(torch.tensor, loss_ref))) and loss_ref[-1] != loss_ref[0]
    changed = [k for k, v in ref.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "training changed no parameter"
    torch.testing.assert_close(torch.tensor(loss_dev), torch.tensor(loss_ref), rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(out_dev, out_ref, rtol=2e-3, atol=2e-3)
    sd = {k: v.cpu() for k, v in dev.state_dict().items()}
    torch.testing.assert_close(sd, ref.state_dict(), rtol=2e-3, atol=2e-4)
    fresh = _build(case)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, 3, 32, 32, generator=g)
        torch.testing.assert_close(fresh.eval()(x), ref.eval()(x), rtol=2e-3, atol=2e-3)


@pytest.fixture
def exact_cuda():
    """No TF32, deterministic cuDNN: CPU and GPU then agree to float32 rounding."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = flags


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
def test_trains_the_same_twice_on_cpu(case, optimizer):
    torch.set_num_threads(1)
    _check(case, optimizer, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
def test_trains_the_same_on_cuda(case, optimizer, exact_cuda):
    _check(case, optimizer, "cuda")


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_without_graph_breaks_and_matches_eager(case):
    """``torch.compile(fullgraph=True)`` traces every pass family's layers in one graph (the
    ``aot_eager`` backend: Dynamo and AOT autograd without C++ code generation, which the
    inductor test in test_training_module.py covers) and gives the eager gradients and outputs."""
    torch.set_num_threads(1)
    torch._dynamo.reset()
    gm = _build(case)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    eager = copy.deepcopy(gm).train()
    compiled = torch.compile(gm.train(), backend="aot_eager", fullgraph=True)
    F.cross_entropy(compiled(x), y).backward()
    F.cross_entropy(eager(x), y).backward()
    grads = {n: p.grad for n, p in eager.named_parameters()}
    for n, p in gm.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(dict(gm.named_buffers()), dict(eager.named_buffers()), rtol=1e-5, atol=1e-6)
    gm.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
