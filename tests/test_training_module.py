"""The output of ``netsurgeon.transform`` is a real training module.

Each test builds real timm models (``pretrained=False``) or a small conv net, transforms
them, and then uses the ``torch.fx.GraphModule`` the way a training script would:
optimizer steps, train/eval switching, ``state_dict`` save/load, ``.to()``/``.double()``,
``torch.compile``, DistributedDataParallel, CUDA.
"""
from __future__ import annotations

import io
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d

import netsurgeon

REMOVE = ("strip_bn", {"mode": "remove"})
FOLD = ("strip_bn", {"mode": "fold"})
STRIP_MODES = pytest.mark.parametrize("spec", [REMOVE, FOLD], ids=["remove", "fold"])


# ----------------------------------------------------------------------------- helpers
def _calibrate_bn(model: nn.Module, shape: tuple[int, ...], seed: int = 123, batches: int = 2) -> nn.Module:
    """Give every batch norm non-trivial running statistics, so folding is not ~identity."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(*shape, generator=g) * 2 + 0.5)
    return model.eval()


def _small_bn_net(num_classes: int = 10) -> nn.Module:
    """A small conv net with plain and timm composite (norm+act) batch norms."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8, act_layer=nn.ReLU),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        BatchNormAct2d(16, act_layer=nn.SiLU),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def _batchnorm_count(gm: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())


def _registered(gm: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(gm.named_parameters(remove_duplicate=False))
    out.update(dict(gm.named_buffers(remove_duplicate=False)))
    return out


def _assert_constants_registered(gm: fx.GraphModule) -> list[str]:
    """Every get_attr resolves to a registered parameter/buffer; no stray tensor attributes."""
    registered = _registered(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    stray = [t for t in targets if t not in registered]
    assert not stray, f"get_attr targets that are neither parameters nor buffers: {stray}"
    plain = [f"{path}.{k}" if path else k for path, mod in gm.named_modules()
             for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
    assert not plain, f"tensors held as plain attributes (not moved by .to()): {plain}"
    return targets


# ----------------------------------------------------------------------------- 1. SGD
@pytest.mark.parametrize("spec", [REMOVE, "strip_bn"], ids=["remove", "fold"])
def test_sgd_reduces_loss_on_transformed_resnet18(spec):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    model = _calibrate_bn(timm.create_model("resnet18", pretrained=False, num_classes=10), (8, 3, 32, 32))
    gm = netsurgeon.transform(model, passes=[spec], example_inputs=x[:2])
    assert isinstance(gm, fx.GraphModule)
    assert _batchnorm_count(gm) == 0
    if spec == "strip_bn":  # fold keeps the eval-mode function: training starts from the same network
        with torch.no_grad():
            torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-4)

    start = {k: v.detach().clone() for k, v in gm.named_parameters()}
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(gm(x), y)
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in gm.named_parameters() if p.grad is None]
            assert not no_grad, f"parameters the loss does not reach: {no_grad}"
        torch.nn.utils.clip_grad_norm_(gm.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.cross_entropy(gm(x), y).item()
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert final < 0.7 * losses[0], f"loss did not fall: first {losses[0]:.4f}, after 20 steps {final:.4f}"
    changed = [n for n, p in gm.named_parameters() if not torch.equal(p, start[n])]
    assert len(changed) == len(start)


# ----------------------------------------------------------------------------- 2. train/eval
@pytest.mark.parametrize("name", ["efficientnet_b0", "resnetv2_50"])
def test_traced_module_matches_eager_in_train_and_eval(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, drop_rate=0.2)
    gm = netsurgeon.transform(model, passes=[])
    x = torch.randn(2, 3, 64, 64)

    outs = {}
    for training in (True, False, True, False):  # switch back and forth
        model.train(training)
        gm.train(training)
        assert all(m.training == training for m in gm.modules())
        torch.manual_seed(7)
        ref = model(x)
        torch.manual_seed(7)
        out = gm(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=f"train={training}")
        outs.setdefault(training, out.detach())
    # batch norm running statistics were updated identically by the train-mode forwards
    torch.testing.assert_close(gm.state_dict(), model.state_dict(), rtol=0, atol=0)
    # train and eval really compute different functions (batch stats + dropout)
    assert not torch.allclose(outs[True], outs[False], atol=1e-3)
    # dropout is live in train mode: another seed gives another output
    gm.train()
    torch.manual_seed(8)
    other = gm(x).detach()
    assert not torch.allclose(other, outs[True], atol=1e-6)


# ----------------------------------------------------------------------------- 3. state_dict
@pytest.mark.parametrize("spec", [None, REMOVE, FOLD], ids=["traced", "remove", "fold"])
def test_state_dict_round_trip(spec):
    passes = [] if spec is None else [spec]
    x = torch.randn(2, 3, 64, 64)

    def build(seed: int) -> fx.GraphModule:
        torch.manual_seed(seed)
        model = _calibrate_bn(timm.create_model("resnet18", pretrained=False, num_classes=10), (4, 3, 64, 64),
                              seed=seed)
        return netsurgeon.transform(model, passes=passes, example_inputs=x)

    src = build(0)
    # one training step so parameters (and, traced, BN running stats) are not at init
    src.train()
    opt = torch.optim.SGD(src.parameters(), lr=0.01)
    F.cross_entropy(src(x), torch.tensor([1, 2])).backward()
    opt.step()
    src.eval()

    dst = build(1)  # a fresh model built the same way (other seed, so it starts different)
    with torch.no_grad():
        assert not torch.allclose(dst.eval()(x), src(x))

    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    result = dst.load_state_dict(loaded, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    assert list(sd_src) == list(sd_dst)
    assert {k: v.shape for k, v in sd_src.items()} == {k: v.shape for k, v in sd_dst.items()}
    torch.testing.assert_close(sd_dst, sd_src, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)
        torch.manual_seed(3)
        a = dst.train()(x)
        torch.manual_seed(3)
        b = src.train()(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 4. .to() / .double()
@STRIP_MODES
@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "resnetv2_18"])
def test_to_moves_every_constant(name, spec):
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    model = _calibrate_bn(timm.create_model(name, pretrained=False), (4, 3, 64, 64))
    gm = netsurgeon.transform(model, passes=[spec], example_inputs=x)
    targets = _assert_constants_registered(gm)
    if name == "mobilenetv3_small_050":
        assert targets, "expected get_attr nodes (the classifier) so the check is not vacuous"
    if name == "resnetv2_18" and spec is FOLD:
        # pre-activation norms after residual adds become ChannelAffine buffers
        affines = [m for m in gm.modules() if isinstance(m, netsurgeon.layers.ChannelAffine)]
        assert affines

    gm.eval()
    with torch.no_grad():
        ref = gm(x)

    # float64
    g64 = gm.double()
    assert all(t.dtype == torch.float64 for t in _registered(g64).values() if t.is_floating_point())
    with torch.no_grad():
        out64 = g64(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), ref, rtol=1e-3, atol=1e-3)

    # meta device, in both modes
    gmeta = g64.float().to("meta")
    assert all(t.device.type == "meta" for t in _registered(gmeta).values())
    for training in (False, True):
        gmeta.train(training)
        out = gmeta(torch.empty(2, 3, 64, 64, device="meta"))
        assert out.device.type == "meta" and out.shape == ref.shape


class _NormalizeThenBN(nn.Module):
    """Subtracts an input mean created in forward (a tensor constant for tracing)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


@STRIP_MODES
def test_trace_time_tensor_constants_become_buffers(spec):
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    model = _calibrate_bn(_NormalizeThenBN(), (4, 3, 8, 8))
    gm = netsurgeon.transform(model, passes=[spec], example_inputs=x)
    assert _assert_constants_registered(gm), "the constant should be a get_attr of a registered buffer"
    assert not any(k.startswith("_tensor_constant") for k in model.__dict__), "trace left attributes on the model"
    if netsurgeon.report(gm).preservation.value == "exact_eval":  # fold keeps the eval function
        with torch.no_grad():
            torch.testing.assert_close(gm.eval()(x), model.eval()(x))
    out = gm.eval().to("meta")(torch.empty(2, 3, 8, 8, device="meta"))
    assert out.device.type == "meta"


# ----------------------------------------------------------------------------- 5. torch.compile
def test_torch_compile_matches_eager():
    # Inductor (the default backend, C++ on CPU) is used: measured ~20-30 s for this net on 2 cores.
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    y = torch.randint(0, 10, (4,))
    model = _calibrate_bn(_small_bn_net(), (8, 3, 16, 16))
    gm = netsurgeon.transform(model, passes=["strip_bn"], example_inputs=x)
    assert _batchnorm_count(gm) == 0

    gm.eval()
    compiled = torch.compile(gm)
    with torch.no_grad():
        ref = gm(x)
        out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref, model(x), rtol=1e-4, atol=1e-5)  # fold kept the eval function

    # a training step through the compiled module gives the eager gradients
    gm.train()
    F.cross_entropy(gm(x), y).backward()
    eager_grads = {n: p.grad.clone() for n, p in gm.named_parameters()}
    gm.zero_grad(set_to_none=True)
    F.cross_entropy(compiled(x), y).backward()
    for n, p in gm.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- 6. DDP
_DDP_STEPS = 3
_DDP_LR = 0.1


def _ddp_model() -> fx.GraphModule:
    torch.manual_seed(1234)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    return netsurgeon.transform(model, passes=[REMOVE])


def _ddp_data(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return torch.randn(4 * world_size, 3, 32, 32, generator=g), torch.randint(0, 10, (4 * world_size,), generator=g)


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Spawned per rank: train the transformed model with DDP on this rank's shard."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        gm = _ddp_model()
        start = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        x, y = _ddp_data(world_size)
        xs, ys = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        ddp = DDP(gm)
        opt = torch.optim.SGD(ddp.parameters(), lr=_DDP_LR)
        for _ in range(_DDP_STEPS):
            opt.zero_grad()
            F.cross_entropy(ddp(xs), ys).backward()
            opt.step()
        end = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        checksum = torch.stack([p.detach().double().sum() for p in gm.parameters()]).sum()
        sums = [torch.zeros_like(checksum) for _ in range(world_size)]
        dist.all_gather(sums, checksum)
        torch.save({"start": start, "end": end, "checksums": [s.item() for s in sums]},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_ddp_two_cpu_processes(tmp_path):
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]

    assert res[0]["checksums"] == res[1]["checksums"]
    torch.testing.assert_close(res[0]["end"], res[1]["end"], rtol=0, atol=0)
    torch.testing.assert_close(res[0]["start"], res[1]["start"], rtol=0, atol=0)
    changed = [k for k in res[0]["end"] if not torch.equal(res[0]["end"][k], res[0]["start"][k])]
    assert changed and len(changed) == len(dict(_ddp_model().named_parameters()))

    # DDP averaged the shard gradients: same as one process training on the whole batch
    gm = _ddp_model()
    x, y = _ddp_data(world_size)
    opt = torch.optim.SGD(gm.parameters(), lr=_DDP_LR)
    for _ in range(_DDP_STEPS):
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    torch.testing.assert_close(res[0]["end"], gm.state_dict(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- 7. CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("spec", [None, REMOVE, FOLD], ids=["traced", "remove", "fold"])
def test_cuda_training_matches_cpu(spec):
    passes = [] if spec is None else [spec]
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    model = _calibrate_bn(timm.create_model("resnet10t", pretrained=False, num_classes=10), (8, 3, 32, 32))
    cpu = netsurgeon.transform(model, passes=passes, example_inputs=x)  # transform on CPU
    gpu = netsurgeon.transform(model, passes=passes, example_inputs=x).to("cuda")
    _assert_constants_registered(gpu)
    assert all(t.device.type == "cuda" for t in _registered(gpu).values())

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        for gm, dev in ((cpu, "cpu"), (gpu, "cuda")):
            gm.train()
            opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
            xd, yd = x.to(dev), y.to(dev)
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(gm(xd), yd).backward()
                opt.step()
        with torch.no_grad():
            out_cpu = cpu.eval()(x)
            out_gpu = gpu.eval()(x.to("cuda"))
        assert out_gpu.device.type == "cuda"
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-3, atol=1e-3)
        sd_gpu = {k: v.cpu() for k, v in gpu.state_dict().items()}
        torch.testing.assert_close(sd_gpu, cpu.state_dict(), rtol=1e-3, atol=1e-4)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = flags
