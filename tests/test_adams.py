"""AdamS (docs/algorithms.md §2) against an independent float64 transcription of the spec."""

from __future__ import annotations

import io
import math

import pytest
from _backends import BACKENDS, use_backend
import torch
from torch import nn

from lowmem.optim import AdamS, state_bytes

SHAPES = [(37, 19), (53,), (5, 3, 3, 3)]


def reference_adams(p0, grads, lrs, betas, eps, wd):
    """docs/algorithms.md §2, line by line, in float64."""
    b1, b2 = betas
    p, m = p0.clone(), torch.zeros_like(p0)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        bc1 = 1 - b1**t
        p = p * (1 - lr * wd)
        denom = torch.sqrt(b2 * (m / bc1) ** 2 + (1 - b2) * g**2) + eps
        m = b1 * m + (1 - b1) * g
        p = p - lr * (m / bc1) / denom
    return p, m


def random_grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    # Per-step scale changes so the normalizer's history matters.
    return [torch.randn(shape, generator=gen, dtype=torch.float64) * (0.1 + t % 7) for t in range(steps)]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_matches_float64_reference_with_groups_and_scheduler(backend, request):
    dtype, fused, tol = use_backend(backend, request)
    steps, betas, eps = 120, (0.9, 0.95), 1e-8
    torch.manual_seed(0)
    init = [torch.randn(s, dtype=torch.float64).to(dtype).double() for s in SHAPES]
    params = [nn.Parameter(x.to(dtype, copy=True)) for x in init]
    grads = [random_grads(s, steps, seed=i) for i, s in enumerate(SHAPES)]
    # Two groups: the constructor's weight decay for the first, an own lr/wd for the second.
    opt = AdamS([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}], lr=1e-2, eps=eps,
                fused=fused)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10))
    lrs = []
    for t in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        for p, gs in zip(params, grads):
            p.grad = gs[t].to(dtype)
        opt.step()
        sched.step()
    hparams = [(0, 0.1), (0, 0.1), (1, 0.0)]  # (group index, weight decay) per param
    for p, x0, gs, (gi, wd) in zip(params, init, grads, hparams):
        ref_p, ref_m = reference_adams(x0, gs, [lr[gi] for lr in lrs], betas, eps, wd)
        assert ((p.double() - ref_p).abs().max() / ref_p.abs().max()).item() < tol
        assert ((opt.state[p]["exp_avg"].double() - ref_m).abs().max() / ref_m.abs().max()).item() < tol
        assert opt.state[p]["step"].item() == steps


def test_first_step_is_sign_over_sqrt_one_minus_beta2():
    p = nn.Parameter(torch.zeros(1000, dtype=torch.float64))
    p.grad = torch.randn(1000, dtype=torch.float64) * 1e-3
    AdamS([p], lr=1.0, betas=(0.9, 0.95), eps=0.0, weight_decay=0.0).step()
    expected = -torch.sign(p.grad) / math.sqrt(1 - 0.95)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0)


def test_constructor_weight_decay_is_applied_first():
    # With a zero gradient the step is 0/(0+eps) = 0, so only the decay remains.
    p = nn.Parameter(torch.ones(4, 3, dtype=torch.float64))
    p.grad = torch.zeros_like(p)
    AdamS([p], lr=0.5, weight_decay=0.3).step()
    torch.testing.assert_close(p.detach(), torch.full((4, 3), 1 - 0.5 * 0.3, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (1.0, 0.9)}, "beta1"),
        ({"betas": (0.9, -0.1)}, "beta2"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        AdamS([nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_grad_rejected_none_grad_skipped_and_closure():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamS(emb.parameters()).step()

    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = AdamS([a, b], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (a * a).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 3.0
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(3))
    assert not torch.equal(a.detach(), torch.ones(3))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(17, 33), nn.LayerNorm(33), nn.Conv1d(33, 9, 3), nn.Linear(9, 5, bias=False))


def _one_step(model, opt):
    model.zero_grad()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def test_state_is_half_of_adamw():
    """exp_avg bytes are exactly half of AdamW's exp_avg + exp_avg_sq.

    Both optimizers also hold one 0-d float32 ``step`` tensor (4 B) per parameter tensor; those are
    counted on both sides, so the total ratio is 50% plus 4 B per tensor, and the moments alone
    are exactly 50%.
    """
    model = _mlp()
    adamw, adams = torch.optim.AdamW(model.parameters()), AdamS(model.parameters())
    _one_step(model, adamw)
    _one_step(model, adams)
    n_tensors = len(list(model.parameters()))
    step_bytes = 4 * n_tensors
    assert all(s["step"].dtype == torch.float32 and s["step"].dim() == 0 for s in adams.state.values())
    assert all(s["step"].dtype == torch.float32 and s["step"].dim() == 0 for s in adamw.state.values())
    assert 2 * (state_bytes(adams)["state"] - step_bytes) == state_bytes(adamw)["state"] - step_bytes
    assert state_bytes(adams)["state"] - step_bytes == 4 * sum(p.numel() for p in model.parameters())


def test_state_dict_round_trip_continues_bit_for_bit():
    model = _mlp()
    twin = _mlp()  # same seed: same initial weights
    opt = AdamS(model.parameters(), lr=1e-2)
    for _ in range(5):
        _one_step(model, opt)
    twin.load_state_dict(model.state_dict())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = AdamS(twin.parameters(), lr=1e-2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(5):
        torch.manual_seed(1)
        _one_step(model, opt)
        torch.manual_seed(1)
        _one_step(twin, opt2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_bf16_params_keep_fp32_state_across_load():
    p = nn.Parameter(torch.randn(7, 5).to(torch.bfloat16))
    opt = AdamS([p], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn(7, 5).to(torch.bfloat16)
        opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    saved = opt.state_dict()
    q = nn.Parameter(p.detach().clone())
    opt2 = AdamS([q], lr=1e-2)
    opt2.load_state_dict(saved)
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    assert AdamS([q], state_in_param_dtype=True).defaults["state_in_param_dtype"]
    opt3 = AdamS([q], state_in_param_dtype=True)
    q.grad = torch.randn(7, 5).to(torch.bfloat16)
    opt3.step()
    assert opt3.state[q]["exp_avg"].dtype == torch.bfloat16


def test_bf16_step_rounds_an_fp32_update_once():
    # fp32 maths on the fp32 copy of the bf16 weights, rounded once: equals the fp32 run rounded.
    torch.manual_seed(0)
    w32 = nn.Parameter(torch.randn(64, 3).to(torch.bfloat16).float())
    w16 = nn.Parameter(w32.detach().to(torch.bfloat16))
    g = torch.randn(64, 3).to(torch.bfloat16)
    w32.grad, w16.grad = g.float(), g
    AdamS([w32], lr=1e-3).step()
    AdamS([w16], lr=1e-3).step()
    assert torch.equal(w16.detach(), w32.detach().to(torch.bfloat16))


@pytest.fixture(params=["native", "compiled"])
def fast_kernel(request):
    """The native kernel (float32 CPU; channels_last still compiled), or Inductor's for all."""
    if request.param == "compiled":
        request.getfixturevalue("no_native")
    return request.param


def test_fused_matches_for_loop_and_auto_choice(monkeypatch, fast_kernel):
    """The fast path (one compile, ~10 s the first time) against the for-loop reference."""
    torch.manual_seed(0)
    shapes = [(37, 19), (53,), (5, 3, 3, 3), (1,)]
    runs = {}
    for fused in (True, False):
        gen = torch.Generator().manual_seed(1)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        params[2].data = params[2].data.contiguous(memory_format=torch.channels_last)
        opt = AdamS(params, lr=1e-2, fused=fused)
        for _ in range(12):
            for p in params:
                p.grad = torch.empty_like(p).normal_(generator=gen)  # same layout as p (channels_last too)
            opt.step()
        runs[fused] = (params, opt)
    for p, q in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(runs[True][1].state[p]["exp_avg"], runs[False][1].state[q]["exp_avg"])

    import lowmem.optim._dispatch as dispatch
    import lowmem.optim.adams as adams_module

    calls = []
    monkeypatch.setattr(adams_module, "adams", lambda *a, **kw: calls.append(kw["fused"]))
    small, large = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(dispatch.FAST_PATH_MIN_NUMEL))
    for p in (small, large):
        p.grad = torch.zeros_like(p)
    AdamS([small]).step()
    AdamS([large]).step()
    AdamS([large], fused=False).step()
    assert calls == [False, True, False]
    with pytest.raises(ValueError, match="fused"):
        AdamS([small], fused="yes")


@pytest.mark.parametrize("fused", [False, "native", "foreach"])
def test_dtensor_params_step_like_plain_tensors(one_rank_mesh, fused, request):
    """FSDP2 holds DTensor shards; AdamS is element-wise, so it steps them like plain tensors."""
    from torch.distributed.tensor import Shard, distribute_tensor

    if fused == "foreach":  # the fast path's handling of shards past the native kernel, without a compile
        request.getfixturevalue("foreach_only")
    init = [torch.randn(6, 4), torch.randn(5)]
    plain = [nn.Parameter(x.clone()) for x in init]
    sharded = [nn.Parameter(distribute_tensor(x.clone(), one_rank_mesh, [Shard(0)])) for x in init]
    opt_plain, opt_sharded = AdamS(plain, lr=0.1, fused=False), AdamS(sharded, lr=0.1, fused=bool(fused))
    for _ in range(3):
        grads = [torch.randn_like(x) for x in init]
        for p, q, g in zip(plain, sharded, grads):
            p.grad, q.grad = g.clone(), distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)])
        opt_plain.step()
        opt_sharded.step()
    for a, b in zip(plain, sharded):
        torch.testing.assert_close(b.full_tensor(), a.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt_sharded.state[b]["exp_avg"].full_tensor(), opt_plain.state[a]["exp_avg"])
