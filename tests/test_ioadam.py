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


VOCAB, WIDTH = 13, 8
TIED_IO = ("wte.weight", "fc.weight")


def tied_batches(steps: int, seed: int, shape: tuple[int, int] = (4, 6)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, shape, generator=gen)
        ids[0, :2] = 0  # padding tokens: no embedding gradient (but their dE is summed, as the hook does)
        out.append(ids)
    return out


def tied_ref_forward(P: dict[str, torch.Tensor], ids: torch.Tensor):
    """TiedLM's forward written out; returns the logits and the activations the statistics need."""
    E = F.embedding(ids, P["wte.weight"], padding_idx=0)
    E.retain_grad()
    A = E @ P["fc.weight"].T + P["fc.bias"]
    A.retain_grad()
    H = torch.tanh(A)
    Y = H @ P["wte.weight"].T  # the tied head
    Y.retain_grad()
    return Y, E, A, H


def tied_reference_run(init, data, *, lr, betas, eps, wd, b, p, mode):
    """docs/algorithms.md §5 for a tied embedding/head, line by line in float64: each use of the
    tied weight has its own R, C (head: |dY|^q, |H|^p; embedding: token counts, |dE|^p) and
    D = D_head + D_emb; fc.weight plain IO-Adam; fc.bias AdamW."""
    b1, b2 = betas
    q = p / (p - 1)
    P = {k: v.clone().requires_grad_() for k, v in init.items()}
    M = {k: torch.zeros_like(v) for k, v in init.items()}
    V = {"fc.bias": torch.zeros_like(init["fc.bias"])}
    uses = ("head", "emb", "fc")  # statistics sets: (R rows, C rows)
    rows = {"head": (VOCAB, WIDTH), "emb": (VOCAB, WIDTH), "fc": (WIDTH, WIDTH)}
    R = {u: torch.zeros(rows[u][0], b, dtype=torch.float64) for u in uses}
    C = {u: torch.zeros(rows[u][1], b, dtype=torch.float64) for u in uses}

    def bound(u):
        if mode == "paper":
            return sum(torch.outer(R[u][:, j] ** (2 / q), C[u][:, j] ** (2 / p)) for j in range(b)).sqrt()
        return sum(torch.outer(R[u][:, j] ** (1 / q), C[u][:, j] ** (1 / p)) for j in range(b))

    k = 0
    for t, ids in enumerate(data, start=1):
        for v in P.values():
            v.grad = None
        Y, E, A, H = tied_ref_forward(P, ids)
        F.cross_entropy(Y.reshape(-1, VOCAB), ids.reshape(-1)).backward()
        flat = ids.reshape(-1)
        counts = torch.stack([(flat == v).sum() for v in range(VOCAB)]).double()
        counts[0] = 0.0  # the padding row
        stats = {
            "head": ((Y.grad.abs() ** q).reshape(-1, VOCAB).sum(0), (H.detach().abs() ** p).reshape(-1, WIDTH).sum(0)),
            "emb": (counts, (E.grad.abs() ** p).reshape(-1, WIDTH).sum(0)),
            "fc": ((A.grad.abs() ** q).reshape(-1, WIDTH).sum(0), (E.detach().abs() ** p).reshape(-1, WIDTH).sum(0)),
        }
        with torch.no_grad():
            for u in uses:
                R[u][:, k] += (1 - b2) * stats[u][0]
                C[u][:, k] += (1 - b2) * stats[u][1]
            D = {"wte.weight": bound("head") + bound("emb"), "fc.weight": bound("fc")}
            for name, W in P.items():
                g = W.grad
                M[name] = b1 * M[name] + (1 - b1) * g
                W.mul_(1 - lr * (wd if W.ndim == 2 else 0.0))
                if name in D:
                    W.sub_(lr * (1 - b2**t) / (1 - b1**t) * M[name] / (D[name] + eps))
                else:
                    V[name] = b2 * V[name] + (1 - b2) * g**2
                    W.sub_(lr * (M[name] / (1 - b1**t)) / ((V[name] / (1 - b2**t)).sqrt() + eps))
            for u in uses:
                R[u] *= b2
                C[u] *= b2
        k = (k + 1) % b
    return {n: v.detach() for n, v in P.items()}, M, R, C


def run_tied(lm, data, **kw):
    opt = IOAdam(lm, **kw)
    for ids in data:
        opt.zero_grad()
        F.cross_entropy(lm(ids).reshape(-1, VOCAB), ids.reshape(-1)).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
@pytest.mark.parametrize("mode, p", [("paper", 2.0), ("per_slot", 3.0)])
def test_tied_embedding_matches_dense_float64_reference(mode, p, fused, backend, request):
    """A weight tied between an embedding and the LM head against the float64 spec, on every
    backend (native: both weights in one call of the native kernel, the tied one with the
    embedding use's factors as its second pair), with the head's statistics from hooks or from
    the fused backward."""
    dtype, fast_step, tol = use_backend(backend, request)
    steps, b = 60, 3
    torch.manual_seed(0)
    lm = TiedLM().to(dtype)
    init = {n: v.detach().double().clone() for n, v in lm.named_parameters()}
    data = tied_batches(steps, seed=7)
    opt = run_tied(lm, data, buffer_size=b, p=p, buffer_mode=mode, fused_linear=fused, fused=fast_step, **HP)
    ref_P, ref_M, ref_R, ref_C = tied_reference_run(
        init, data, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], wd=HP["weight_decay"], b=b, p=p, mode=mode
    )
    named = dict(lm.named_parameters())
    for name, param in named.items():
        assert rel_err(param.detach().double(), ref_P[name]) < tol, name
        assert rel_err(opt.state[param]["exp_avg"].double(), ref_M[name]) < tol, name
    keys = {"head": ("wte.weight", "out_stats", "in_stats"), "emb": ("wte.weight", "emb_out_stats", "emb_in_stats"),
            "fc": ("fc.weight", "out_stats", "in_stats")}  # fmt: skip
    for use, (name, r_key, c_key) in keys.items():
        st = opt.state[named[name]]
        assert rel_err(st[r_key].double(), ref_R[use]) < tol, (use, r_key)
        assert rel_err(st[c_key].double(), ref_C[use]) < tol, (use, c_key)
        assert st["slot"] == steps % b and st["step"].item() == steps
    assert "emb_out_stats" not in opt.state[named["fc.weight"]]  # untied: one set of statistics


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_tied_weight_denominator_is_the_sum_of_each_uses_bound(p):
    """One step with b1 = 0, eps = 0, wd = 0, b = 1: dW = -lr G / (D_head + D_emb), each use's
    Hölder bound from its own sums, computed here by hand; the mixed sums (one R, C for both
    uses, lowmem before) give a D many times larger."""
    torch.manual_seed(0)
    lm = TiedLM().double()
    b2, q, lr = 0.99, p / (p - 1), 1e-3
    opt = IOAdam(lm, lr=lr, betas=(0.0, b2), eps=0.0, weight_decay=0.0, buffer_size=1, p=p)
    assert [n for g in opt.param_groups if g["io"] for n in g["param_names"]] == list(TIED_IO)
    ids = tied_batches(1, seed=3, shape=(6, 10))[0]
    P = {n: v.detach().clone().requires_grad_() for n, v in lm.named_parameters()}
    Y, E, A, H = tied_ref_forward(P, ids)
    F.cross_entropy(Y.reshape(-1, VOCAB), ids.reshape(-1)).backward()
    counts = torch.bincount(ids.reshape(-1), minlength=VOCAB).double()
    counts[0] = 0.0
    head_out, head_in = (Y.grad.abs() ** q).reshape(-1, VOCAB).sum(0), (H.detach().abs() ** p).reshape(-1, WIDTH).sum(0)
    emb_in = (E.grad.abs() ** p).reshape(-1, WIDTH).sum(0)
    d_head = torch.outer(head_out ** (1 / q), head_in ** (1 / p))
    d_emb = torch.outer(counts ** (1 / q), emb_in ** (1 / p))
    g = P["wte.weight"].grad
    assert (g.abs() <= (d_head + d_emb) * (1 + 1e-12)).all()  # the triangle inequality, then Hölder per use

    w0 = lm.wte.weight.detach().clone()
    F.cross_entropy(lm(ids).reshape(-1, VOCAB), ids.reshape(-1)).backward()
    torch.testing.assert_close(lm.wte.weight.grad, g, rtol=1e-12, atol=0)
    opt.step()
    # (1-b2) in M, in D (each use's root of a product of two (1-b2) sums) and in the step size cancel.
    # (rtol: W - W0 loses ~1e-16 / |dW| ~ 1e-10 to cancellation)
    torch.testing.assert_close(lm.wte.weight.detach() - w0, -lr * g / (d_head + d_emb), rtol=1e-8, atol=1e-18)
    st = opt.state[lm.wte.weight]
    wants = {"out_stats": head_out, "in_stats": head_in, "emb_out_stats": counts, "emb_in_stats": emb_in}
    for key, want in wants.items():
        torch.testing.assert_close(st[key][:, 0] / (b2 * (1 - b2)), want, rtol=1e-10, atol=0)  # decayed once
    mixed = torch.outer((head_out + counts) ** (1 / q), (head_in + emb_in) ** (1 / p))
    assert (mixed / (d_head + d_emb)).median() > 2.0  # what the fix removes: the cross terms


class BigramLM(nn.Module):
    """Embedding -> Linear -> tanh -> tied head: learns next-token statistics."""

    def __init__(self, vocab: int = 48, width: int = 32) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.wte(ids))))


def _bigram_loss_after_training(monkeypatch, mixed: bool, steps: int = 200, vocab: int = 128) -> float:
    """Final training loss of BigramLM on a random successor map (the lm config's lrs).
    ``mixed``: the embedding use's sums staged into the head's (the old single-buffer statistics)."""
    if mixed:
        monkeypatch.setattr(IOAdam, "_stage_embedding_stats", IOAdam._stage_stats)
    torch.manual_seed(0)
    lm = BigramLM(vocab)
    opt = IOAdam(lm, lr=0.03, adamw_lr=0.003, buffer_size=16, fused=False)
    gen = torch.Generator().manual_seed(1)
    successor = torch.randperm(vocab, generator=gen)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x = torch.randint(0, vocab, (16, 32), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(lm(x).reshape(-1, vocab), successor[x].reshape(-1))
        loss.backward()
        opt.step()
    if mixed:
        assert not opt.state[lm.wte.weight]["emb_out_stats"].any()  # the old statistics indeed
        monkeypatch.undo()
    return loss.item()


def test_separate_statistics_train_a_tied_lm_far_better_than_mixed_ones(monkeypatch):
    """200 steps of a tied bigram LM (vocabulary 128): the mixed statistics' cross terms freeze
    the tied weight (measured: 0.07 separate, 1.4 mixed; log 128 = 4.85 at the start)."""
    separate = _bigram_loss_after_training(monkeypatch, mixed=False)
    mixed = _bigram_loss_after_training(monkeypatch, mixed=True)
    assert separate < 0.3 and mixed > separate + 0.5, (separate, mixed)


def test_old_format_tied_state_dict_loads_into_the_head_use():
    """A state dict saved before the embedding use had its own statistics (no emb_* keys, the
    mixed sums in out_stats/in_stats) loads: those become the head use's, the embedding use's
    start at zero, and training continues."""
    data = tied_batches(6, seed=8)
    torch.manual_seed(0)
    lm = TiedLM().double()
    opt = run_tied(lm, data[:3], buffer_size=2, **HP)
    old = copy.deepcopy(opt.state_dict())
    tied_id = 0  # wte.weight: the first IO-Adam parameter
    assert {"emb_out_stats", "emb_in_stats"} <= set(old["state"][tied_id])
    for key in ("emb_out_stats", "emb_in_stats"):
        del old["state"][tied_id][key]
    lm2 = copy.deepcopy(lm)
    opt2 = IOAdam(lm2, buffer_size=2, **HP)
    opt2.load_state_dict(old)
    st = opt2.state[lm2.wte.weight]
    assert torch.equal(st["out_stats"], old["state"][tied_id]["out_stats"])
    assert st["emb_out_stats"].shape == (VOCAB, 2) and st["emb_in_stats"].shape == (WIDTH, 2)
    assert not st["emb_out_stats"].any() and not st["emb_in_stats"].any()
    for ids in data[3:]:
        opt2.zero_grad()
        F.cross_entropy(lm2(ids).reshape(-1, VOCAB), ids.reshape(-1)).backward()
        opt2.step()
    assert st["emb_out_stats"].any() and st["emb_in_stats"].any()
    assert all(torch.isfinite(w).all() for w in lm2.parameters())
    assert set(opt2.state_dict()["state"][tied_id]) == set(opt.state_dict()["state"][tied_id])


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_state_bytes_count_both_uses_of_a_tied_weight(fused):
    b = 3
    torch.manual_seed(0)
    lm = TiedLM()
    opt = run_tied(lm, tied_batches(2, seed=9), buffer_size=b, fused_linear=fused)
    v, d = VOCAB, WIDTH
    io_bytes = 4 * (v * d + 2 * b * (v + d)) + 4 * (d * d + b * (d + d))  # wte: head and embedding sums
    assert state_bytes(opt)["state"] == io_bytes + 8 * d + 4 * len(opt.state)


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
    and dE in their own buffers, D = D_head + D_emb off the native kernel; with fused_linear=True
    its grad is added to the fused momentum) and a Hugging Face Conv1D net (the (n_in, n_out)
    layout)."""
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


def test_float32_tied_weight_takes_the_native_kernel_not_the_gemm_path(monkeypatch):
    """A weight tied to an embedding (D = D_head + D_emb, one root per use) runs in the native
    kernel with its untied neighbours: the GEMM path (which stores the n x m ``D``) never runs."""
    from lowmem.optim import ioadam

    def gemm_path(*args, **kwargs):
        raise AssertionError("a float32 CPU weight took the GEMM path")

    monkeypatch.setattr(ioadam, "_IO_ADAM_FAST", gemm_path)
    for mode in ("paper", "per_slot"):
        torch.manual_seed(0)
        lm = TiedLM()
        opt = run_tied(lm, tied_batches(2, seed=3), buffer_size=2, buffer_mode=mode, fused=True, **HP)
        assert "emb_out_stats" in opt.state[lm.wte.weight] and opt.state[lm.wte.weight]["step"].item() == 2


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


def _average_and_step_replicas(nets, opts, local) -> None:
    """DDP's gradient average over the replicas' ``.grad``, then each replica's ``step()`` in its
    own thread (``local.rank`` set), so the optimizers' all-reduces meet as on real ranks."""
    world = len(nets)
    for params in zip(*(n.parameters() for n in nets)):
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
        _average_and_step_replicas(nets, opts, local)
    for a, b, ref in zip(nets[0].parameters(), nets[1].parameters(), single.parameters()):
        assert torch.equal(a, b)  # replicas never drift
        assert rel_err(a.detach(), ref.detach()) < 1e-10


def test_ddp_tied_embedding_statistics_match_one_process(monkeypatch):
    """A tied LM on two replicas (threads): the head's, the embedding's (counts unscaled, dE by
    world^-p) and fc's sums are all-reduced in one collective of (n_out + n_in) per use, and
    the replicas end where one process on the whole batch ends."""
    world, b = 2, 3
    data = tied_batches(10, seed=10, shape=(4, 6))
    torch.manual_seed(0)
    single = TiedLM().double()
    run_tied(single, data, buffer_size=b, p=3.0, **HP)

    all_reduce, local = _threaded_all_reduce(world)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    torch.manual_seed(0)
    nets = [TiedLM().double()]
    nets.append(copy.deepcopy(nets[0]))
    opts = [IOAdam(n, buffer_size=b, p=3.0, **HP) for n in nets]
    for ids in data:
        for r in range(world):
            opts[r].zero_grad()
            part = ids.chunk(world)[r]  # each rank's mean loss: the global mean is their average
            F.cross_entropy(nets[r](part).reshape(-1, VOCAB), part.reshape(-1)).backward()
        _average_and_step_replicas(nets, opts, local)
    assert opts[0].comm_bytes_per_step == 8 * (2 * (VOCAB + WIDTH) + 2 * WIDTH)  # float64: head, embedding, fc
    for (name, a), b_, ref in zip(nets[0].named_parameters(), nets[1].parameters(), single.parameters()):
        assert torch.equal(a, b_), name
        assert rel_err(a.detach(), ref.detach()) < 1e-10, name


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
