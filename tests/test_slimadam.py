"""SlimAdamW (docs/algorithms.md §3), its group builder, rules files and the SNR tool."""

from __future__ import annotations

import io
import json
import math

import warnings

import pytest
from _backends import BACKENDS, use_backend
import torch
from torch import nn

from lowmem.optim import _native
from lowmem.optim import SlimAdamW, load_slim_rules, save_slim_rules, slimadam_param_groups, snr_rules, state_bytes
from lowmem.optim.slim_rules import snr, snr_snapshot_due

# ---------------------------------------------------------------- maths


def reference_slimadamw(p0, grads, lr, betas, eps, wd, dims):
    """docs/algorithms.md §3, line by line, in float64."""
    b1, b2 = betas
    p, m, v = p0.clone(), torch.zeros_like(p0), None
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        g2 = g**2 if dims is None else (g**2).mean(dim=dims, keepdim=True)
        v = (1 - b2) * g2 if v is None else b2 * v + (1 - b2) * g2
        if p.dim() >= 2:
            p = p * (1 - lr * wd)
        p = p - lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
    return p, m, v


CASES = [  # (shape, compress_dims)
    ((37, 19), (1,)),
    ((37, 19), (0,)),
    ((5, 3, 3, 3), (1, 2, 3)),
    ((5, 3, 3, 3), (0, 2)),
    ((6, 4, 5), (-1,)),
    ((53,), None),
    ((53,), (0,)),
    ((37, 19), None),
]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_matches_float64_reference(backend, request):
    dtype, fused, tol = use_backend(backend, request)
    steps, lr, betas, eps, wd = 110, 3e-3, (0.9, 0.95), 1e-8, 0.1
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).double() for s, _ in CASES]
    grads = [
        [torch.randn(s, generator=gen, dtype=torch.float64) * (0.1 + t % 5) for t in range(steps)] for s, _ in CASES
    ]
    params = [nn.Parameter(x.to(dtype, copy=True)) for x in init]
    opt = SlimAdamW([{"params": [p], "compress_dims": d} for p, (_, d) in zip(params, CASES)], lr=lr, weight_decay=wd,
                    fused=fused)  # fmt: skip
    for t in range(steps):
        for p, gs in zip(params, grads):
            p.grad = gs[t].to(dtype)
        opt.step()
    for p, x0, gs, (shape, dims) in zip(params, init, grads, CASES):
        ref_p, ref_m, ref_v = reference_slimadamw(x0, gs, lr, betas, eps, wd, dims)
        state = opt.state[p]
        assert state["exp_avg_sq"].shape == ref_v.shape
        for got, ref in ((p, ref_p), (state["exp_avg"], ref_m), (state["exp_avg_sq"], ref_v)):
            assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < tol, (shape, dims)


def test_uncompressed_equals_torch_adamw():
    torch.manual_seed(0)
    shapes = [(37, 19), (5, 3, 3, 3), (53,)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    # 1-D params are never decayed by SlimAdamW: give them weight_decay=0 in AdamW.
    opt = SlimAdamW(ours, weight_decay=0.1, **hp)
    groups = [{"params": theirs[:2]}, {"params": theirs[2:], "weight_decay": 0.0}]
    ref = torch.optim.AdamW(groups, weight_decay=0.1, **hp)
    for _ in range(100):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "dims, shape", [((2,), (4, 3)), ((1, -1), (4, 3)), ((), (4, 3)), ("fan_in", (4, 3)), ((0,), ())]
)
def test_rejects_compress_dims_that_do_not_fit(dims, shape):
    p = nn.Parameter(torch.zeros(shape))
    with pytest.raises(ValueError, match="compress_dims"):
        SlimAdamW([{"params": [("layer.weight", p)], "compress_dims": dims}])


def test_error_names_the_parameter_and_mismatched_state_is_caught():
    a, b = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="blk.bias"):
        SlimAdamW([{"params": [("blk.weight", a), ("blk.bias", b)], "compress_dims": (1,)}])
    opt = SlimAdamW([{"params": [a], "compress_dims": (1,)}])
    a.grad = torch.ones_like(a)
    opt.step()
    opt.param_groups[0]["compress_dims"] = (0,)
    with pytest.raises(RuntimeError, match="compress_dims"):
        opt.step()
    with pytest.raises(ValueError, match="lr"):
        SlimAdamW([a], lr=-1)


def test_state_dict_round_trip_and_bf16_state():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(9, 7)), nn.Parameter(torch.randn(9, 7).to(torch.bfloat16))]
    def groups(ps):
        return [{"params": ps[:1], "compress_dims": (0,)}, {"params": ps[1:], "compress_dims": (1,)}]

    opt = SlimAdamW(groups(params), lr=1e-2)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = SlimAdamW(groups(twins), lr=1e-2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[twins[1]]["exp_avg"].dtype == torch.float32  # torch alone would cast to bf16
    assert opt2.state[twins[1]]["exp_avg_sq"].dtype == torch.float32
    assert opt2.param_groups[1]["compress_dims"] == (1,)
    for _ in range(4):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- group builder


class Conv1D(nn.Module):
    """Hugging Face GPT-2's linear layer: weight stored as (in, out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


D, V, T = 8, 11, 6


class NanoAttn(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.c_attn, self.c_proj = lin(D, 3 * D), lin(D, D)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(D, dim=-1)
        n = x.shape[1]
        att = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(torch.ones(n, n).triu(1).bool(), -1e9), -1)
        return self.c_proj(att @ v)


class NanoMLP(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.c_fc, self.c_proj = lin(D, 4 * D), lin(4 * D, D)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(D), NanoAttn(lin), nn.LayerNorm(D), NanoMLP(lin)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT layout with a tied LM head; ``lin`` = nn.Linear or the HF-style Conv1D."""

    def __init__(self, lin=nn.Linear):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, D), wpe=nn.Embedding(T, D), h=nn.ModuleList([NanoBlock(lin)]), ln_f=nn.LayerNorm(D)
            )
        )
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class LlamaLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        self.self_attn = nn.ModuleDict({n: nn.Linear(D, D, bias=False) for n in names})
        self.mlp = nn.ModuleDict(
            dict(gate_proj=nn.Linear(D, 3 * D), up_proj=nn.Linear(D, 3 * D), down_proj=nn.Linear(3 * D, D))
        )
        self.norm = nn.RMSNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 10)


DECAY = "default"  # the decayed groups inherit the optimizer's weight decay
# Expected (compress_dims as tensor axes, weight decay) per parameter, written from the
# docs/algorithms.md §3 table by hand for each layout.
EXPECTED = {
    "nanogpt": {
        "transformer.wte.weight": ((1,), DECAY),  # (vocab, d), tied with lm_head: one v per token
        "transformer.wpe.weight": ((1,), 0.0),
        "transformer.h.0.ln_1.weight": (None, 0.0),
        "transformer.h.0.ln_1.bias": (None, 0.0),
        "transformer.h.0.attn.c_attn.weight": ((1,), DECAY),  # fused qkv (3d, d): one v per output row
        "transformer.h.0.attn.c_attn.bias": (None, 0.0),
        "transformer.h.0.attn.c_proj.weight": ((0,), DECAY),
        "transformer.h.0.attn.c_proj.bias": (None, 0.0),
        "transformer.h.0.ln_2.weight": (None, 0.0),
        "transformer.h.0.ln_2.bias": (None, 0.0),
        "transformer.h.0.mlp.c_fc.weight": ((0,), DECAY),
        "transformer.h.0.mlp.c_fc.bias": (None, 0.0),
        "transformer.h.0.mlp.c_proj.weight": ((0,), DECAY),
        "transformer.h.0.mlp.c_proj.bias": (None, 0.0),
        "transformer.ln_f.weight": (None, 0.0),
        "transformer.ln_f.bias": (None, 0.0),
    },
    "llama": {
        "embed_tokens.weight": ((1,), DECAY),
        "self_attn.q_proj.weight": ((1,), DECAY),
        "self_attn.k_proj.weight": ((1,), DECAY),
        "self_attn.v_proj.weight": ((0,), DECAY),
        "self_attn.o_proj.weight": ((0,), DECAY),
        "mlp.gate_proj.weight": ((0,), DECAY),
        "mlp.gate_proj.bias": (None, 0.0),
        "mlp.up_proj.weight": ((0,), DECAY),
        "mlp.up_proj.bias": (None, 0.0),
        "mlp.down_proj.weight": ((0,), DECAY),
        "mlp.down_proj.bias": (None, 0.0),
        "norm.weight": (None, 0.0),
        "lm_head.weight": ((1,), DECAY),  # (vocab, d): one v per token
    },
    "cnn": {
        "conv1.weight": ((1, 2, 3), DECAY),  # (out, in, kh, kw): one v per output channel
        "conv1.bias": (None, 0.0),
        "bn1.weight": (None, 0.0),
        "bn1.bias": (None, 0.0),
        "head.weight": ((1,), DECAY),
        "head.bias": (None, 0.0),
    },
}
# HF GPT-2: same roles, but Conv1D weights are (in, out), so every axis flips.
EXPECTED["hf_gpt2"] = dict(EXPECTED["nanogpt"])
EXPECTED["hf_gpt2"].update(
    {
        "transformer.h.0.attn.c_attn.weight": ((0,), DECAY),
        "transformer.h.0.attn.c_proj.weight": ((1,), DECAY),
        "transformer.h.0.mlp.c_fc.weight": ((1,), DECAY),
        "transformer.h.0.mlp.c_proj.weight": ((1,), DECAY),
    }
)
MODELS = {"nanogpt": NanoGPT, "hf_gpt2": lambda: NanoGPT(Conv1D), "llama": LlamaLike, "cnn": SmallCNN}


def assigned(groups):
    """{name: (compress_dims, weight decay)} from a list of param groups."""
    out = {}
    for g in groups:
        for name, _ in g["params"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (g["compress_dims"], g.get("weight_decay", DECAY))
    return out


@pytest.mark.parametrize("layout", sorted(MODELS))
def test_group_builder_follows_the_role_table(layout):
    model = MODELS[layout]()
    groups = slimadam_param_groups(model)
    assert assigned(groups) == EXPECTED[layout]
    opt = SlimAdamW(groups, lr=1e-3)  # every group's dims fit its params
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for g in opt.param_groups:
        for p in g["params"]:
            want = [1 if g["compress_dims"] and i in g["compress_dims"] else n for i, n in enumerate(p.shape)]
            assert list(opt.state[p]["exp_avg_sq"].shape) == want


def test_state_is_about_half_of_adamw():
    model = NanoGPT()
    slim = SlimAdamW(slimadam_param_groups(model))
    adamw = torch.optim.AdamW(model.parameters())
    for opt in (slim, adamw):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    n_tensors = len(EXPECTED["nanogpt"])
    params = dict(model.named_parameters())
    v_numel = sum(
        math.prod(1 if dims and i in dims else n for i, n in enumerate(params[name].shape))
        for name, (dims, _) in EXPECTED["nanogpt"].items()
    )
    n = sum(p.numel() for p in model.parameters())
    assert state_bytes(slim)["state"] == 4 * (n + v_numel) + 4 * n_tensors  # m, reduced v, step scalars
    assert state_bytes(slim)["state"] < 0.7 * state_bytes(adamw)["state"]  # tiny model: norms dominate v


def test_trains_a_tiny_gpt():
    torch.manual_seed(0)
    model = NanoGPT()
    opt = SlimAdamW(slimadam_param_groups(model, weight_decay=0.0), lr=1e-2)
    idx = torch.randint(0, V, (4, T))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- rules files


def test_rules_override_table_and_round_trip_through_json(tmp_path):
    model = NanoGPT()
    rules = {
        "transformer.h.0.attn.c_attn.weight": None,  # exact name beats the pattern below
        "**.attn.c_attn.*": "fan_out",  # `**.` spans the leading components, `*` one
        "**.mlp.c_fc.weight": "fan_in",
        "**.c_proj.weight": [1],
    }
    path = tmp_path / "rules.json"
    save_slim_rules(rules, path)
    assert json.loads(path.read_text()) == rules
    assert load_slim_rules(path) == rules
    from_file = assigned(slimadam_param_groups(model, rules=str(path), weight_decay=0.05))
    assert from_file == assigned(slimadam_param_groups(model, rules=rules, weight_decay=0.05))
    assert from_file["transformer.h.0.attn.c_attn.weight"] == (None, 0.05)
    assert from_file["transformer.h.0.attn.c_attn.bias"] == (None, 0.0)  # 1-D: fan_out has no dims
    assert from_file["transformer.h.0.mlp.c_fc.weight"] == ((1,), 0.05)
    assert from_file["transformer.h.0.attn.c_proj.weight"] == ((1,), 0.05)
    assert from_file["transformer.h.0.mlp.c_proj.weight"] == ((1,), 0.05)
    assert from_file["transformer.wte.weight"] == ((1,), 0.05)  # untouched: role table


def test_bad_rules_are_reported(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"x.weight": "rows"}))
    with pytest.raises(ValueError, match="invalid rule"):
        load_slim_rules(path)
    with pytest.raises(ValueError, match="out of range"):
        slimadam_param_groups(NanoGPT(), rules={"transformer.wte.weight": [2]})
    with pytest.warns(UserWarning, match="no_such"):
        slimadam_param_groups(NanoGPT(), rules={"no_such.weight": "fan_in"})


# ---------------------------------------------------------------- SNR tool


def test_snr_by_hand():
    v = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    # K=(1,): rows (1,3) -> 2^2/1, (2,4) -> 3^2/1; K=(0,): cols (1,2) -> 1.5^2/0.25, (3,4) -> 3.5^2/0.25.
    assert snr(v, (1,)) == pytest.approx((4 + 9) / 2)
    assert snr(v, (0,)) == pytest.approx((9 + 49) / 2)
    assert snr(v, (0, 1)) == pytest.approx(2.5**2 / 1.25)
    assert snr(torch.tensor([[0.0, 0.0], [1.0, 3.0]]), (1,)) == pytest.approx(4.0)  # empty row: no information
    assert snr(torch.tensor([[2.0, 2.0], [1.0, 3.0]]), (1,)) == math.inf  # constant row: lossless
    assert math.isnan(snr(torch.zeros(3, 2), (0,)))


class SNRModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.other = nn.Linear(50, 8), nn.Linear(50, 8), nn.Linear(50, 8)
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(8)


def synthetic_snapshots(gen):
    rows = torch.rand(8, 1, generator=gen) * 9 + 1
    cols = torch.rand(1, 50, generator=gen) * 9 + 1
    noise = lambda *s: 1 + 0.01 * torch.randn(*s, generator=gen)  # noqa: E731
    return {
        "q_proj.weight": [rows.expand(8, 50).clone() for _ in range(3)],  # constant along fan_in (dim 1)
        "v_proj.weight": [cols * noise(8, 50) for _ in range(3)],  # nearly constant along fan_out
        "other.weight": [torch.randn(8, 50, generator=gen) ** 2 for _ in range(3)],  # Adam's v of noise: SNR 1/2
        "conv.weight": [torch.rand(4, 3, 1, 1, generator=gen).expand(4, 3, 3, 3).clone()],  # constant over the kernel
        "norm.weight": [torch.ones(8)],
    }


def test_snr_rules_recover_known_structure(tmp_path):
    model = SNRModel()
    snaps = synthetic_snapshots(torch.Generator().manual_seed(0))
    rules = snr_rules(model, snaps)
    assert rules == {
        "q_proj.weight": "fan_in",
        "v_proj.weight": "fan_out",
        "other.weight": None,  # below the cutoff 1.0
        "conv.weight": [2, 3],  # inf for every subset of the kernel dims: the largest wins
        "norm.weight": None,
    }
    assert snr_rules(model, lambda name: snaps.get(name, ())) == rules | {
        "q_proj.bias": None, "v_proj.bias": None, "other.bias": None, "conv.bias": None, "norm.bias": None,
    }  # fmt: skip
    assert snr_rules(model, {"other.weight": snaps["other.weight"]}, cutoff=0.1)["other.weight"] is not None
    path = tmp_path / "snr.json"
    save_slim_rules(rules, path)
    got = assigned(slimadam_param_groups(model, rules=path))
    assert got["q_proj.weight"][0] == (1,) and got["v_proj.weight"][0] == (0,) and got["conv.weight"][0] == (2, 3)


def test_snapshot_schedule():
    due = [s for s in range(1, 5001) if snr_snapshot_due(s)]
    assert due == [1, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 2000, 3000, 4000, 5000]


# ---------------------------------------------------------------- fast path

FAST_CASES = CASES + [((8, 6, 5), (0, 1)), ((1, 40), (1,))]  # leading dims; a size-1 row: for-loop fallback


def _run(fused, cases, steps=12, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s, _ in cases]
    opt = SlimAdamW([{"params": [p], "compress_dims": d} for p, (_, d) in zip(params, cases)], lr=1e-2, fused=fused)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
    return params, opt


def _assert_runs_close(a, b):
    for p, q in zip(a[0], b[0]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[1].state[p][key], b[1].state[q][key], rtol=1e-5, atol=1e-6)


NATIVE_CASES = FAST_CASES + [((3, 700), (0,)), ((700, 3), (1,)), ((2, 2), (0,)), ((129, 257), (0,))]


@pytest.mark.parametrize("threads", [1, 3])
def test_fused_matches_for_loop(threads, native_calls):
    """Every case through the native kernels (3 threads: rows and element ranges split unevenly,
    column sums combined across threads)."""
    torch.set_num_threads(threads)  # conftest restores it
    _assert_runs_close(_run(True, NATIVE_CASES), _run(False, NATIVE_CASES))
    assert {name for name, _, left in native_calls if left == 0} == {"lowmem_adamw_f32"}  # uncompressed ones


def test_compiled_kernels_match_for_loop(no_native, monkeypatch):
    """The Inductor kernels (dtypes and devices the native ones do not take): element-wise, row-
    and column-reduced. A fresh compiled runner and dynamo cache (other tests' compiles count
    towards dynamo's recompile limit), and the runner must not have fallen back to the for-loop,
    which would make the comparison trivial."""
    import torch._dynamo

    import lowmem.optim.slimadam as slim_module

    torch._dynamo.reset()
    runner = slim_module._ReducedRunner()
    monkeypatch.setattr(slim_module, "_REDUCED", runner)
    _assert_runs_close(_run(True, FAST_CASES), _run(False, FAST_CASES))
    assert runner.compiled is not None and not runner.failed


def test_native_kernels_run_and_tell_autograd(monkeypatch):
    import lowmem.optim.slimadam as slim_module

    calls = []
    real = slim_module._run_native
    monkeypatch.setattr(slim_module, "_run_native", lambda items, sc: calls.append([i[6] for i in items]) or real(items, sc))
    params, opt = _run(True, [((37, 19), (1,)), ((37, 19), (0,))], steps=1)
    assert calls == [[True], [False]]  # one group each: the rows kernel, then the cols kernel ran
    versions = [p._version for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert [p._version for p in params] == [v + 1 for v in versions]


def test_native_build_failure_warns_once_and_uses_the_compiled_kernel(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_failed", False)
    monkeypatch.setenv("LOWMEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    compressed = [((37, 19), (0,)), ((6, 4, 5), (-1,))]
    with pytest.warns(RuntimeWarning, match="native CPU kernels could not be built") as caught:
        fused = _run(True, compressed)
        _run(True, compressed)
    assert sum("native CPU kernels" in str(w.message) for w in caught) == 1
    _assert_runs_close(fused, _run(False, compressed))


def test_native_library_is_built_once_and_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_failed", False)
    monkeypatch.setenv("LOWMEM_CACHE_DIR", str(tmp_path))
    assert _native.library() is not None
    built = list(tmp_path.glob("lowmem_native_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(_native, "_library", None)  # a new process: loads the cached file
    assert _native.library() is not None
    assert list(tmp_path.glob("*")) == built and built[0].stat().st_mtime_ns == stamp


def test_compressed_tensors_take_the_loop_maths_silently_where_no_compile_can_run(foreach_only):
    compressed = [c for c in FAST_CASES if c[1] is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = _run(True, compressed)
    loop = _run(False, compressed)
    for p, q in zip(fused[0], loop[0]):
        assert torch.equal(p, q)


def test_compile_failure_falls_back_to_the_for_loop_once_and_loudly(monkeypatch, no_native):
    import lowmem.optim.slimadam as slim_module

    runner = slim_module._ReducedRunner()
    runner.compiled = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("inductor exploded"))
    monkeypatch.setattr(slim_module, "_REDUCED", runner)
    compressed = [c for c in FAST_CASES if c[1] is not None]
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*for-loop") as caught:
        fused = _run(True, compressed)
    assert len(caught) == 1
    loop = _run(False, compressed)
    for p, q in zip(fused[0], loop[0]):
        assert torch.equal(p, q)


def test_fused_none_picks_the_fast_path_for_large_models(monkeypatch):
    import lowmem.optim._dispatch as dispatch
    import lowmem.optim.slimadam as slim_module

    calls = []
    monkeypatch.setattr(slim_module, "slimadamw", lambda *a, **kw: calls.append(kw["fused"]))
    small, large = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(dispatch.FAST_PATH_MIN_NUMEL))
    for p in (small, large):
        p.grad = torch.zeros_like(p)
    SlimAdamW([small]).step()
    SlimAdamW([large]).step()
    SlimAdamW([large], fused=False).step()
    assert calls == [False, True, False]


def test_rule_patterns_read_per_name_component():
    """``*`` stays within one dotted component, as in role_overrides: ``layer.*.weight`` is the
    weight of every layer, not also of a layer's sub-module."""
    from lowmem.optim import slimadam_param_groups

    model = nn.ModuleDict({"layer": nn.ModuleList([nn.Linear(4, 4), nn.ModuleDict({"sub": nn.Linear(4, 4)})])})
    groups = slimadam_param_groups(model, rules={"layer.*.weight": [0], "**.sub.weight": None})
    dims = {name: g["compress_dims"] for g in groups for name, _ in g["params"]}
    assert dims["layer.0.weight"] == (0,)
    assert dims["layer.1.sub.weight"] is None  # fnmatch's * would have given it [0]
