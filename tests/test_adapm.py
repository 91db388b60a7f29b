"""AdaPM / AdaPM-mini (docs/algorithms.md §4): an independent float64 re-implementation of every block,
the residual correction's effect on the bias, full rank = full momentum, checkpoints, determinism,
the role partition and the state-size formula."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from _backends import BACKENDS, use_backend
from test_adam_mini import GPT, Llama, random_grads, ref_block_mean_sq

from lowmem.optim import AdaPM, adapm_param_groups, state_bytes
from lowmem.optim.adapm import OVERSAMPLE, POWER_ITERS




# --------------------------------------------------------------------------- float64 reference of §4


def ref_orth(Y: np.ndarray) -> np.ndarray:
    return np.linalg.qr(Y)[0]


def ref_svd_init(M: np.ndarray, r: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-r truncation of M by the documented randomized SVD (test matrix: fp32 normal draws of a
    CPU generator seeded with the step t; OVERSAMPLE extra columns; POWER_ITERS power iterations)."""
    n, m = M.shape
    k = min(r + OVERSAMPLE, n, m)
    omega = torch.randn(m, k, generator=torch.Generator().manual_seed(t)).double().numpy()
    Q = ref_orth(M @ omega)
    for _ in range(POWER_ITERS):
        Q = ref_orth(M @ (M.T @ Q))  # span of (M M^T)^i M omega
    U, S, Vt = np.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ U[:, :r] * S[:r], Vt[:r]


def ref_als(M: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sweep of alternating least squares by the normal equations."""
    L = np.linalg.solve(R @ R.T, R @ M.T).T  # argmin_L |L R - M| = M R^T (R R^T)^-1
    return L, np.linalg.solve(L.T @ L, L.T @ M)  # argmin_R |L R - M| = (L^T L)^-1 L^T M


class RefLowRank:
    def __init__(self, n: int, m: int, rank_fraction: float) -> None:
        self.r = max(1, math.ceil(rank_fraction * min(n, m)))
        self.L, self.R = np.zeros((n, self.r)), np.zeros((self.r, m))

    def momentum(self, g: np.ndarray, b1: float, t: int, refresh_every: int) -> np.ndarray:
        M = (1 - b1) * g + b1 * self.L @ self.R
        refresh = (t - 1) % refresh_every == 0
        self.L, self.R = ref_svd_init(M, self.r, t) if refresh else ref_als(M, self.R)
        LR = self.L @ self.R
        return LR + (M - LR) / (1 - b1)  # m_c = L R + E/(1-b1), E = M - L R


class RefAdaPM:
    """One parameter under AdaPM §4 (and the "adamw" blocks as torch.optim.AdamW), in numpy float64."""

    def __init__(self, w: np.ndarray, kind: str, keys: dict, hp: dict) -> None:
        self.w, self.kind, self.keys, self.hp = w.copy(), kind, keys, hp
        self.v, self.m = np.zeros_like(w), np.zeros_like(w)
        d = keys["fan_out_dim"]
        if kind == "lowrank":
            self.parts = [(slice(None), RefLowRank(*w.shape, hp["rank_fraction"]))]
        elif kind == "qkv":
            n_q, n_kv = keys["qkv_heads"]
            unit = w.shape[d] // (n_q + 2 * n_kv)
            q, k = n_q * unit, n_kv * unit
            spans = [slice(0, q), slice(q, q + k), slice(q + k, None)]
            self.parts = []
            for span, lowrank in zip(spans, (True, True, False)):
                index = (slice(None),) * d + (span,)
                shape = w[index].shape
                self.parts.append((index, RefLowRank(*shape, hp["rank_fraction"]) if lowrank else None))
        else:
            self.parts = []

    def step(self, g: np.ndarray, t: int) -> None:
        hp, keys = self.hp, self.keys
        b1, b2, lr, eps, wd, clip = hp["b1"], hp["b2"], hp["lr"], hp["eps"], hp["wd"], hp["clip"]
        if hp["second_moment"] == "mini":
            g2 = ref_block_mean_sq(g, keys["block"], keys["fan_out_dim"], keys["head_dim"], keys["qkv_heads"])
        else:
            g2 = g * g
        self.v = b2 * self.v + (1 - b2) * g2
        if self.kind == "adamw":
            self.m = b1 * self.m + (1 - b1) * g
            self.w = self.w * (1 - lr * wd)
            self.w = self.w - lr * (self.m / (1 - b1**t)) / (np.sqrt(self.v / (1 - b2**t)) + eps)
            return
        if self.kind == "none":
            m = g
        elif self.kind == "full":
            self.m = b1 * self.m + (1 - b1) * g
            m = self.m
        else:
            m = np.empty_like(g)
            for index, lowrank in self.parts:
                if lowrank is None:  # the value part of a fused projection: full momentum
                    self.m[index] = b1 * self.m[index] + (1 - b1) * g[index]
                    m[index] = self.m[index]
                else:
                    m[index] = lowrank.momentum(g[index], b1, t, hp["refresh_every"])
        u = m / (np.sqrt(self.v) + eps)
        if clip is not None:
            u = np.clip(u, -clip, clip)
        self.w = self.w - lr * (u + wd * self.w)


CASES = [  # (momentum, shape, block keys, clip)
    ("none", (37, 19), dict(block="row"), 1.0),
    ("none", (53,), dict(block="element"), 1.0),
    ("lowrank", (45, 29), dict(block="head", head_dim=5), 1.0),
    ("lowrank", (23, 41), dict(block="row", fan_out_dim=1), None),  # wide, (in, out) layout
    ("full", (31, 17), dict(block="row"), 1.0),
    ("qkv", (63, 17), dict(block="qkv", head_dim=7, qkv_heads=(1, 1)), 1.0),
    ("qkv", (17, 40), dict(block="qkv", fan_out_dim=1, head_dim=5, qkv_heads=(4, 2)), 0.5),  # Conv1D, GQA
    ("adamw", (5, 3, 3, 3), dict(block="row"), 0.5),  # AdamW blocks never clip
    ("adamw", (53,), dict(block="tensor"), 1.0),
]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("second_moment", ["full", "mini"])
def test_matches_float64_reference_for_every_block(second_moment: str, backend: str, request) -> None:
    """Every block kind against the float64 reference, on every backend: the for-loop, the native
    kernels (float32: the fast path's element-wise kernel, ALS without M, block means) and the
    compiled kernel (float64, native library off)."""
    dtype, fused, tol = use_backend(backend, request)
    hp = dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, rank_fraction=0.2, refresh_every=25, second_moment=second_moment)
    gen = torch.Generator().manual_seed(0)
    params, refs, signals, groups = [], [], [], []
    for i, (kind, shape, keys, clip) in enumerate(CASES):
        keys = dict(fan_out_dim=0, head_dim=0, qkv_heads=(1, 1)) | keys
        wd = 0.1 if len(shape) >= 2 else 0.0
        p64 = torch.randn(shape, generator=gen, dtype=torch.float64)
        p = p64.to(dtype).requires_grad_()
        params.append(p)
        groups.append({"params": [p], "momentum": kind, "weight_decay": wd, "clip": clip, **keys})
        refs.append(RefAdaPM(p.detach().double().numpy(), kind, keys, hp | dict(wd=wd, clip=clip)))
        signals.append(torch.randn(shape, generator=gen, dtype=torch.float64).numpy())  # a persistent direction
    opt = AdaPM(
        groups, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], rank_fraction=hp["rank_fraction"],
        refresh_every=hp["refresh_every"], second_moment=second_moment, fused=fused,
    )  # fmt: skip
    start = [p.detach().double().numpy().copy() for p in params]
    for t in range(1, 121):
        for p, ref, signal in zip(params, refs, signals):
            g = signal + torch.randn(p.shape, generator=gen, dtype=torch.float64).numpy() * (1 + t % 3)
            p.grad = torch.from_numpy(g.copy()).to(dtype)
            ref.step(p.grad.double().numpy(), t)  # the gradient the optimizer sees (rounded on float32)
        opt.step()
        for p, ref, w0, case in zip(params, refs, start, CASES):
            got, want = p.detach().double().numpy() - w0, ref.w - w0
            assert np.linalg.norm(got - want) < tol * np.linalg.norm(want), (t, case)


def test_adamw_block_is_torch_adamw() -> None:
    w = torch.randn(37, 19, dtype=torch.float64)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt = AdaPM([{"params": [a], "momentum": "adamw"}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(30):
        a.grad = torch.randn_like(w)
        b.grad = a.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(37, 19), (19, 37)])
def test_full_rank_low_rank_block_is_the_full_momentum_block(shape: tuple[int, int]) -> None:
    w = torch.randn(shape, dtype=torch.float64)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    lowrank = AdaPM([{"params": [a], "momentum": "lowrank"}], lr=1e-2, rank_fraction=1.0, refresh_every=7)
    full = AdaPM([{"params": [b], "momentum": "full"}], lr=1e-2)
    for _ in range(40):
        a.grad = torch.randn_like(w) + 0.5
        b.grad = a.grad.clone()
        lowrank.step()
        full.step()
    torch.testing.assert_close(a - w, b - w, rtol=1e-9, atol=1e-12)
    L, R = lowrank.state[a]["factor_L"], lowrank.state[a]["factor_R"]
    torch.testing.assert_close(L @ R, full.state[b]["exp_avg"], rtol=1e-9, atol=1e-12)


def test_residual_correction_removes_the_low_rank_bias() -> None:
    """Rank-8 signal + noise, rank-4 momentum: the time-averaged error of L R against the full
    momentum (EMA of g) is large; that of the corrected momentum L R + E/(1-b1) is not."""
    n, m, k, r, b1 = 64, 48, 8, 4, 0.9
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    signal = U @ torch.diag(torch.linspace(3, 1, k, dtype=torch.float64)) @ V.T
    w = torch.zeros(n, m, dtype=torch.float64, requires_grad=True)
    # lr 1, eps 0, no clip, no decay: the step is exactly -m_c / sqrt(v), so m_c can be read back.
    opt = AdaPM(
        [{"params": [w], "momentum": "lowrank"}], lr=1.0, betas=(b1, 0.95), eps=0.0, weight_decay=0.0,
        clip=None, rank_fraction=r / m,
    )  # fmt: skip
    full = torch.zeros_like(signal)
    err_corrected, err_low_rank, fulls = [], [], []
    for t in range(1, 401):
        w.grad = signal + 0.3 * torch.randn(n, m, generator=gen, dtype=torch.float64)
        before = w.detach().clone()
        opt.step()
        state = opt.state[w]
        corrected = -(w.detach() - before) * state["exp_avg_sq"].sqrt()
        full = b1 * full + (1 - b1) * w.grad
        if t > 50:
            err_corrected.append(corrected - full)
            err_low_rank.append(state["factor_L"] @ state["factor_R"] - full)
            fulls.append(full)
    scale = torch.stack(fulls).mean(0).norm()
    bias_corrected = torch.stack(err_corrected).mean(0).norm() / scale
    bias_low_rank = torch.stack(err_low_rank).mean(0).norm() / scale
    assert bias_low_rank > 0.3  # L R alone misses about half the signal
    assert bias_low_rank > 10 * bias_corrected


# --------------------------------------------------------------------------- the fast path against the for-loop


class Conv1DGPT(torch.nn.Module):
    """A GPT whose fused q/k/v projection is stored (n_in, n_out), Hugging Face Conv1D's layout:
    the q/k/v parts are column ranges (fan_out_dim=1), the fast path's non-contiguous case."""

    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.c_attn = torch.nn.Parameter(torch.randn(d, 3 * d) * 0.1)
        self.c_fc = torch.nn.Parameter(torch.randn(d, 4 * d) * 0.1)

    def groups(self) -> list[dict]:
        qkv = dict(momentum="qkv", fan_out_dim=1, block="qkv", head_dim=6, qkv_heads=(4, 4))
        return [{"params": [self.c_attn], **qkv}, {"params": [self.c_fc], "momentum": "lowrank", "fan_out_dim": 1}]


def _models() -> list[tuple[str, torch.nn.Module, Callable]]:
    torch.manual_seed(0)
    return [
        ("gpt", GPT(), lambda m: adapm_param_groups(m, n_heads=4, dim=24)),
        ("llama", Llama(), lambda m: adapm_param_groups(m, n_heads=4, dim=24, n_kv_heads=2)),
        ("conv1d", Conv1DGPT(), lambda m: m.groups()),
    ]


@pytest.mark.parametrize("backend", ["native", "compiled"])
@pytest.mark.parametrize("second_moment", ["full", "mini"])
def test_fast_path_follows_the_for_loop(second_moment: str, backend: str, request) -> None:
    """fused=True against fused=False on the same gradients for 12 steps (three refreshes): every
    block kind of a GPT (nanoGPT q/k/v), a Llama (GQA, untied head) and a Conv1D-layout q/k/v."""
    dtype, _, _ = use_backend(backend, request)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, model, groups in _models():
        if second_moment == "mini" and name == "conv1d":
            continue  # Conv1DGPT's lowrank group has no Adam-mini block keys
        a = model.to(dtype)
        b = copy.deepcopy(a)
        kw = dict(lr=1e-2, refresh_every=4, second_moment=second_moment)
        loop, fast = AdaPM(groups(a), fused=False, **kw), AdaPM(groups(b), fused=True, **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(12):
            for p, q in zip(a.parameters(), b.parameters()):
                p.grad = torch.randn(p.shape, generator=gen).to(dtype) + 0.3
                q.grad = p.grad.clone()
            loop.step()
            fast.step()
        for (pname, p), q in zip(a.named_parameters(), b.parameters()):
            scale = float(p.detach().abs().max())
            assert float((p - q).detach().abs().max()) <= tol * scale, (name, pname)
            for key, value in loop.state[p].items():
                if key.startswith("factor_L"):  # the factors' product: a basis is only defined up to sign
                    suffix = key[len("factor_L"):]
                    got = fast.state[q][key] @ fast.state[q]["factor_R" + suffix]
                    want = value @ loop.state[p]["factor_R" + suffix]
                    assert float((got - want).abs().max()) <= 100 * tol * float(want.abs().max()), (name, key)
                elif key != "factor_R" and not key.startswith("factor_R"):
                    torch.testing.assert_close(fast.state[q][key], value, rtol=100 * tol, atol=100 * tol * scale)


def test_fast_path_routing(monkeypatch) -> None:
    """fused=None: the fast path from 2**20 elements (not below), never for a compiled step."""
    from lowmem.optim import adapm as adapm_module

    calls = []
    real = adapm_module._adapm_fast
    monkeypatch.setattr(adapm_module, "_adapm_fast", lambda *a, **k: calls.append(1) or real(*a, **k))
    for numel, expected in ((1000, 0), (1 << 20, 1)):
        p = torch.zeros(numel, requires_grad=True)
        opt = AdaPM([p])
        p.grad = torch.ones(numel)
        calls.clear()
        opt.step()
        assert len(calls) == expected, numel
    with pytest.raises(ValueError, match="fused='yes'"):
        AdaPM([torch.zeros(3, requires_grad=True)], fused="yes")


def test_float32_cpu_tensors_take_the_native_kernels(monkeypatch) -> None:
    """On float32 CPU tensors the fast path calls the C kernels (the element-wise step of every
    block kind, AdaPM-mini's block means), not the compiled ones."""
    from lowmem.optim import _native

    lib, used = _native.library(), set()

    class Spy:
        def __getattr__(self, name: str):
            used.add(name)
            return getattr(lib, name)

    monkeypatch.setattr(_native, "library", lambda: Spy())
    torch.manual_seed(0)
    model = GPT()
    for second_moment in ("full", "mini"):
        opt = AdaPM(adapm_param_groups(model, n_heads=4, dim=24), second_moment=second_moment, fused=True)
        random_grads(model, torch.Generator().manual_seed(0))
        opt.step()
    assert {"lowmem_adapm_f32", "lowmem_fanout_mean_sq_f32"} <= used


# --------------------------------------------------------------------------- checkpoints and determinism


def _train(model, opt, gen, steps):
    for _ in range(steps):
        random_grads(model, gen)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("second_moment", ["full", "mini"])
def test_state_dict_round_trip_continues_bit_for_bit(dtype: torch.dtype, second_moment: str) -> None:
    torch.manual_seed(0)
    model = GPT().to(dtype)

    def build(m: torch.nn.Module) -> AdaPM:
        return AdaPM(adapm_param_groups(m, n_heads=4, dim=24), refresh_every=5, second_moment=second_moment)

    opt = build(model)
    _train(model, opt, torch.Generator().manual_seed(1), 7)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = copy.deepcopy(model)
    resumed_opt = build(resumed)
    resumed_opt.load_state_dict(torch.load(buffer, weights_only=True))
    c_attn = resumed.transformer.h[0].attn.c_attn.weight
    assert resumed_opt.state[c_attn]["factor_L_q"].dtype == torch.float32
    assert resumed_opt.state[c_attn]["exp_avg_v"].dtype == torch.float32
    _train(model, opt, torch.Generator().manual_seed(2), 8)  # crosses the refresh at t = 11
    _train(resumed, resumed_opt, torch.Generator().manual_seed(2), 8)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == resumed_opt.state[q].keys()
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], resumed_opt.state[q][key]), key


def test_factors_are_deterministic_and_leave_the_global_rng_alone() -> None:
    """Two replicas built independently agree bit for bit whatever the global RNG does (DDP)."""
    torch.manual_seed(0)
    a = GPT()
    b = copy.deepcopy(a)
    opts = [AdaPM(adapm_param_groups(m, n_heads=4, dim=24), refresh_every=4) for m in (a, b)]
    gen = torch.Generator().manual_seed(3)
    for t in range(10):
        random_grads(a, gen)
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = p.grad.clone()
        for seed, opt in zip((100 + t, 200 + t), opts):
            torch.manual_seed(seed)
            rng = torch.random.get_rng_state()
            opt.step()
            assert torch.equal(torch.random.get_rng_state(), rng)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for key in opts[0].state[p]:
            assert torch.equal(opts[0].state[p][key], opts[1].state[q][key]), key
    assert any(key.startswith("factor_") for state in opts[0].state.values() for key in state)


# --------------------------------------------------------------------------- partition, validation, memory


def test_partition_by_role() -> None:
    groups = adapm_param_groups(GPT())
    kind = {name: g["momentum"] for g in groups for name, _ in g["params"]}
    assert kind["transformer.wte.weight"] == kind["transformer.h.0.attn.c_proj.weight"] == "none"
    assert kind["transformer.h.0.attn.c_attn.weight"] == "qkv"
    assert kind["transformer.h.1.mlp.c_fc.weight"] == kind["transformer.h.1.mlp.c_proj.weight"] == "lowrank"
    assert kind["transformer.wpe.weight"] == kind["transformer.ln_f.weight"] == "adamw"
    assert kind["transformer.h.0.mlp.c_fc.bias"] == "adamw"
    groups = adapm_param_groups(Llama(), n_heads=4, dim=24, n_kv_heads=2)
    kind = {name: g["momentum"] for g in groups for name, _ in g["params"]}
    attn = "layers.0.self_attn."
    assert kind[attn + "q_proj.weight"] == kind[attn + "k_proj.weight"] == "lowrank"
    assert kind[attn + "v_proj.weight"] == "full" and kind[attn + "o_proj.weight"] == "none"
    assert kind["layers.1.mlp.gate_proj.weight"] == kind["layers.1.mlp.down_proj.weight"] == "lowrank"
    assert kind["embed_tokens.weight"] == "none" and kind["lm_head.weight"] == "adamw"  # untied head


def test_adapm_mini_needs_the_head_count() -> None:
    AdaPM(adapm_param_groups(GPT()))  # a full second moment does not
    with pytest.raises(ValueError, match=r"adapm_param_groups\(model, n_heads=\.\.\., dim=\.\.\.\)"):
        AdaPM(adapm_param_groups(GPT()), second_moment="mini")


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(rank_fraction=0.0), "rank_fraction"), (dict(rank_fraction=1.5), "rank_fraction"),
        (dict(refresh_every=0), "refresh_every"), (dict(refresh_every=2.5), "refresh_every"),
        (dict(clip=-1.0), "clip"), (dict(second_moment="diag"), "second_moment"),
    ],
)  # fmt: skip
def test_invalid_hyperparameters_are_named(kwargs: dict, text: str) -> None:
    with pytest.raises(ValueError, match=text):
        AdaPM([torch.zeros(3, requires_grad=True)], **kwargs)


def test_invalid_groups_are_named() -> None:
    with pytest.raises(ValueError, match="momentum='bogus'"):
        AdaPM([{"params": [torch.zeros(3, 3, requires_grad=True)], "momentum": "bogus"}])
    with pytest.raises(ValueError, match="needs a matrix"):
        AdaPM([{"params": [torch.zeros(3, requires_grad=True)], "momentum": "lowrank"}])
    with pytest.raises(ValueError, match="cannot be cut"):
        AdaPM([{"params": [torch.zeros(10, 3, requires_grad=True)], "momentum": "qkv"}])


@pytest.mark.parametrize("second_moment", ["full", "mini"])
def test_state_bytes_is_the_analytic_formula(second_moment: str) -> None:
    """AdaPM's state, counted by hand for a nanoGPT (V, T, d, layers, heads; tied LM head)."""
    vocab, ctx, d, layers, heads, fraction = 37, 11, 24, 2, 4, 0.1
    model = GPT(vocab, ctx, d, layers)
    opt = AdaPM(adapm_param_groups(model, n_heads=heads, dim=d), rank_fraction=fraction, second_moment=second_moment)
    random_grads(model, torch.Generator().manual_seed(0))
    opt.step()
    r = math.ceil(fraction * d)  # every low-rank matrix here has min(n, m) = d
    momentum = (
        0  # wte: none
        + ctx * d  # wpe: AdamW
        + layers * (
            4 * d  # ln_1, ln_2 weight and bias: AdamW
            + 2 * r * (d + d) + d * d + 3 * d  # c_attn: q, k low-rank (d x d each), v full; bias
            + 0 + d  # attn c_proj: none; bias
            + r * (4 * d + d) + 4 * d  # c_fc: low-rank; bias
            + r * (d + 4 * d) + d  # mlp c_proj: low-rank; bias
        )
        + 2 * d  # ln_f
    )  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    if second_moment == "full":
        v = n_params
    else:  # Adam-mini blocks: per token/position/row, per head for q and k, per tensor for norm weights
        v = vocab + ctx + 1 + d + layers * (2 * (1 + d) + (2 * heads + d) + 3 * d + 2 * d + 8 * d + 2 * d)
    assert state_bytes(opt)["state"] == 4 * (v + momentum) + 4 * n_tensors
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    ratio = state_bytes(opt)["state"] / state_bytes(adamw)["state"]
    assert ratio == pytest.approx((v + momentum + n_tensors) / (2 * n_params + n_tensors))
    assert ratio < (0.75 if second_moment == "full" else 0.45)


@pytest.mark.parametrize("tie", [True, False])
def test_a_tied_embedding_follows_the_papers_gpt2_and_an_override_gives_it_the_heads_momentum(tie):
    """AdaPM's GPT-2 124M (nanoGPT, tied head) gives the token embedding no momentum (its Table 1,
    "Em: None"); a tied weight therefore keeps the embedding's kind unless role_overrides names it
    the LM head, which gets full AdamW. Untied, the head has its own."""
    from lowmem.lightning_modules import LanguageModel

    lm = LanguageModel(block_size=8, n_layer=1, n_head=2, n_embd=16, tie_weights=tie)

    def kinds(**kw):
        return {name: g["momentum"] for g in adapm_param_groups(lm, n_heads=2, dim=16, **kw) for name, _ in g["params"]}

    assert kinds()["gpt.wte.weight"] == "none"
    assert kinds(overrides={"gpt.wte.weight": "lm_head"})["gpt.wte.weight"] == "adamw"
    assert tie or kinds()["gpt.lm_head.weight"] == "adamw"
