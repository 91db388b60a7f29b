"""IO-Adam (docs/algorithms.md §5) against an independent dense float64 transcription of the spec."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _backends import BACKENDS, use_backend
from torch import nn

from lowmem.optim import IOAdam, state_bytes

IN, HID, OUT = 19, 37, 5




class Net(nn.Module):
    """Linear stack with a bias and a LayerNorm (AdamW path) and one weight shared by two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.norm = nn.LayerNorm(HID)
        self.mid = nn.Linear(HID, HID)  # with a bias, F.linear on 3-D input returns a view
        self.mid2 = nn.Linear(HID, HID, bias=False)
        self.mid2.weight = self.mid.weight  # tied: two modules, one parameter
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.fc1(x)))
        h = torch.relu_(self.mid(h))  # an in-place op on the Linear's output
        h = torch.tanh(self.mid2(h))
        return self.head(h)


IO_NAMES = ("fc1.weight", "mid.weight", "head.weight")


def make_net(seed: int = 0, dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def batches(steps: int, seed: int, tokens: tuple[int, ...] = (3, 4)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # The input scale changes from step to step so R and C histories matter.
    return [
        (torch.randn(*tokens, IN, generator=gen, dtype=torch.float64) * (0.5 + t % 3),
         torch.randn(*tokens, OUT, generator=gen, dtype=torch.float64))
        for t in range(steps)
    ]  # fmt: skip


# ------------------------------------------------------------------ the independent reference


def ref_forward(P: dict[str, torch.Tensor], x: torch.Tensor):
    """Net's forward, written out; returns the output and (weight name, X, Y) for every Linear call."""
    calls = []

    def linear(name, inp, bias=None):
        y = inp @ P[name].T + (0 if bias is None else P[bias])
        y.retain_grad()
        calls.append((name, inp, y))
        return y

    h = torch.tanh(F.layer_norm(linear("fc1.weight", x, "fc1.bias"), (HID,), P["norm.weight"], P["norm.bias"]))
    h = torch.relu(linear("mid.weight", h, "mid.bias"))
    h = torch.tanh(linear("mid.weight", h))
    return linear("head.weight", h, "head.bias"), calls


def reference_run(init, data, *, lr, betas, eps, wd, b, p, mode, micro=1):
    """docs/algorithms.md §5 line by line in float64: X, dY, R, C, M formed explicitly; AdamW for the rest."""
    b1, b2 = betas
    q = p / (p - 1)
    P = {k: v.clone().requires_grad_() for k, v in init.items()}
    M = {k: torch.zeros_like(v) for k, v in init.items()}
    V = {k: torch.zeros_like(v) for k, v in init.items() if k not in IO_NAMES}
    R = {k: torch.zeros(init[k].shape[0], b, dtype=torch.float64) for k in IO_NAMES}
    C = {k: torch.zeros(init[k].shape[1], b, dtype=torch.float64) for k in IO_NAMES}
    k = 0
    for t, (x, y) in enumerate(data, start=1):
        for v in P.values():
            v.grad = None
        s_in = {n: 0.0 for n in IO_NAMES}
        s_out = {n: 0.0 for n in IO_NAMES}
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            out, calls = ref_forward(P, xm)
            (F.mse_loss(out, ym) / micro).backward()
            for name, X, Y in calls:
                s_in[name] = s_in[name] + (X.detach().abs() ** p).reshape(-1, X.shape[-1]).sum(0)
                s_out[name] = s_out[name] + (Y.grad.abs() ** q).reshape(-1, Y.shape[-1]).sum(0)
        with torch.no_grad():
            for name, W in P.items():
                g = W.grad
                M[name] = b1 * M[name] + (1 - b1) * g
                decay = wd if W.ndim == 2 else 0.0
                W.mul_(1 - lr * decay)
                if name in IO_NAMES:
                    C[name][:, k] += (1 - b2) * s_in[name]
                    R[name][:, k] += (1 - b2) * s_out[name]
                    if mode == "paper":
                        D = sum(torch.outer(R[name][:, j] ** (2 / q), C[name][:, j] ** (2 / p)) for j in range(b)).sqrt()
                    else:
                        D = sum(torch.outer(R[name][:, j] ** (1 / q), C[name][:, j] ** (1 / p)) for j in range(b))
                    W.sub_(lr * (1 - b2**t) / (1 - b1**t) * M[name] / (D + eps))
                else:
                    V[name] = b2 * V[name] + (1 - b2) * g**2
                    W.sub_(lr * (M[name] / (1 - b1**t)) / ((V[name] / (1 - b2**t)).sqrt() + eps))
            for name in IO_NAMES:
                R[name] *= b2
                C[name] *= b2
        k = (k + 1) % b
    return {n: v.detach() for n, v in P.items()}, M, R, C


def run_lowmem(net, data, micro=1, **kw):
    opt = IOAdam(net, **kw)
    dtype = next(net.parameters()).dtype
    for x, y in data:
        opt.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            (F.mse_loss(net(xm.to(dtype)), ym.to(dtype)) / micro).backward()
        opt.step()
    return opt


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
@pytest.mark.parametrize("p", [2.0, 3.0])
@pytest.mark.parametrize("mode", ["paper", "per_slot"])
def test_matches_dense_float64_reference(mode, p, fused, backend, request):
    """The spec in float64 against the for-loop step (fused=False), the native step (float32:
    D built tile by tile, native AdamW) and the compiled one (float64, native library off), each
    with the statistics from hooks or from the fused backward."""
    dtype, fast_step, tol = use_backend(backend, request)
    steps, b = 110, 4
    net = make_net(dtype=dtype)
    init = {n: v.detach().double().clone() for n, v in net.named_parameters()}
    data = [(x.to(dtype).double(), y.to(dtype).double()) for x, y in batches(steps, seed=1)]  # what the net sees
    opt = run_lowmem(net, data, buffer_size=b, p=p, buffer_mode=mode, fused_linear=fused, fused=fast_step, **HP)
    ref_P, ref_M, ref_R, ref_C = reference_run(
        init, data, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], wd=HP["weight_decay"], b=b, p=p, mode=mode
    )
    named = dict(net.named_parameters())
    assert {n for g in opt.param_groups if g["io"] for n in g["param_names"]} == set(IO_NAMES)
    for name, param in named.items():
        assert rel_err(param.detach().double(), ref_P[name]) < tol, name
        assert rel_err(opt.state[param]["exp_avg"].double(), ref_M[name]) < tol, name
    for name in IO_NAMES:
        st = opt.state[named[name]]
        assert rel_err(st["out_stats"].double(), ref_R[name]) < tol
        assert rel_err(st["in_stats"].double(), ref_C[name]) < tol
        assert st["slot"] == steps % b and st["step"].item() == steps
        if fused:
            assert named[name].grad is None  # never materialised
    assert named["fc1.bias"].grad is not None


# ------------------------------------------------------------------ the bound at t = 1


def implied_denominator(tokens: int, p: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One step with b1 = 0, eps = 0, wd = 0: dW = -lr (1-b2) g / D, so D_hat = D/(1-b2) = lr |g| / |dW|."""
    torch.manual_seed(seed)
    lin = nn.Linear(7, 5, bias=False).double()
    w0 = lin.weight.detach().clone()
    opt = IOAdam(lin, lr=1e-3, betas=(0.0, 0.999), eps=0.0, weight_decay=0.0, buffer_size=3, p=p)
    x = torch.randn(tokens, 7, dtype=torch.float64)
    (lin(x) * torch.randn(tokens, 5, dtype=torch.float64)).sum().backward()
    g = lin.weight.grad.clone()
    opt.step()
    dw = (lin.weight.detach() - w0).abs()
    return 1e-3 * g.abs() / dw, g


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_single_token_second_moment_equals_g_squared(p):
    d_hat, g = implied_denominator(tokens=1, p=p)
    torch.testing.assert_close(d_hat**2, g**2, rtol=1e-10, atol=0)  # V_hat = g^2: Hölder/CS equality


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_many_tokens_second_moment_bounds_g_squared(p):
    d_hat, g = implied_denominator(tokens=64, p=p)
    assert (d_hat**2 >= g**2 * (1 - 1e-12)).all()
    assert (d_hat**2 > 1.5 * g**2).any()  # and the bound is not tight here


# ------------------------------------------------------------------ accumulation, eval, leaks


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_two_micro_batches_equal_one_full_batch_and_eval_forwards_leak_nothing(fused):
    data = batches(25, seed=2, tokens=(6, 4))
    full = make_net()
    run_lowmem(full, data, buffer_size=3, fused_linear=fused, **HP)
    net = make_net()
    opt = IOAdam(net, buffer_size=3, fused_linear=fused, **HP)
    probe = torch.randn(2, 4, IN, dtype=torch.float64)
    for x, y in data:
        opt.zero_grad()
        for xm, ym in zip(x.chunk(2), y.chunk(2)):
            (F.mse_loss(net(xm), ym) / 2).backward()
            net.eval()
            with torch.no_grad():
                net(probe)  # validation forward
            net(probe).sum()  # grad-enabled forward that never gets a backward
            net.train()
        opt.step()
    for (name, a), b in zip(net.named_parameters(), full.parameters()):
        assert rel_err(a.detach(), b.detach()) < 1e-10, name


def test_backward_then_zero_grad_without_step_leaks_nothing():
    data = batches(8, seed=3)
    clean = make_net()
    run_lowmem(clean, data, buffer_size=2, **HP)
    net = make_net()
    opt = IOAdam(net, buffer_size=2, **HP)
    for x, y in data:
        F.mse_loss(net(x * 7), y).backward()  # e.g. a step the GradScaler would skip
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()
    for a, b in zip(net.parameters(), clean.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ tied embedding


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(13, 8, padding_idx=0)
        self.fc = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 13, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.fc(self.wte(ids))))


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_embedding_tied_weight_adds_counts_and_embedding_grads_to_one_buffer(p):
    torch.manual_seed(0)
    lm = TiedLM().double()
    b2, q = 0.99, p / (p - 1)
    opt = IOAdam(lm, lr=0.0, betas=(0.9, b2), buffer_size=2, p=p)
    assert [n for g in opt.param_groups if g["io"] for n in g["param_names"]] == ["wte.weight", "fc.weight"]
    ids = torch.randint(0, 13, (4, 6))
    ids[0, :2] = 0  # padding tokens: no embedding gradient
    # Explicit statistics from a second, hook-free pass over the same weights.
    E = F.embedding(ids, lm.wte.weight.detach(), padding_idx=0).requires_grad_()
    H = torch.tanh(F.linear(E, lm.fc.weight.detach(), lm.fc.bias.detach()))
    Y = F.linear(H, lm.wte.weight.detach()).requires_grad_()
    Y.retain_grad()
    F.cross_entropy(Y.reshape(-1, 13), ids.reshape(-1)).backward()
    # dE: the gradient reaching the embedding output through fc.
    E2 = F.embedding(ids, lm.wte.weight.detach(), padding_idx=0).requires_grad_()
    H2 = torch.tanh(F.linear(E2, lm.fc.weight.detach(), lm.fc.bias.detach()))
    F.cross_entropy(F.linear(H2, lm.wte.weight.detach()).reshape(-1, 13), ids.reshape(-1)).backward()
    counts = torch.bincount(ids.reshape(-1), minlength=13).double()
    counts[0] = 0
    s_out = (Y.grad.abs() ** q).reshape(-1, 13).sum(0) + counts
    s_in = (H.detach().abs() ** p).reshape(-1, 8).sum(0) + (E2.grad.abs() ** p).reshape(-1, 8).sum(0)

    F.cross_entropy(lm(ids).reshape(-1, 13), ids.reshape(-1)).backward()
    g = lm.wte.weight.grad.clone()
    opt.step()
    st = opt.state[lm.wte.weight]
    # After the step the slot holds b2 (1-b2) * (this step's sums).
    torch.testing.assert_close(st["out_stats"][:, 0] / (b2 * (1 - b2)), s_out, rtol=1e-10, atol=0)
    torch.testing.assert_close(st["in_stats"][:, 0] / (b2 * (1 - b2)), s_in, rtol=1e-10, atol=0)
    bound = torch.outer(s_out ** (1 / q), s_in ** (1 / p))  # Hölder over the union of both uses
    assert (g.abs() <= bound * (1 + 1e-12)).all()


def test_fused_with_tied_embedding_matches_hooks():
    ids = [torch.randint(0, 13, (4, 6), generator=torch.Generator().manual_seed(s)) for s in range(15)]
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        lm = TiedLM().double()
        opt = IOAdam(lm, lr=1e-2, buffer_size=2, fused_linear=fused)
        for batch in ids:
            opt.zero_grad()
            F.cross_entropy(lm(batch).reshape(-1, 13), batch.reshape(-1)).backward()
            if fused:
                assert lm.fc.weight.grad is None and lm.wte.weight.grad is not None  # embedding side only
            opt.step()
        results.append([p.detach().clone() for p in lm.parameters()])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("backend", ["native", "compiled"])
@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
@pytest.mark.parametrize("mode, p", [("paper", 2.0), ("per_slot", 3.0), ("paper", 3.0)])
def test_fast_step_follows_the_for_loop(mode, p, fused, backend, request):
    """fused=True against fused=False on the same batches: the Linear net (a weight used
    by two modules, an in-place op after a Linear), the tied-embedding LM (the embedding's counts
    and dE in the same buffers; with fused_linear=True its grad is added to the fused momentum) and a
    Hugging Face Conv1D net (the (n_in, n_out) layout)."""
    from test_ioadam_conv1d import SIZES, ConvNet

    dtype, _, _ = use_backend(backend, request)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    gen = torch.Generator().manual_seed(5)
    cases = [
        (make_net(dtype=dtype), lambda: (torch.randn(3, 4, IN, generator=gen),), lambda out: out.square().mean()),
        (TiedLM().to(dtype), lambda: (torch.randint(0, 13, (4, 6), generator=gen),), lambda out: out.square().mean()),
        (ConvNet().to(dtype), lambda: (torch.randn(2, 5, SIZES[0][0], generator=gen),), lambda out: out.abs().mean()),
        # rows of 130 and 70 columns: the kernel's 64-column register tiles and its remainder
        (nn.Sequential(nn.Linear(130, 70), nn.Tanh(), nn.Linear(70, 3)).to(dtype),
         lambda: (torch.randn(9, 130, generator=gen),), lambda out: out.square().mean()),
    ]  # fmt: skip
    for net, inputs, loss in cases:
        twin = copy.deepcopy(net)
        kw = dict(lr=1e-2, buffer_size=3, p=p, buffer_mode=mode, fused_linear=fused)
        loop, fast = IOAdam(net, fused=False, **kw), IOAdam(twin, fused=True, **kw)
        for _ in range(8):
            args = [a.to(dtype) if a.is_floating_point() else a for a in inputs()]
            for model, opt in ((net, loop), (twin, fast)):
                opt.zero_grad()
                loss(model(*args)).backward()
                opt.step()
        for (name, a), b in zip(net.named_parameters(), twin.parameters()):
            assert rel_err(b.detach(), a.detach()) < tol, (type(net).__name__, name)
            for key, value in loop.state[a].items():
                if isinstance(value, torch.Tensor) and key != "step":
                    assert rel_err(fast.state[b][key], value) < tol, (type(net).__name__, name, key)
                else:
                    assert fast.state[b][key] == value, (type(net).__name__, name, key)


def test_fast_step_routing_and_validation(monkeypatch):
    """fused=None: the fast step from 2**20 elements (not below); a bad value is named."""
    from lowmem.optim import ioadam as ioadam_module

    calls = []
    real = ioadam_module._io_adam_fast
    monkeypatch.setattr(ioadam_module, "_io_adam_fast", lambda *a, **k: calls.append(1) or real(*a, **k))
    for width, expected in ((8, 0), (1024, 1)):
        lin = nn.Linear(width, width, bias=False)
        opt = IOAdam(lin)
        lin(torch.randn(2, width)).sum().backward()
        calls.clear()
        opt.step()
        assert len(calls) == expected, width
    with pytest.raises(ValueError, match="fused='yes'"):
        IOAdam(nn.Linear(2, 2), fused="yes")


def test_float32_cpu_weights_take_the_native_kernels(monkeypatch):
    from lowmem.optim import _native

    lib, used = _native.library(), set()

    class Spy:
        def __getattr__(self, name):
            used.add(name)
            return getattr(lib, name)

    monkeypatch.setattr(_native, "library", lambda: Spy())
    net = make_net(dtype=torch.float32)
    opt = IOAdam(net, fused=True)
    net(torch.randn(3, IN)).square().mean().backward()
    opt.step()
    assert {"lowmem_ioadam_f32", "lowmem_adamw_f32"} <= used


# ------------------------------------------------------------------ which weights, errors


def test_multihead_attention_out_proj_gets_adamw_and_bypass_is_reported():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.mha(x, x, x)[0])

    attn = Attn()
    opt = IOAdam(attn, lr=1e-3)
    assert [n for g in opt.param_groups if g["io"] for n in g["param_names"]] == ["fc.weight"]
    attn(torch.randn(2, 3, 8)).sum().backward()
    opt.step()

    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(x, self.lin.weight)

    model = Bypass()
    opt = IOAdam(model)
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="bypasses the module"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, word",
    [({"p": 1.0}, "p=1.0"), ({"p": float("inf")}, "p=inf"), ({"buffer_mode": "x"}, "buffer_mode"),
     ({"buffer_size": 0}, "buffer_size"), ({"buffer_size": 2.5}, "buffer_size"), ({"lr": -1.0}, "lr"),
     ({"betas": (0.9, 1.0)}, "beta2"), ({"adamw_lr": -1.0}, "lr")],
)  # fmt: skip
def test_rejects_bad_hyperparameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        IOAdam(nn.Linear(3, 3), **kwargs)
    with pytest.raises(TypeError, match="IOAdam\\(model"):
        IOAdam(nn.Linear(3, 3).parameters())


def test_adamw_lr_and_groups():
    net = make_net()
    opt = IOAdam(net, lr=0.02, adamw_lr=1e-4)
    io = [g for g in opt.param_groups if g["io"]]
    assert len(io) == 1 and io[0]["lr"] == 0.02 and io[0]["weight_decay"] == 0.1
    others = [g for g in opt.param_groups if not g["io"]]
    assert all(g["lr"] == 1e-4 for g in others) and {g["weight_decay"] for g in others} == {0.0}


# ------------------------------------------------------------------ fused mode, hooks lifecycle


def test_fused_refuses_ddp(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="DDP.*fused_linear=False"):
        IOAdam(make_net(), fused_linear=True)


@pytest.mark.parametrize("fused", [False, True])
def test_remove_hooks_and_context_manager(fused):
    net = make_net()
    with IOAdam(net, fused_linear=fused) as opt:
        assert ("forward" in net.fc1.__dict__) == fused and bool(net.fc1._forward_hooks) != fused
        F.mse_loss(net(torch.randn(2, IN, dtype=torch.float64)), torch.zeros(2, OUT, dtype=torch.float64)).backward()
        opt.step()
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in net.modules())
    opt.zero_grad()
    net(torch.randn(2, IN, dtype=torch.float64)).sum().backward()
    assert net.fc1.weight.grad is not None  # a plain module again
    with pytest.raises(RuntimeError, match="hooks were removed"):
        opt.step()


def test_discarded_optimizer_detaches_its_hooks():
    net = make_net()
    opt = IOAdam(net, fused_linear=True)
    del opt
    import gc

    gc.collect()
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in net.modules())


# ------------------------------------------------------------------ DDP statistics


def _threaded_all_reduce(world: int):
    """A fake SUM all-reduce for ranks simulated by threads (rank = thread index)."""
    slots: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(world, timeout=20)
    local = threading.local()

    def all_reduce(tensor, op=None, group=None):
        slots[local.rank] = tensor.clone()
        barrier.wait()
        total = sum(slots[r] for r in range(world))
        barrier.wait()
        tensor.copy_(total)

    return all_reduce, local


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_ddp_statistics_are_averaged_and_match_one_process_on_the_whole_batch(monkeypatch, p):
    """Two replicas (threads) on two halves of each batch, gradients averaged as DDP does and
    R, C averaged by IOAdam's all-reduce: both stay identical and equal one process on the batch."""
    world, steps = 2, 12
    data = batches(steps, seed=4, tokens=(4, 3))
    single = make_net()
    run_lowmem(single, data, buffer_size=3, p=p, **HP)

    all_reduce, local = _threaded_all_reduce(world)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    nets = [make_net() for _ in range(world)]
    opts = [IOAdam(n, buffer_size=3, p=p, **HP) for n in nets]
    for x, y in data:
        for r in range(world):
            opts[r].zero_grad()
            F.mse_loss(nets[r](x.chunk(world)[r]), y.chunk(world)[r]).backward()
        for params in zip(*(n.parameters() for n in nets)):  # DDP's gradient average
            mean = sum(q.grad for q in params) / world
            for q in params:
                q.grad = mean.clone()
        errors = []

        def step(r):
            local.rank = r
            try:
                opts[r].step()
            except Exception as e:  # noqa: BLE001 - surfaced below
                errors.append(e)

        threads = [threading.Thread(target=step, args=(r,)) for r in range(world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=30)
        assert not errors, errors
    for a, b, ref in zip(nets[0].parameters(), nets[1].parameters(), single.parameters()):
        assert torch.equal(a, b)  # replicas never drift
        assert rel_err(a.detach(), ref.detach()) < 1e-10


# ------------------------------------------------------------------ state dict and memory


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_state_dict_round_trip_continues_bit_for_bit(fused):
    data = batches(14, seed=5)
    net = make_net()
    opt = run_lowmem(net, data[:7], buffer_size=4, fused_linear=fused, **HP)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    net2 = copy.deepcopy(net)
    opt2 = IOAdam(net2, buffer_size=4, fused_linear=fused, **HP)
    opt2.load_state_dict(loaded)
    w = net.fc1.weight
    assert set(loaded["state"][0]) == {"step", "slot", "exp_avg", "out_stats", "in_stats"} and loaded["state"][0]["slot"] == 3
    for o, n in ((opt, net), (opt2, net2)):
        for x, y in data[7:]:
            o.zero_grad()
            F.mse_loss(n(x), y).backward()
            o.step()
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    for p_a, p_b in zip(net.parameters(), net2.parameters()):
        for key, value in opt.state[p_a].items():
            other = opt2.state[p_b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    assert opt.state[w]["step"].item() == 14


def test_bf16_params_keep_fp32_state_across_load():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).to(torch.bfloat16)
    opt = IOAdam(net, buffer_size=2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 9, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k not in ("slot",))
    opt2 = IOAdam(copy.deepcopy(net), buffer_size=2)
    opt2.load_state_dict(opt.state_dict())
    for s_a, s_b in zip(opt.state.values(), opt2.state.values()):
        for key in ("exp_avg", "out_stats", "in_stats", "exp_avg_sq"):
            if key in s_a:
                assert s_b[key].dtype == torch.float32 and torch.equal(s_a[key], s_b[key])


def test_bf16_autocast_fused_matches_hooks():
    out = []
    for fused in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(9, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
        opt = IOAdam(net, lr=1e-2, buffer_size=2, fused_linear=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = net(torch.randn(6, 2, 9, generator=gen)).float().pow(2).mean()
            loss.backward()
            opt.step()
        out.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)  # bf16 grads computed in different orders


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_state_bytes_is_momentum_plus_io_buffers(fused):
    b = 5
    net = make_net(dtype=torch.float32)
    opt = run_lowmem(net, [(x.float(), y.float()) for x, y in batches(2, seed=6)], buffer_size=b, fused_linear=fused)
    step_bytes = 4 * len(opt.state)
    io_bytes = sum(4 * (w.numel() + b * sum(w.shape)) for g in opt.param_groups if g["io"] for w in g["params"])
    adamw_bytes = sum(8 * w.numel() for g in opt.param_groups if not g["io"] for w in g["params"])
    sb = state_bytes(opt)
    assert sb["state"] == io_bytes + adamw_bytes + step_bytes and sb["grad_buffers"] == 0
    io_grads = sum(w.grad is not None for g in opt.param_groups if g["io"] for w in g["params"])
    assert io_grads == (0 if fused else 3)


def _ddp_worker(rank: int, world: int, tmp: str, steps: int, p: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        net = make_net()
        opt = IOAdam(net, buffer_size=3, p=p, **HP)
        ddp = nn.parallel.DistributedDataParallel(net)
        for x, y in batches(steps, seed=4, tokens=(4, 3)):
            opt.zero_grad()
            F.mse_loss(ddp(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
            opt.step()
        torch.save([q.detach() for q in net.parameters()], f"{tmp}/rank{rank}.pt")
        # The DDP reducer holds the process group; drop it and let both ranks finish before the
        # teardown, or gloo's threads may abort the process at exit ("terminate called without an
        # active exception", SIGABRT) after a run that succeeded.
        del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_real_ddp_gloo_two_processes_match_one_process(tmp_path):
    from scripts.spawn import run_workers

    world, steps, p = 2, 12, 3.0
    run_workers(_ddp_worker, (world, str(tmp_path), steps, p), nprocs=world, timeout_s=180)
    single = make_net()
    run_lowmem(single, batches(steps, seed=4, tokens=(4, 3)), buffer_size=3, p=p, **HP)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for a, b, ref in zip(*ranks, single.parameters()):
        assert torch.equal(a, b)
        assert rel_err(a, ref.detach()) < 1e-10


@pytest.mark.parametrize("p", [2.0, 3.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_power_sum_is_the_sum_over_tokens(dtype, p, request):
    """The hooks' reduction: native (float32, one and two threads), chunked (other dtypes, a
    non-contiguous input) and with the native library off, against float64."""
    from lowmem.optim._io_stats import power_sum

    x = torch.randn(3, 700, 29, dtype=torch.float64) * 3
    want = (x.abs() ** p).reshape(-1, 29).sum(0)
    for t in (x.to(dtype), x.to(dtype).transpose(0, 1)):
        tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
        got = power_sum(t, p)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert rel_err(got.double(), (t.double().abs() ** p).reshape(-1, 29).sum(0)) < max(tol, 1e-6)
        assert rel_err(got.double(), want) < tol
    big = torch.randn(1 << 20 | 7, 3)  # above the kernel's one-thread limit
    torch.testing.assert_close(power_sum(big, p).double(), (big.double().abs() ** p).sum(0), rtol=1e-6, atol=0)
