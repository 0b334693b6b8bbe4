"""``netsurgeon.optim.KFAC`` (issue 18 §1): factors against a brute-force per-example computation, the
Gauss-Newton step of a linear model, option checks, state_dict, GraphModules, and DDP (2 gloo processes)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netsurgeon
from conftest import gloo_group, spawn_gloo
from netsurgeon.errors import InvalidArgumentError
from netsurgeon.optim import KFAC


class _Net(nn.Module):
    """A grouped conv with bias (padding 1), a depthwise conv without bias, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(4, 4, 3, groups=4, bias=False)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        h = torch.tanh(self.dw(h))
        return self.head(h.flatten(1))


def _brute_patches(x: torch.Tensor, k: int, pad: int, groups: int, bias: bool) -> list[list[torch.Tensor]]:
    """``[example][group] -> [locations, n]``: each location's patch, read index by index."""
    xp = F.pad(x, (pad,) * 4)
    b, c, h, w = xp.shape
    cg = c // groups
    out = []
    for e in range(b):
        per_group = []
        for g in range(groups):
            rows = []
            for i in range(h - k + 1):
                for j in range(w - k + 1):
                    patch = [xp[e, g * cg + ch, i + di, j + dj] for ch in range(cg) for di in range(k) for dj in range(k)]
                    rows.append(torch.stack(patch + ([torch.tensor(1.0)] if bias else [])))
            per_group.append(torch.stack(rows))
        out.append(per_group)
    return out


def test_factors_equal_a_brute_force_per_example_computation():
    """A = mean over examples and locations of a aᵀ (bias: a trailing 1); G = B Σ_{examples, locations} g gᵀ
    with g the mean loss's gradient at the layer's output (per-example gradient B g), per group."""
    torch.manual_seed(0)
    net = _Net()
    opt = KFAC(net, lr=0.0, momentum=0.0, ema=0.0)
    x, y = torch.randn(5, 2, 5, 5), torch.randint(0, 3, (5,))
    outs: dict[str, torch.Tensor] = {}
    ins: dict[str, torch.Tensor] = {}
    def keep(name):
        def hook(m, args, out):
            ins[name], outs[name] = args[0].detach(), out
            out.retain_grad()
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in (("conv", net.conv), ("dw", net.dw), ("head", net.head))]
    F.cross_entropy(net(x), y).backward()
    for h in hooks:
        h.remove()
    opt.step()
    b = x.shape[0]
    for name, m, k, pad, groups in (("conv", net.conv, 3, 1, 2), ("dw", net.dw, 3, 0, 4)):
        patches = _brute_patches(ins[name], k, pad, groups, m.bias is not None)
        g = outs[name].grad  # [B, out, H, W]
        og = g.shape[1] // groups
        fa, fg = opt.factors(m.weight)
        for grp in range(groups):
            rows = torch.cat([patches[e][grp] for e in range(b)])
            a = rows.T @ rows / rows.shape[0]
            gg = g[:, grp * og:(grp + 1) * og].permute(0, 2, 3, 1).reshape(-1, og)
            torch.testing.assert_close(fa[grp], a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fg[grp], b * gg.T @ gg, rtol=1e-5, atol=1e-9)
    rows = torch.cat([ins["head"], torch.ones(b, 1)], dim=1)
    fa, fg = opt.factors(net.head.weight)
    torch.testing.assert_close(fa[0], rows.T @ rows / b, rtol=1e-5, atol=1e-6)
    g = outs["head"].grad
    torch.testing.assert_close(fg[0], b * g.T @ g, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode,damping", [("exact", 1e-8), ("factored", 1e-14)])
def test_one_step_on_a_linear_gaussian_model_is_the_gauss_newton_step(mode, damping):
    """With a Gaussian likelihood the Fisher of a linear model is its Gauss-Newton matrix A ⊗ I; the true
    Fisher's G is the identity in expectation (sampled here over 40 000 examples), so one step with tiny
    damping, lr 1 and no momentum lands where the Gauss-Newton step does: W - ∇W A⁻¹. (Factored damping adds
    √λ-sized terms to each factor, hence its smaller λ.)"""
    torch.manual_seed(0)
    n, d_in, d_out = 40_000, 4, 2
    x = torch.randn(n, d_in) @ torch.randn(d_in, d_in) + 0.5
    lin = nn.Linear(d_in, d_out)
    w_star = torch.randn(d_out, d_in + 1)
    y = torch.cat([x, torch.ones(n, 1)], 1) @ w_star.T + 0.1 * torch.randn(n, d_out)
    opt = KFAC(lin, lr=1.0, momentum=0.0, damping=damping, damping_mode=mode, fisher="true", likelihood="gaussian",
               ema=0.0)
    out = lin(x)
    opt.sample_fisher(out)
    assert lin.weight.grad is None  # sampling the Fisher leaves the gradients alone
    loss = 0.5 * (out - y).pow(2).sum() / n
    loss.backward()
    w = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()
    grad = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone()
    opt.step()
    xa = torch.cat([x, torch.ones(n, 1)], 1).double()
    a = xa.T @ xa / n
    expected = (w.double() - grad.double() @ torch.linalg.inv(a)).float()
    got = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)
    assert float((got - expected).norm() / (expected - w).norm()) < 0.03  # sampling noise of G, ~1/sqrt(n)
    torch.testing.assert_close(got, w_star, rtol=0.0, atol=0.05)  # and that step solves the least squares


def _block_mask(chunks: list[torch.Tensor], n: int) -> torch.Tensor:
    mask = torch.zeros(n, n, dtype=torch.bool)
    for idx in chunks:
        mask[idx[:, None], idx[None, :]] = True
    return mask


def _one_step(chunk, **kw):
    """A bias-free linear layer (7 -> 5) after one step with lr 1 and no momentum: (layer, W before, ∇W, A, G)
    with A and G the dense block-diagonal factors computed from scratch on the chunks the optimizer drew."""
    torch.manual_seed(0)
    lin = nn.Linear(7, 5, bias=False)
    opt = KFAC(lin, lr=1.0, momentum=0.0, ema=0.0, chunk_size=chunk, **kw)
    x = torch.randn(50, 7) @ torch.randn(7, 7)
    out = lin(x)
    out.retain_grad()
    F.cross_entropy(out, torch.randint(0, 5, (50,))).backward()
    w, grad = lin.weight.detach().clone(), lin.weight.grad.clone()
    opt.step()
    st = opt.state[lin.weight]
    a, g = (x.T @ x / 50).double(), (50 * out.grad.T @ out.grad).double()
    if chunk is not None:
        assert len(st["chunks"]) == 3 and len(st["chunks_G"]) == 2  # 7 = 3+3+1 inputs, 5 = 3+2 outputs
        a = torch.where(_block_mask(st["chunks"], 7), a, torch.zeros(()))
        g = torch.where(_block_mask(st["chunks_G"], 5), g, torch.zeros(()))
        assert not bool(_block_mask(st["chunks"], 7).all())
    fa, fg = opt.factors(lin.weight)
    torch.testing.assert_close(fa[0].double(), a, rtol=1e-4, atol=1e-6)  # only the blocks are kept
    torch.testing.assert_close(fg[0].double(), g, rtol=1e-4, atol=1e-9)
    return lin, w, grad, a, g


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole", "chunks"])
def test_exact_damping_solves_the_damped_kronecker_system(chunk):
    """damping_mode="exact": one step moves W by X with (A ⊗ G + λ I) vec(X) = vec(∇W) (column-major vec:
    (A ⊗ G) vec(X) = vec(G X A)); with chunk_size, A and G are replaced by their diagonal blocks."""
    lin, w, grad, a, g = _one_step(chunk, damping=0.3, damping_mode="exact")
    system = torch.kron(a, g) + 0.3 * torch.eye(35, dtype=torch.float64)
    x_vec = torch.linalg.solve(system, grad.double().T.reshape(-1))
    torch.testing.assert_close(w - lin.weight.detach(), x_vec.reshape(7, 5).T.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole", "chunks"])
def test_factored_damping_is_two_damped_inverses(chunk):
    """damping_mode="factored" (the default): X = (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹ with
    π² = (tr A / 7) / (tr G / 5) (Martens & Grosse §6.3), on the kept blocks."""
    lam = 0.3
    lin, w, grad, a, g = _one_step(chunk, damping=lam)
    pi = float(((a.trace() / 7) / (g.trace() / 5)).sqrt())
    expected = torch.linalg.solve(g + lam ** 0.5 / pi * torch.eye(5, dtype=torch.float64), grad.double()) \
        @ torch.linalg.inv(a + pi * lam ** 0.5 * torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(w - lin.weight.detach(), expected.float(), rtol=1e-4, atol=1e-6)
    assert abs(pi - 1) > 0.1  # the split is not the trivial one


def test_a_damping_change_takes_effect_at_the_next_step():
    """The factored inverses are rebuilt when the group's damping changes, without new statistics."""
    torch.manual_seed(0)
    net = _Net()
    opt = KFAC(net, lr=0.1, momentum=0.0, damping=1e-2, update_every=100, stats_every=100)
    _steps(net, opt, 1)
    before = [t.clone() for t in opt.state[net.head.weight]["iA"]]
    opt.param_groups[0]["damping"] = 1.0
    _steps(net, opt, 1)
    after = opt.state[net.head.weight]["iA"]
    assert opt.state[net.head.weight]["steps"] == 1  # no new statistics
    assert not torch.allclose(before[0], after[0])
    assert opt.state[net.head.weight]["damping"] == 1.0


def test_chunks_and_factored_damping_reduce_the_arithmetic():
    """Counted, not timed (FlopCounterMode) on a wide conv: the statistics (what the hooks add to a forward
    and backward), the refresh with the product (a statistics step's ``step``) and the product alone (a plain
    step's ``step``). Chunks cut all three; the exact mode's product costs twice the factored one's."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(**kw):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128 * 16, 4))
        opt = KFAC(net, lr=1e-3, update_every=1, stats_every=2, **kw)
        x, y = torch.randn(8, 64, 4, 4), torch.randint(0, 4, (8,))
        counts = []
        for _ in range(2):  # a statistics step, then a plain one
            for part in ("pass", "step"):
                counter = FlopCounterMode(display=False)
                with counter:
                    if part == "pass":
                        opt.zero_grad()
                        F.cross_entropy(net(x), y).backward()
                    else:
                        opt.step()
                counts.append(counter.get_total_flops())
        stats_pass, stats_step, plain_pass, plain_step = counts
        return stats_pass - plain_pass, stats_step, plain_step

    dense, chunked, exact = flops(), flops(chunk_size=64), flops(damping_mode="exact")
    assert min(dense) > 0 and min(chunked) > 0
    assert all(c < 0.7 * d for c, d in zip(chunked, dense)), (chunked, dense)
    assert exact[2] >= 1.9 * dense[2]


def test_bad_options_are_refused():
    net = nn.Linear(3, 2)
    for kwargs, what in [({"lr": -1.0}, "lr"), ({"damping": 0.0}, "damping"), ({"momentum": 1.0}, "momentum"),
                         ({"ema": 1.0}, "ema"), ({"update_every": 0}, "update_every"), ({"subsample": 0.0}, "subsample"),
                         ({"kl_clip": 0.0}, "kl_clip"), ({"fisher": "exact"}, "fisher"), ({"damping_mode": "eigen"}, "damping_mode"), ({"chunk_size": 0}, "chunk_size"),
                         ({"likelihood": "poisson"}, "likelihood"), ({"seed": 1.5}, "seed"),
                         ({"weight_decay": float("nan")}, "weight_decay")]:
        with pytest.raises(InvalidArgumentError, match=f"KFAC: {what}="):
            KFAC(net, **kwargs)
    with pytest.raises(InvalidArgumentError, match="model must be an nn.Module"):
        KFAC([nn.Parameter(torch.zeros(2))])
    opt = KFAC(net)
    with pytest.raises(InvalidArgumentError, match="fisher='true'"):
        opt.sample_fisher(net(torch.randn(4, 3)))


def _steps(net: nn.Module, opt: KFAC, n: int, seed: int = 0, true_fisher: bool = False) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x, y = torch.randn(16, 2, 5, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        out = net(x)
        if true_fisher:
            opt.sample_fisher(out)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("true_fisher", [False, True], ids=["empirical", "true"])
def test_state_dict_round_trip_continues_identically(true_fisher: bool):
    torch.manual_seed(0)
    kw = dict(lr=0.05, update_every=2, stats_every=2, damping=1e-2, kl_clip=1e-2, weight_decay=1e-4, chunk_size=5,
              fisher="true" if true_fisher else "empirical")
    net = _Net()
    opt = KFAC(net, **kw)
    _steps(net, opt, 3, true_fisher=true_fisher)
    net2 = copy.deepcopy(net)
    opt2 = KFAC(net2, **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt2._gen.set_state(opt._gen.get_state())  # the Fisher's draws continue from the same point
    _steps(net, opt, 3, seed=1, true_fisher=true_fisher)
    _steps(net2, opt2, 3, seed=1, true_fisher=true_fisher)
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(p, q)


def test_statistics_every_k_steps_amortize_the_factors():
    """With stats_every=3 the hooks collect on steps 0, 3, 6, ... only (and sample_fisher skips its backward
    in between); the preconditioner keeps its last factors on the other steps."""
    torch.manual_seed(0)
    net = _Net()
    opt = KFAC(net, lr=0.01, stats_every=3, update_every=1, fisher="true")
    calls = []
    hook = net.head.register_full_backward_hook(lambda m, gi, go: calls.append(1))
    _steps(net, opt, 7, true_fisher=True)
    hook.remove()
    assert opt.state[net.head.weight]["steps"] == 3  # steps 0, 3 and 6
    assert opt.state[net.head.weight]["refreshed_at"] == 6  # update_every=1: at each step with new factors
    opt4 = KFAC(net, lr=0.01, stats_every=3, update_every=4)
    _steps(net, opt4, 9)  # factors at 0, 3, 6; decompositions 4 or more steps apart, on new factors: 0, 4, 8
    assert opt4.state[net.head.weight]["refreshed_at"] == 8
    opt5 = KFAC(net, lr=0.01, stats_every=5, update_every=1)
    _steps(net, opt5, 9)  # factors at 0 and 5 only: decomposed then, not at the steps between
    assert opt5.state[net.head.weight]["refreshed_at"] == 5
    assert len(calls) == 7 + 3  # every loss backward, and the sampled backward on the three statistics steps
    with pytest.raises(InvalidArgumentError, match="KFAC: stats_every="):
        KFAC(net, stats_every=0)


def test_trains_a_transformed_graph_module_and_preconditions_only_layers():
    """A GraphModule from netsurgeon.transform trains; parameters that are not layer weights or their biases
    (a free scale) get the base update; the loss falls on a fixed batch."""
    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _Net()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.body(x) * self.scale

    gm = netsurgeon.transform(Scaled(), [("orthogonal_init", {"seed": 0})])
    opt = KFAC(gm, lr=0.05, damping=1e-2, update_every=1)
    assert gm.scale not in opt._layers and len(opt._layers) == 3
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 2, 5, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(gm(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert "momentum_buffer" in opt.state[gm.scale] and "A" not in opt.state[gm.scale]


def test_a_torch_compiled_model_trains_as_the_eager_one():
    """KFAC on ``torch.compile(model)`` (inductor, the default backend) with the true Fisher and amortized
    statistics takes the eager model's steps: the statistics hooks run eagerly inside the compiled forward
    and backward (dynamo, tracing them, had filed one layer's statistics under another's weight)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Net()
    net = copy.deepcopy(eager)
    kw = dict(lr=0.1, update_every=1, stats_every=2, fisher="true", chunk_size=5)
    opts = KFAC(eager, **kw), KFAC(net, **kw)
    compiled = torch.compile(net)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 2, 5, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            out = model(x)
            opt.sample_fisher(out)
            F.cross_entropy(out, y).backward()
            opt.step()
    assert opts[1].state[net.head.weight]["steps"] == 2  # statistics on steps 0 and 2
    for (name, p), q in zip(eager.named_parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()


def _ddp_kfac_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    from torch.nn.parallel import DistributedDataParallel as DDP

    with gloo_group(rank, world_size, port):
        torch.manual_seed(0)
        net = _Net()
        model = DDP(net)
        opt = KFAC(model, lr=0.05, damping=1e-2, update_every=2)
        g = torch.Generator().manual_seed(7)
        for _ in range(3):
            x, y = torch.randn(8 * world_size, 2, 5, 5, generator=g), torch.randint(0, 3, (8 * world_size,), generator=g)
            xs, ys = x.chunk(world_size)[rank] * (rank + 1), y.chunk(world_size)[rank]  # different shards
            opt.zero_grad()
            F.cross_entropy(model(xs), ys).backward()
            opt.step()
        torch.save({"factors": {n: opt.factors(m.weight)
                                for n, m in (("conv", net.conv), ("dw", net.dw), ("head", net.head))},
                    "params": {n: p.detach() for n, p in net.named_parameters()}}, Path(out_dir) / f"k{rank}.pt")


@pytest.mark.timeout(180)
def test_ddp_ranks_end_with_identical_factors_and_weights(tmp_path):
    spawn_gloo(_ddp_kfac_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"k{r}.pt", weights_only=True) for r in range(2))
    for n in r0["factors"]:
        for f0, f1 in zip(r0["factors"][n], r1["factors"][n]):
            torch.testing.assert_close(f0, f1)
    for n in r0["params"]:
        torch.testing.assert_close(r0["params"][n], r1["params"][n])
    torch.manual_seed(0)
    assert any(not torch.equal(p, q) for p, q in zip(r0["params"].values(), _Net().state_dict().values()))


def test_a_param_group_added_later_gets_its_own_settings():
    """add_param_group after construction: the new parameters get the base update with their group's lr."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    extra = nn.Parameter(torch.ones(2))
    opt = KFAC(lin, lr=0.1, momentum=0.0)
    opt.add_param_group({"params": [extra], "lr": 0.5, "weight_decay": 1.0})
    out = lin(torch.randn(8, 3)) * extra
    F.cross_entropy(out, torch.randint(0, 2, (8,))).backward()
    g = extra.grad.clone()
    opt.step()
    torch.testing.assert_close(extra.detach(), torch.ones(2) - 0.5 * (g + torch.ones(2)))
