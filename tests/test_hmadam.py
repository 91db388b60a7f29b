"""HMAdam / HMAdamW (docs/algorithms.md §1) against an independent float64 transcription of the spec.

The reference below follows the spec literally: zero_grad() decays B, backward adds the mean
gradient, step() updates W and v. The optimizer fuses the decay into the end of step(); for the
loop ``zero_grad(); backward(); step()`` both must give the same trajectory.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import pytest
from _backends import BACKENDS, use_backend
import torch
from torch import nn

from lowmem.optim import HMAdam, HMAdamW, state_bytes

SHAPES = [(37, 19), (53,), (5, 3, 3, 3)]


class Reference:
    """docs/algorithms.md §1 line by line, float64, one tensor per parameter."""

    def __init__(self, params, *, betas, eps, wd, decoupled, correction, max_norm=None):
        self.w = [p.detach().clone().double() for p in params]
        self.v = [torch.zeros_like(w) for w in self.w]
        self.B = [torch.zeros_like(w) for w in self.w]
        self.b1, self.b2 = betas
        self.eps, self.wd, self.decoupled, self.correction, self.max_norm = eps, wd, decoupled, correction, max_norm
        self.t = 0

    def zero_grad(self):
        self.B = [self.b1 * B for B in self.B]

    def backward(self, grads):
        self.B = [B + g for B, g in zip(self.B, grads)]

    def c(self, t):
        b1 = self.b1
        return {
            "noise": (1 + b1) / ((1 - b1) * (1 - b1 ** (2 * t))),
            "stationary": (1 + b1) / (1 - b1),
            "none": 1.0,
        }[self.correction]

    def step(self, lr):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        if self.max_norm is not None:
            norm = math.sqrt(sum(((1 - b1) * B).pow(2).sum().item() for B in self.B))
            coef = min(1.0, self.max_norm / (norm + 1e-6))
            self.B = [coef * B for B in self.B]
        for i in range(len(self.w)):
            if not self.decoupled:
                self.B[i] = self.B[i] + self.wd * self.w[i]
            m = (1 - b1) * self.B[i]
            self.v[i] = b2 * self.v[i] + (1 - b2) * self.c(t) * m**2
            if self.decoupled:
                self.w[i] = self.w[i] * (1 - lr * self.wd)
            self.w[i] = self.w[i] - lr * (m / (1 - b1**t)) / (torch.sqrt(self.v[i] / (1 - b2**t)) + self.eps)


def micro_grads(shape, steps, accumulation, seed, dtype=torch.float64):
    """Per step, ``accumulation`` micro-batch gradients with a drifting mean (signal + noise)."""
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(shape, generator=gen, dtype=torch.float64)
    return [
        [(0.3 * signal * math.cos(t / 20) + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
         for _ in range(accumulation)]
        for t in range(steps)
    ]  # fmt: skip


def backward(params, grads, accumulation):
    """Accumulate ``grads`` into ``.grad`` exactly as autograd does, with a mean-reduced loss."""
    loss = sum((p * g.to(p.dtype)).sum() for p, g in zip(params, grads)) / accumulation
    loss.backward()


def assert_rel(actual, expected, tol):
    actual, expected = actual.detach().double(), expected.double()
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    assert err < tol, f"relative error {err:.3e} >= {tol:g}"


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def run(opt_cls, params, grads_per_param, accumulation, lrs, reference=None, **kwargs):
    opt = opt_cls(params, lr=lrs[0], **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lrs[min(t, len(lrs) - 1)] / lrs[0])
    for t in range(len(lrs)):
        opt.zero_grad()
        if reference is not None:
            reference.zero_grad()
        for k in range(accumulation):
            backward(params, [g[t][k] for g in grads_per_param], accumulation)
        if reference is not None:
            reference.backward([sum(g[t]) / accumulation for g in grads_per_param])
            reference.step(lrs[t])
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[t])
        opt.step()
        scheduler.step()
    return opt


# ------------------------------------------------------------------------ 1. exact maths
@pytest.mark.parametrize(
    "opt_cls,correction,accumulation",
    [
        (HMAdamW, "noise", 1),
        (HMAdamW, "noise", 2),
        (HMAdamW, "noise", 4),
        (HMAdam, "noise", 2),
        (HMAdamW, "stationary", 1),
        (HMAdamW, "none", 1),
    ],
)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_matches_float64_reference(opt_cls, correction, accumulation, backend, request):
    dtype, fused, tol = use_backend(backend, request)
    steps, betas, eps, wd = 120, (0.9, 0.999), 1e-8, 0.05
    params = make_params(dtype)
    grads = [micro_grads(p.shape, steps, accumulation, seed=i) for i, p in enumerate(params)]
    lrs = [1e-2 * (1 - t / (2 * steps)) for t in range(steps + 1)]  # a schedule: lr is read every step
    ref = Reference(params, betas=betas, eps=eps, wd=wd, decoupled=opt_cls is HMAdamW, correction=correction)
    opt = run(opt_cls, params, grads, accumulation, lrs[:steps], ref, betas=betas, eps=eps, weight_decay=wd,
              variance_correction=correction, fused=fused)  # fmt: skip
    opt.zero_grad()
    ref.zero_grad()
    for i, p in enumerate(params):
        assert_rel(p, ref.w[i], tol)
        assert_rel(opt.state[p]["exp_avg_sq"], ref.v[i], tol)
        assert_rel(p.grad, ref.B[i], tol)  # the momentum, after the decay for the next step
        assert opt.state[p]["step"].item() == steps
    # Negative control: another variance correction lands far outside the tolerance.
    other = Reference(make_params(), betas=betas, eps=eps, wd=wd, decoupled=opt_cls is HMAdamW,
                      correction="none" if correction != "none" else "noise")  # fmt: skip
    for t in range(steps):
        other.zero_grad()
        other.backward([sum(g[t]) / accumulation for g in grads])
        other.step(lrs[t])
    assert max((p.detach() - w).abs().max().item() for p, w in zip(params, other.w)) > 1e-3


def test_coupled_l2_enters_the_history():
    """HMAdam: the L2 term is part of B, so it decays into the next step's momentum."""
    p = nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
    opt = HMAdam([p], lr=0.1, betas=(0.5, 0.9), weight_decay=0.25, fused=False)
    p.grad = torch.zeros_like(p)
    opt.step()
    # B = 0 + 0.25 * 2 = 0.5 entered the history; after the step the buffer holds b1 * B.
    torch.testing.assert_close(p.grad, torch.full((3,), 0.25, dtype=torch.float64))
    q = nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
    optw = HMAdamW([q], lr=0.1, betas=(0.5, 0.9), weight_decay=0.25, fused=False)
    q.grad = torch.zeros_like(q)
    optw.step()
    torch.testing.assert_close(q.grad, torch.zeros(3, dtype=torch.float64))  # decoupled: B untouched
    torch.testing.assert_close(q.detach(), torch.full((3,), 2.0 * (1 - 0.1 * 0.25), dtype=torch.float64))


# ---------------------------------------------------------- 2. zero_grad decays, never frees
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_decays_in_place(set_to_none):
    p = nn.Parameter(torch.randn(4, 3))
    opt = HMAdamW([p], betas=(0.8, 0.99), fused=False)
    (p * torch.arange(12.0).view(4, 3)).sum().backward()
    buf, before = p.grad, p.grad.clone()
    opt.zero_grad(set_to_none=set_to_none)
    assert p.grad is buf and p.grad.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(p.grad, 0.8 * before)
    opt.zero_grad(set_to_none=set_to_none)  # a second call before step() does not decay again
    torch.testing.assert_close(p.grad, 0.8 * before)


def test_decay_happens_once_per_step_at_the_end_of_step():
    p = nn.Parameter(torch.randn(5))
    opt = HMAdamW([p], betas=(0.9, 0.99), fused=False)
    for _ in range(3):
        opt.zero_grad()
        p.sum().backward()
        opt.step()
    buf = p.grad.clone()
    opt.zero_grad()  # step() already applied this decay: nothing left to do
    torch.testing.assert_close(p.grad, buf)
    p.sum().backward()
    before_step = p.grad.clone()
    opt.step()
    torch.testing.assert_close(p.grad, 0.9 * before_step)


def test_reset_momentum_zeroes_in_place():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    opt = HMAdamW([a, b], fused=False)
    (a.sum() + b.sum()).backward()
    opt.step()
    ptr = a.grad.data_ptr()
    opt.reset_momentum([a])
    assert a.grad.data_ptr() == ptr and torch.count_nonzero(a.grad) == 0
    assert torch.count_nonzero(b.grad) == 2
    opt.reset_momentum()
    assert torch.count_nonzero(b.grad) == 0
    opt.step()  # the guard accepts an explicit reset


# -------------------------------------------------------------------------------- 3. guard
def _trained(n=2, **kwargs):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = HMAdamW(model.parameters(), fused=False, **kwargs)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_guard_model_zero_grad_set_to_none():
    model, opt = _trained()
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()  # a training loop's habit: frees every buffer
    opt.zero_grad()  # calling ours afterwards must not hide it
    model(torch.randn(8, 4)).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match=r"parameter 0 \(group 0, shape \(3, 4\)\).*replaced") as info:
        opt.step()
    msg = str(info.value)
    assert "model.zero_grad()" in msg and "optimizer.zero_grad()" in msg and "Lightning" in msg
    for p, q in zip(model.parameters(), before):  # nothing was touched
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_guard_freed_buffer():
    model, opt = _trained()
    last = list(model.parameters())[-1]
    last.grad = None
    with pytest.raises(RuntimeError, match=r"parameter 3 \(group 0, shape \(2,\)\) was freed"):
        opt.step()


def test_guard_replaced_buffer_and_accept():
    model, opt = _trained()
    p = next(model.parameters())
    p.grad = p.grad.clone()  # same values, new storage
    with pytest.raises(RuntimeError, match="replaced"):
        opt.step()
    opt.accept_grad_buffers()  # an integration that moved buffers without changing them
    opt.step()


def test_params_without_gradient():
    used, never, unused = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = HMAdamW([used, never, unused], lr=0.1, fused=False)
    (used.sum() + unused.sum()).backward()
    opt.step()
    assert never.grad is None and len(opt.state[never]) == 0  # never had momentum: skipped like Adam
    before, buf = unused.detach().clone(), unused.grad.clone()
    opt.zero_grad()
    used.sum().backward()  # `unused` gets no new gradient this step
    opt.step()
    assert not torch.equal(unused.detach(), before)  # it still steps with its decayed momentum ...
    torch.testing.assert_close(unused.grad, 0.9 * buf)  # ... and its buffer still decays
    assert opt.state[unused]["step"].item() == 2


# ---------------------------------------------------------------------- 4. state and resume
def _resume_run(tmp_path, dtype, opt_kwargs):
    torch.manual_seed(0)
    data = [(torch.randn(16, 6, dtype=dtype), torch.randn(16, 2, dtype=dtype)) for _ in range(60)]

    def make():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
        return model, HMAdamW(model.parameters(), lr=1e-2, **opt_kwargs)

    def train(model, opt, batches):
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            for half in (slice(0, 8), slice(8, 16)):  # accumulation 2
                ((model(x[half]) - y[half]).pow(2).mean() / 2).backward()
            opt.step()

    model_a, opt_a = make()
    train(model_a, opt_a, data)
    model_b, opt_b = make()
    train(model_b, opt_b, data[:30])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, path)
    assert all("momentum_buffer" not in s for s in opt_b.state.values())  # live state not polluted
    model_c, opt_c = make()
    ckpt = torch.load(path, weights_only=True)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    train(model_c, opt_c, data[30:])
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
        assert torch.equal(pa.grad, pc.grad)
        assert torch.equal(opt_a.state[pa]["exp_avg_sq"], opt_c.state[pc]["exp_avg_sq"])
        assert opt_c.state[pc]["exp_avg_sq"].dtype == opt_a.state[pa]["exp_avg_sq"].dtype
        assert opt_c.state[pc]["step"].dtype == torch.float32 and opt_c.state[pc]["step"].device.type == "cpu"
    return opt_c


@pytest.mark.parametrize("correction", ["auto", "noise"])
def test_resume_bit_for_bit(tmp_path, correction):
    _resume_run(tmp_path, torch.float32, {"fused": False, "variance_correction": correction})


def test_resume_bf16_keeps_fp32_state(tmp_path):
    opt = _resume_run(tmp_path, torch.bfloat16, {"fused": False})
    p = opt.param_groups[0]["params"][0]
    assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32


def test_load_copies_into_existing_buffer_and_restores_pending_decay():
    p = nn.Parameter(torch.randn(4))
    opt = HMAdamW([p], betas=(0.5, 0.99), fused=False)
    p.sum().backward()  # a buffer exists, no step yet: zero_grad() still owes the decay
    sd = opt.state_dict()
    q = nn.Parameter(p.detach().clone())
    q.grad = torch.full((4,), 7.0)
    existing = q.grad
    opt2 = HMAdamW([q], betas=(0.5, 0.99), fused=False)
    opt2.load_state_dict(sd)
    assert q.grad is existing and torch.equal(q.grad, torch.ones(4))
    opt2.zero_grad()
    torch.testing.assert_close(q.grad, torch.full((4,), 0.5))


def test_deepcopy_repr_and_memory():
    model, opt = _trained()
    clone = copy.deepcopy(opt)  # new params carrying copies of the buffers, v and step
    params, clone_params = list(model.parameters()), clone.param_groups[0]["params"]
    for p, c in zip(params, clone_params):
        assert c is not p and c.grad is not None and torch.equal(c.grad, p.grad)
        assert c.grad.data_ptr() != p.grad.data_ptr()
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):  # the copy trains exactly like the original, and independently of it
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for o, ps in ((opt, params), (clone, clone_params)):
            o.zero_grad()
            backward(ps, grads, 1)
            o.step()
    for p, c in zip(params, clone_params):
        assert torch.equal(p, c) and torch.equal(p.grad, c.grad)
        assert torch.equal(opt.state[p]["exp_avg_sq"], clone.state[c]["exp_avg_sq"])
    assert "HMAdamW" in repr(opt) and "variance_correction: auto" in repr(opt) and "variance_mode: hook" in repr(opt)
    mem = state_bytes(opt)
    n = sum(p.numel() for p in params)
    assert mem["state"] == 4 * n + 4 * len(params)  # v (fp32) + 0-d fp32 step counters
    assert mem["grad_buffers"] == 4 * n


# -------------------------------------------------------------------------- 6. hooks
def test_scale_momentum_and_momentum_norm():
    a, b = nn.Parameter(torch.randn(5, dtype=torch.float64)), nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = HMAdamW([{"params": [a]}, {"params": [b], "betas": (0.5, 0.999)}], fused=False)
    (a.sum() * 3 + (b * torch.arange(3.0, dtype=torch.float64)).sum()).backward()
    expected = math.sqrt((0.1 * a.grad).pow(2).sum().item() + (0.5 * b.grad).pow(2).sum().item())
    assert opt.momentum_norm().item() == pytest.approx(expected, rel=1e-12)
    ga, gb = a.grad.clone(), b.grad.clone()
    opt.scale_momentum_(4.0)
    torch.testing.assert_close(a.grad, 4 * ga)
    torch.testing.assert_close(b.grad, 4 * gb)
    assert opt.momentum_norm().item() == pytest.approx(4 * expected, rel=1e-12)


@pytest.mark.parametrize("opt_cls", [HMAdamW, HMAdam])
def test_max_momentum_norm_clips_the_history(opt_cls):
    steps, betas, wd, max_norm = 100, (0.9, 0.999), 0.05, 8.0  # ||m|| runs between 3 and 11 here
    params = make_params(seed=3)
    grads = [micro_grads(p.shape, steps, 1, seed=10 + i) for i, p in enumerate(params)]
    lrs = [1e-2] * steps
    ref = Reference(params, betas=betas, eps=1e-8, wd=wd, decoupled=opt_cls is HMAdamW, correction="noise",
                    max_norm=max_norm)  # fmt: skip
    clipped = 0
    opt = opt_cls(params, lr=1e-2, betas=betas, weight_decay=wd, max_momentum_norm=max_norm, fused=False,
                  variance_correction="noise")  # fmt: skip
    for t in range(steps):
        opt.zero_grad()
        ref.zero_grad()
        backward(params, [g[t][0] for g in grads], 1)
        ref.backward([g[t][0] for g in grads])
        clipped += opt.momentum_norm().item() > max_norm
        ref.step(lrs[t])
        opt.step()
    assert 10 < clipped < steps - 10  # the threshold both fires and does not
    opt.zero_grad()
    ref.zero_grad()
    for i, p in enumerate(params):
        assert_rel(p, ref.w[i], 1e-6)
        assert_rel(p.grad, ref.B[i], 1e-6)


# -------------------------------------------------------------------------------- 7. bf16
@pytest.mark.parametrize("state_in_param_dtype", [False, True])
def test_bf16_params(state_in_param_dtype):
    steps = 30
    params = [nn.Parameter((0.1 * p.detach()).to(torch.bfloat16)) for p in make_params(seed=7)]
    start = [p.detach().double() for p in params]
    grads = [micro_grads(p.shape, steps, 1, seed=20 + i, dtype=torch.bfloat16) for i, p in enumerate(params)]
    ref = Reference(params, betas=(0.9, 0.999), eps=1e-8, wd=0.01, decoupled=True, correction="noise")
    opt = run(HMAdamW, params, grads, 1, [1e-2] * steps, ref, state_in_param_dtype=state_in_param_dtype,
              fused=False, variance_correction="noise")  # fmt: skip
    for i, p in enumerate(params):
        state = opt.state[p]
        assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
        assert state["exp_avg_sq"].dtype == (torch.bfloat16 if state_in_param_dtype else torch.float32)
        assert state["step"].dtype == torch.float32
        moved, moved_ref = p.detach().double() - start[i], ref.w[i] - start[i]
        assert (moved - moved_ref).norm() / moved_ref.norm() < 0.05  # bf16 rounding of W and B each step
        assert_rel(state["exp_avg_sq"], ref.v[i], 0.05)


# -------------------------------------------------------------------------- 8. validation
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"lr": -1e-3}, "lr=-0.001"),
        ({"betas": (1.0, 0.999)}, "beta1=1.0"),
        ({"betas": (0.9, -0.1)}, "beta2=-0.1"),
        ({"eps": -1.0}, "eps=-1.0"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"variance_correction": "signal"}, "variance_correction='signal'"),
        ({"max_momentum_norm": 0.0}, "max_momentum_norm=0.0"),
        ({"fused": "yes"}, "fused='yes'"),
    ],
)
@pytest.mark.parametrize("opt_cls", [HMAdam, HMAdamW])
def test_invalid_hyperparameters(opt_cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        opt_cls([nn.Parameter(torch.randn(2))], **kwargs)


def test_sparse_gradients_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = HMAdamW(emb.parameters(), fused=False)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*sparse=False"):
        opt.step()


def test_defaults_and_capabilities():
    p = [nn.Parameter(torch.randn(2))]
    assert HMAdamW(p).defaults["weight_decay"] == 1e-2 and HMAdam(p).defaults["weight_decay"] == 0.0
    assert HMAdamW(p).defaults["betas"] == (0.9, 0.999) and HMAdamW(p).defaults["lr"] == 1e-3
    assert HMAdamW(p).defaults["variance_correction"] == HMAdam(p).defaults["variance_correction"] == "auto"
    caps = HMAdamW.capabilities
    assert caps.folds_momentum_into_grad and not caps.supports_grad_scaler and caps.supports_dtensor


# ----------------------------------------------------------------------- DTensor (FSDP2)
@pytest.mark.parametrize("fused", [False, "native", "foreach"])
def test_dtensor_params_step_like_plain_tensors(one_rank_mesh, fused, request):
    from torch.distributed.tensor import Shard, distribute_tensor

    if fused == "foreach":  # the fast path's handling of shards past the native kernel, without a compile
        request.getfixturevalue("foreach_only")
    init = [torch.randn(6, 4), torch.randn(5)]
    plain = [nn.Parameter(x.clone()) for x in init]
    sharded = [nn.Parameter(distribute_tensor(x.clone(), one_rank_mesh, [Shard(0)])) for x in init]
    opt_plain = HMAdamW(plain, lr=0.1, max_momentum_norm=0.5, variance_correction="noise", fused=False)
    opt_sharded = HMAdamW(sharded, lr=0.1, max_momentum_norm=0.5, variance_correction="noise", fused=bool(fused))
    for _ in range(3):
        grads = [torch.randn_like(x) for x in init]
        for opt, params, wrap in ((opt_plain, plain, False), (opt_sharded, sharded, True)):
            opt.zero_grad()
            gs = [distribute_tensor(g, one_rank_mesh, [Shard(0)]) if wrap else g for g in grads]
            sum((p * g).sum() for p, g in zip(params, gs)).backward()
            opt.step()
    assert opt_sharded.momentum_norm().item() == pytest.approx(opt_plain.momentum_norm().item(), rel=1e-6)
    for a, b in zip(plain, sharded):
        torch.testing.assert_close(b.full_tensor(), a.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.grad.full_tensor(), a.grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------- 9. variance_correction="hook": AdamW's v
class TiedNet(nn.Module):
    """Embedding whose weight is also the output layer (used twice per forward), a hidden Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 6)

    def forward(self, ids):
        return torch.tanh(self.fc(self.emb(ids))) @ self.emb.weight.t()


def _tied_pair(dtype):
    torch.manual_seed(0)
    a = TiedNet().to(dtype)
    return a, copy.deepcopy(a)


def _groups(model):  # a decayed and a no-decay group, as the strategies build them
    return [{"params": [model.emb.weight, model.fc.weight]}, {"params": [model.fc.bias], "weight_decay": 0.0}]


def _loss(model, ids, accumulation=1):
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1, 1).flatten()) / accumulation


HOOK_EXACT = {  # dtype, fused -> largest parameter difference to torch's optimizer over 150 steps
    (torch.float64, False): 1e-12,
    (torch.float64, True): 1e-12,  # the compiled kernel (float64 never takes the native one)
    (torch.float32, True): 2e-6,  # the native C kernel
}


@pytest.mark.parametrize("dtype,fused", list(HOOK_EXACT), ids=["fp64-loop", "fp64-compiled", "fp32-native"])
@pytest.mark.parametrize("opt_cls,torch_cls", [(HMAdamW, torch.optim.AdamW), (HMAdam, torch.optim.Adam)],
                         ids=["HMAdamW-AdamW", "HMAdam-Adam"])  # fmt: skip
def test_hook_is_torch_adamw_step_by_step(opt_cls, torch_cls, dtype, fused, request):
    """One backward per step, one process: HMAdamW(variance_correction="hook") follows
    torch.optim.AdamW (HMAdam: torch.optim.Adam with coupled L2) step by step, with tied weights,
    two groups and a schedule; its exp_avg_sq is AdamW's after every step; the default ``noise``
    (negative control) is far off."""
    if fused and dtype == torch.float64:
        use_backend("compiled", request)
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, theirs = _tied_pair(dtype)
    control, _ = _tied_pair(dtype)
    opt = opt_cls(_groups(ours), variance_correction="hook", fused=fused, **hp)
    ref = torch_cls(_groups(theirs), foreach=False, **hp)
    noise = opt_cls(_groups(control), variance_correction="noise", fused=False, **hp)
    scheds = [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=20) for o in (opt, ref, noise)]
    gen = torch.Generator().manual_seed(1)
    worst = worst_v = 0.0
    for _ in range(150):
        ids = torch.randint(0, 11, (16, 5), generator=gen)
        for model, o, s in ((ours, opt, scheds[0]), (theirs, ref, scheds[1]), (control, noise, scheds[2])):
            o.zero_grad()
            _loss(model, ids).backward()
            o.step()
            s.step()
        worst = max(worst, max((p - q).abs().max().item() for p, q in zip(ours.parameters(), theirs.parameters())))
        for p, q in zip(ours.parameters(), theirs.parameters()):
            v, v_ref = opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"]
            worst_v = max(worst_v, ((v - v_ref).abs().max() / v_ref.abs().max()).item())
    assert worst <= HOOK_EXACT[dtype, fused], worst
    assert worst_v <= (1e-12 if dtype == torch.float64 else 1e-5), worst_v
    off = max((p - q).abs().max().item() for p, q in zip(control.parameters(), theirs.parameters()))
    assert off > 1e3 * HOOK_EXACT[dtype, fused] and off > 1e-4, off


def _hook_reference(params, micro, *, lr, betas, eps, weight_decay, w):
    """docs/algorithms.md §1, variance_correction="hook", float64: step 1 v = (1-b2) S^2 from the
    buffer; later v = b2 v + (1-b2) w sum_j g_j^2 (HMAdamW, decoupled decay)."""
    b1, b2 = betas
    W = [p.detach().clone().double() for p in params]
    B = [torch.zeros_like(x) for x in W]
    v = [torch.zeros_like(x) for x in W]
    for t, per_step in enumerate(micro, start=1):
        for i in range(len(W)):
            gs = [g[i] for g in per_step]
            B[i] = b1 * B[i] + sum(gs)
            m = (1 - b1) * B[i]
            v[i] = (1 - b2) * B[i] ** 2 if t == 1 else b2 * v[i] + (1 - b2) * w * sum(g**2 for g in gs)
            W[i] = W[i] * (1 - lr * weight_decay) - lr * (m / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
    return W, v


@pytest.mark.parametrize("accumulation", [2, 4])
def test_hook_under_accumulation_is_the_mean_square_of_the_micro_batch_gradients(accumulation):
    steps, hp = 60, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    params = make_params()
    grads = [micro_grads(p.shape, steps, accumulation, seed=i) for i, p in enumerate(params)]
    micro = [[[grads[i][t][k] / accumulation for i in range(len(params))] for k in range(accumulation)]
             for t in range(steps)]  # fmt: skip  (what each mean-loss backward adds: g_j = G_j / k)
    W, v = _hook_reference(params, micro, w=accumulation, **hp)
    opt = run(HMAdamW, params, grads, accumulation, [hp["lr"]] * steps, variance_correction="hook", fused=False,
              betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])  # fmt: skip
    for i, p in enumerate(params):
        assert_rel(p, W[i], 1e-12)
        assert_rel(opt.state[p]["exp_avg_sq"], v[i], 1e-12)
    assert all(s["variance_micro_batches"] == accumulation for s in opt.state_dict()["state"].values())
    # Never below AdamW's increment: w sum g_j^2 >= (sum g_j)^2 (Cauchy-Schwarz), equal for equal micro-batches.
    same = [[[grads[i][t][0] / accumulation for i in range(len(params))]] * accumulation for t in range(steps)]
    W_same, _ = _hook_reference(params, same, w=accumulation, **hp)
    W_adamw, _ = _hook_reference(params, [[[sum(m[i] for m in s) for i in range(len(params))]] for s in same],
                                 w=1, **hp)  # fmt: skip  (one backward of the whole batch: AdamW)
    for a, b in zip(W_same, W_adamw):
        assert_rel(a, b, 1e-12)


def test_hook_equal_micro_batches_step_exactly_like_adamw_on_the_whole_batch():
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, theirs = _tied_pair(torch.float64)
    opt = HMAdamW(_groups(ours), variance_correction="hook", fused=False, **hp)
    ref = torch.optim.AdamW(_groups(theirs), foreach=False, **hp)
    gen = torch.Generator().manual_seed(2)
    for _ in range(40):
        ids = torch.randint(0, 11, (8, 5), generator=gen)
        opt.zero_grad()
        for _ in range(3):  # the same micro-batch three times, mean loss
            _loss(ours, ids, accumulation=3).backward()
        opt.step()
        ref.zero_grad()
        _loss(theirs, ids).backward()
        ref.step()
    assert max((p - q).abs().max().item() for p, q in zip(ours.parameters(), theirs.parameters())) < 1e-12


def test_hook_micro_batch_count_is_the_largest_so_far_and_a_short_last_window_keeps_it():
    p = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = HMAdamW([p], variance_correction="hook", fused=False)
    counts = []
    for passes in (4, 4, 2, 4, 1):  # Lightning's last window of an epoch can be shorter
        opt.zero_grad()
        for _ in range(passes):
            (p * torch.randn(4, dtype=torch.float64)).sum().backward()
        opt.step()
        counts.append(opt.state_dict()["state"][0]["variance_micro_batches"])
    assert counts == [4, 4, 4, 4, 4]


def test_hook_v_sees_only_what_enters_grad_and_hooks_leave_with_the_optimizer():
    import gc

    p = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = HMAdamW([p], variance_correction="hook", fused=False)
    for _ in range(2):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    v = opt.state[p]["exp_avg_sq"].clone()
    torch.autograd.grad((p**3).sum(), [p])  # a gradient that never reaches .grad
    assert torch.equal(opt.state[p]["exp_avg_sq"], v)
    assert len(p._backward_hooks) == 1 and len(p._post_accumulate_grad_hooks) == 1
    del opt
    gc.collect()
    assert not p._backward_hooks and not p._post_accumulate_grad_hooks
    HMAdamW([p], variance_correction="noise", fused=False)  # the other corrections register nothing
    assert not p._backward_hooks


def test_hook_refuses_what_its_hooks_cannot_see(monkeypatch):
    import torch.distributed as dist

    p = nn.Parameter(torch.randn(3))
    opt = HMAdamW([p], variance_correction="hook", fused=False)
    p.sum().backward()
    opt.step()  # step 1: v from the buffer
    p.grad.add_(1.0)  # written by hand: no hook saw it
    with pytest.raises(RuntimeError, match="no gradient reached its hooks since the last step"):
        opt.step()
    p.sum().backward()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"variance_correction='hook'.*world size 2.*variance_correction to noise"):
        opt.step()  # a plain PyTorch DDP loop
    assert torch.equal(p.detach(), before)  # refused before any tensor moved
    monkeypatch.undo()
    q = nn.Parameter(torch.randn(2))
    switched = HMAdamW([q], variance_correction="noise", fused=False)
    switched.param_groups[0]["variance_correction"] = "hook"
    q.sum().backward()
    with pytest.raises(RuntimeError, match="switched to variance_correction='hook' after"):
        switched.step()


def test_hook_refuses_dtensor_params(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    p = nn.Parameter(distribute_tensor(torch.randn(4, 2), one_rank_mesh, [Shard(0)]))
    opt = HMAdamW([p], variance_correction="hook", fused=False)
    (p * 2).sum().backward()
    with pytest.raises(RuntimeError, match=r"not with DTensor parameters \(FSDP2\)"):
        opt.step()


def test_hook_checkpoint_mid_accumulation_resumes_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 4) for _ in range(8)]

    def make():
        torch.manual_seed(1)
        model = nn.Linear(4, 2)
        return model, HMAdamW(model.parameters(), lr=1e-2, variance_correction="hook", fused=False)

    def micro(model, x):
        (model(x).pow(2).mean() / 2).backward()

    a, opt_a = make()
    b, opt_b = make()
    for model, opt in ((a, opt_a), (b, opt_b)):
        for t, x in enumerate(data):
            opt.zero_grad()
            micro(model, x[0])
            if model is b and t == 5:  # save between the two micro-batches of step 6
                torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "mid.pt")
                break
            micro(model, x[1])
            opt.step()
    c, opt_c = make()
    ckpt = torch.load(tmp_path / "mid.pt", weights_only=True)
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    micro(c, data[5][1])
    opt_c.step()
    for x in data[6:]:
        opt_c.zero_grad()
        micro(c, x[0])
        micro(c, x[1])
        opt_c.step()
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc) and torch.equal(pa.grad, pc.grad)
        assert torch.equal(opt_a.state[pa]["exp_avg_sq"], opt_c.state[pc]["exp_avg_sq"])


def test_resume_bit_for_bit_hook_with_accumulation(tmp_path):
    _resume_run(tmp_path, torch.float32, {"fused": False, "variance_correction": "hook"})


# ------------------------------------------ 10. variance_correction="auto" (the default): hook or noise
AUTO_EXACT = {(torch.float64, False): 1e-12, (torch.float32, True): 2e-6}  # as HOOK_EXACT


@pytest.mark.parametrize("dtype,fused", list(AUTO_EXACT), ids=["fp64-loop", "fp32-native"])
def test_auto_in_one_process_is_hook_bit_for_bit_and_adamw_step_by_step(dtype, fused, caplog):
    """One process, plain tensors, no loss scaling: the default resolves to "hook" at construction
    (said once in the log, not at every step), steps bit for bit like an explicit "hook" and
    follows torch.optim.AdamW(fused=False) step by step (two groups, tied weights, a schedule)."""
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, theirs = _tied_pair(dtype)
    explicit, _ = _tied_pair(dtype)
    with caplog.at_level("INFO", logger="lowmem.optim.hmadam"):
        opt = HMAdamW(_groups(ours), fused=fused, **hp)
        hook = HMAdamW(_groups(explicit), variance_correction="hook", fused=fused, **hp)
        ref = torch.optim.AdamW(_groups(theirs), foreach=False, fused=False, **hp)
        assert opt.variance_mode == "hook" and [g["variance_correction"] for g in opt.param_groups] == ["auto"] * 2
        assert opt.loop_note() == ("HMAdamW: variance_correction=auto resolved to hook "
                                   "(one process, plain tensors, no fp16 loss scaling)")  # fmt: skip
        assert hook.loop_note() is None  # nothing was resolved
        scheds = [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=20) for o in (opt, hook, ref)]
        gen = torch.Generator().manual_seed(1)
        worst = 0.0
        for _ in range(60):
            ids = torch.randint(0, 11, (16, 5), generator=gen)
            for model, o, sched in ((ours, opt, scheds[0]), (explicit, hook, scheds[1]), (theirs, ref, scheds[2])):
                o.zero_grad()
                _loss(model, ids).backward()
                o.step()
                sched.step()
            worst = max(worst, max((p - q).abs().max().item() for p, q in zip(ours.parameters(), theirs.parameters())))
            for p, q in zip(ours.parameters(), explicit.parameters()):
                assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
                assert torch.equal(opt.state[p]["exp_avg_sq"], hook.state[q]["exp_avg_sq"])
    assert worst <= AUTO_EXACT[dtype, fused], worst
    said = [r.getMessage() for r in caplog.records if r.name == "lowmem.optim.hmadam"]
    assert said == [opt.loop_note()], said  # once, at construction


def test_auto_on_dtensor_params_is_noise_and_plain_params_in_the_same_process_are_hook(one_rank_mesh):
    """FSDP2's DTensor parameters (a one-rank mesh): "auto" resolves to "noise" and steps exactly like
    an explicit "noise" on plain tensors, where an explicit "hook" is refused; plain parameters in
    the same process (world size 1) resolve to "hook"."""
    from torch.distributed.tensor import Shard, distribute_tensor

    init = [torch.randn(6, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    sharded = [nn.Parameter(distribute_tensor(x.clone(), one_rank_mesh, [Shard(0)])) for x in init]
    plain = [nn.Parameter(x.clone()) for x in init]
    opt_sharded = HMAdamW(sharded, lr=0.1, fused=False)
    opt_noise = HMAdamW(plain, lr=0.1, variance_correction="noise", fused=False)
    assert opt_sharded.variance_mode == "noise" and "(DTensor parameters (FSDP2))" in opt_sharded.loop_note()
    assert HMAdamW([nn.Parameter(x.clone()) for x in init], fused=False).variance_mode == "hook"
    assert not any(p._backward_hooks or p._post_accumulate_grad_hooks for p in sharded)
    for _ in range(4):
        grads = [torch.randn_like(x) for x in init]
        for opt, params, wrap in ((opt_sharded, sharded, True), (opt_noise, plain, False)):
            opt.zero_grad()
            gs = [distribute_tensor(g, one_rank_mesh, [Shard(0)]) if wrap else g for g in grads]
            sum((p * g).sum() for p, g in zip(params, gs)).backward()
            opt.step()
    for a, b in zip(plain, sharded):
        torch.testing.assert_close(b.full_tensor(), a.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt_sharded.state[b]["exp_avg_sq"].full_tensor(), opt_noise.state[a]["exp_avg_sq"],
                                   rtol=1e-12, atol=0)  # fmt: skip


def test_auto_under_loss_scaling_or_another_world_size_is_noise_from_the_fit_start_check(monkeypatch):
    """What the fit-start check (lowmem.strategies.checks.check_trainer) knows and the optimizer cannot
    see: an fp16 GradScaler, FSDP2, DDP's world size. "auto" resolves to "noise" for each (hooks
    removed) and is never refused; an explicit "hook" is refused; a scaler-aware plain loop that
    calls scale_momentum_ gets "noise" too."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from lowmem.strategies import FoldedMomentumPrecision, StrategyError
    from lowmem.strategies.checks import capabilities_of, check_trainer

    def fit_start(correction, strategy=None, world_size=1, plugin=None):
        model, _ = _tied_pair(torch.float32)
        opt = HMAdamW(_groups(model), variance_correction=correction, fused=False)
        assert opt.variance_mode == "hook"  # one process, as far as the optimizer can see
        stand_in = SimpleNamespace(strategy=strategy, precision_plugin=plugin or Precision(), world_size=world_size,
                                   gradient_clip_val=None, gradient_clip_algorithm=None, optimizers=[opt])  # fmt: skip
        check_trainer(stand_in, capabilities_of(opt), "HMAdamW")
        return model, opt

    fp16 = FoldedMomentumPrecision("16-mixed", device="cpu")
    for kwargs, why in [(dict(plugin=fp16), "fp16 loss scaling"), (dict(strategy=ModelParallelStrategy()),
                        "DTensor parameters (FSDP2)"), (dict(strategy=DDPStrategy(), world_size=2), "world size 2")]:  # fmt: skip
        model, opt = fit_start("auto", **kwargs)
        assert opt.variance_mode == "noise" and opt.loop_note().endswith(f"resolved to noise ({why})"), opt.loop_note()
        assert not any(p._backward_hooks for p in model.parameters())
        with pytest.raises(StrategyError, match=r"variance_correction='hook'"):
            fit_start("hook", **kwargs)
    assert fit_start("auto", strategy=DDPStrategy(), world_size=1)[1].variance_mode == "hook"

    model, _ = _tied_pair(torch.float32)
    opt = HMAdamW(_groups(model), fused=False)
    opt.scale_momentum_(2.0**10)  # FoldedMomentumPrecision does this before the first backward
    assert opt.variance_mode == "noise" and opt.loop_note().endswith("(fp16 loss scaling)")


def test_auto_checkpoint_resumes_across_a_mode_change_keeping_auto(monkeypatch):
    """A state dict of a one-process run (auto = hook) saves the requested "auto" (not the resolved
    mode) and loads, without a refusal, into an optimizer that resolves "noise" (world size 2), which
    then continues noise's maths from hook's v exactly (docs/algorithms.md §1, float64); the reverse
    (a noise-run state dict in one process) continues as AdamW from that state. An explicit "hook"
    state dict loaded there is refused (the control: the world size is seen)."""
    import torch.distributed as dist

    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    b1, b2 = hp["betas"]
    params = make_params()
    grads = [micro_grads(p.shape, 12, 1, seed=i) for i, p in enumerate(params)]

    def train(opt, ps, steps):
        for t in steps:
            opt.zero_grad()
            backward(ps, [g[t][0] for g in grads], 1)
            opt.step()

    one = HMAdamW(params, fused=False, **hp)
    train(one, params, range(6))
    saved = copy.deepcopy(one.state_dict())
    assert [g["variance_correction"] for g in saved["param_groups"]] == ["auto"]
    assert "variance_mode" not in saved["param_groups"][0]

    def two_ranks():
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)

    two_ranks()
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = HMAdamW(resumed_params, fused=False, **hp)
    assert resumed.variance_mode == "noise"
    resumed.load_state_dict(copy.deepcopy(saved))
    assert resumed.param_groups[0]["variance_correction"] == "auto" and resumed.variance_mode == "noise"
    assert resumed.loop_note().endswith("resolved to noise (world size 2)")
    ref = Reference(resumed_params, betas=hp["betas"], eps=hp["eps"], wd=hp["weight_decay"], decoupled=True,
                    correction="noise")  # fmt: skip
    ref.t = 6
    ref.v = [one.state[p]["exp_avg_sq"].clone() for p in params]
    ref.B = [p.grad / b1 for p in params]  # the buffer after step 6, before its decay for step 7
    train(resumed, resumed_params, range(6, 12))
    for t in range(6, 12):
        ref.zero_grad()
        ref.backward([g[t][0] for g in grads])
        ref.step(hp["lr"])
    for i, p in enumerate(resumed_params):
        assert_rel(p, ref.w[i], 1e-12)
        assert_rel(resumed.state[p]["exp_avg_sq"], ref.v[i], 1e-12)
    assert resumed.state_dict()["param_groups"][0]["variance_correction"] == "auto"

    # The control: an explicit "hook" state dict there is refused at the step, as at fit start.
    hook_params = [nn.Parameter(p.detach().clone()) for p in params]
    hooked = HMAdamW(hook_params, fused=False, **hp)
    hooked.load_state_dict({**copy.deepcopy(saved), "param_groups": [{**saved["param_groups"][0],
                                                                      "variance_correction": "hook"}]})  # fmt: skip
    assert hooked.variance_mode == "hook"
    backward(hook_params, [g[6][0] for g in grads], 1)
    with pytest.raises(RuntimeError, match="world size 2"):
        hooked.step()

    # The reverse: the two-rank (noise) state dict in one process is hook, i.e. AdamW from that state.
    noise_sd = copy.deepcopy(resumed.state_dict())
    monkeypatch.undo()
    back_params = [nn.Parameter(p.detach().clone()) for p in resumed_params]
    back = HMAdamW(back_params, fused=False, **hp)
    back.load_state_dict(noise_sd)
    assert back.variance_mode == "hook"
    adamw_params = [nn.Parameter(p.detach().clone()) for p in resumed_params]
    adamw = torch.optim.AdamW(adamw_params, foreach=False, fused=False, **hp)
    for p, q in zip(resumed_params, adamw_params):  # AdamW's exp_avg after step 12: m = (1 - b1) B
        adamw.state[q] = {"step": torch.tensor(12.0), "exp_avg": (1 - b1) * p.grad / b1,
                          "exp_avg_sq": resumed.state[p]["exp_avg_sq"].clone()}  # fmt: skip
    more = [micro_grads(p.shape, 5, 1, seed=50 + i) for i, p in enumerate(params)]
    for t in range(5):
        for o, ps in ((back, back_params), (adamw, adamw_params)):
            o.zero_grad()
            backward(ps, [g[t][0] for g in more], 1)
            o.step()
    for p, q in zip(back_params, adamw_params):
        assert_rel(p, q, 1e-12)
        assert_rel(back.state[p]["exp_avg_sq"], adamw.state[q]["exp_avg_sq"], 1e-12)


def test_auto_steps_as_noise_where_no_gradient_reached_its_hooks(caplog):
    """Gradients written into .grad by hand (no backward): an explicit "hook" is refused at the second
    step; "auto" takes each such step as noise's (one warning in the log), and the next step after a
    backward is hook's again: v = b2 v + (1 - b2) g^2."""
    shapes = [(4, 3), (5,)]
    runs = {}
    for correction in ("auto", "noise"):
        params = make_params(shapes=shapes)
        opt = HMAdamW(params, lr=1e-2, variance_correction=correction, fused=False)
        gen = torch.Generator().manual_seed(0)
        with caplog.at_level("WARNING", logger="lowmem.optim.hmadam"):
            for _ in range(4):
                opt.zero_grad()
                for p in params:
                    g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                    p.grad = g if p.grad is None else p.grad.add_(g)
                opt.step()
        runs[correction] = (params, opt)
    (auto_params, auto), (noise_params, noise) = runs["auto"], runs["noise"]
    for a, b in zip(auto_params, noise_params):
        assert torch.equal(a, b) and torch.equal(auto.state[a]["exp_avg_sq"], noise.state[b]["exp_avg_sq"])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "no gradient came through autograd's backward" in warned[0], warned
    assert auto.variance_mode == "hook" and all(p._backward_hooks for p in auto_params)
    v = [auto.state[p]["exp_avg_sq"].clone() for p in auto_params]
    g = [torch.randn(p.shape, dtype=p.dtype) for p in auto_params]
    auto.zero_grad()
    backward(auto_params, g, 1)
    auto.step()
    for p, v_before, g_p in zip(auto_params, v, g):
        assert_rel(auto.state[p]["exp_avg_sq"], 0.999 * v_before + 0.001 * g_p**2, 1e-12)
    p = nn.Parameter(torch.randn(3))
    hook = HMAdamW([p], variance_correction="hook", fused=False)
    for _ in range(2):
        p.grad = torch.ones(3) if p.grad is None else p.grad.add_(1.0)
        if hook.state:
            with pytest.raises(RuntimeError, match="no gradient reached its hooks"):
                hook.step()
        else:
            hook.step()


def test_invalid_variance_correction_lists_auto():
    for bad in ({"variance_correction": "adamw"}, {}):
        groups = [{"params": [nn.Parameter(torch.randn(2))], **bad}]
        kwargs = {} if bad else {"variance_correction": "Auto"}
        with pytest.raises(ValueError, match=r"invalid variance_correction='(adamw|Auto)'.*expected one of "
                                             r"\('auto', 'noise', 'stationary', 'none', 'hook'\)"):  # fmt: skip
            HMAdamW(groups, **kwargs)
    opt = HMAdamW([nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match=r"variance_correction='signal' in a param group.*'auto'"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "variance_correction": "signal"})
