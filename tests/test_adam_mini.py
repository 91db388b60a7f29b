"""AdamMini (docs/algorithms.md §6): against the ``adam-mini`` package step by step, against an
independent float64 re-implementation for every block kind, and its role-based partition."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from _backends import BACKENDS, use_backend
import torch
from adam_mini import Adam_mini
from torch import nn

from lowmem.optim import AdamMini, adam_mini_param_groups, state_bytes

# --------------------------------------------------------------------------- models


class LlamaAttn(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv: int) -> None:
        super().__init__()
        kv = d // n_heads * n_kv
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o_proj = nn.Linear(d, d, bias=False)


class LlamaMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, 3 * d, bias=False)
        self.down_proj = nn.Linear(3 * d, d, bias=False)


class LlamaLayer(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv: int) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = nn.RMSNorm(d), LlamaAttn(d, n_heads, n_kv)
        self.post_attention_layernorm, self.mlp = nn.LayerNorm(d), LlamaMLP(d)


class Llama(nn.Module):
    """Names as the ``adam-mini`` package expects them (``embed``, ``q_proj``, ``mlp``, ``lm_head`` ...)."""

    def __init__(self, vocab: int = 29, d: int = 24, n_heads: int = 4, n_kv: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaLayer(d, n_heads, n_kv) for _ in range(layers))
        self.norm, self.lm_head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Linear with its weight stored (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(n_in, n_out)), nn.Parameter(torch.zeros(n_out))


class Attn(nn.Module):
    def __init__(self, d: int, layout: str) -> None:
        super().__init__()
        if layout == "split":
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d) for _ in range(3))
        else:
            self.c_attn = nn.Linear(d, 3 * d) if layout == "fused" else Conv1D(d, 3 * d)
        self.c_proj = nn.Linear(d, d)


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class Block(nn.Module):
    def __init__(self, d: int, layout: str) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(d), Attn(d, layout), nn.LayerNorm(d), MLP(d)


class GPT(nn.Module):
    """nanoGPT layout (fused ``c_attn``, tied LM head), or HF ``Conv1D``, or split q/k/v."""

    def __init__(self, vocab: int = 37, ctx: int = 11, d: int = 24, layers: int = 2, layout: str = "fused") -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(ctx, d),
            h=nn.ModuleList(Block(d, layout) for _ in range(layers)), ln_f=nn.LayerNorm(d),
        ))  # fmt: skip
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


def random_grads(model: nn.Module, gen: torch.Generator) -> None:
    """Fresh gradients with a different scale per row, so that the block partition matters."""
    for p in model.parameters():
        scale = torch.rand(p.shape[0], *([1] * (p.ndim - 1)), generator=gen, dtype=p.dtype) * 3 + 0.1
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale


# --------------------------------------------------------------------------- the adam-mini package


@pytest.mark.parametrize("n_kv", [4, 2], ids=["mha", "gqa"])
def test_matches_adam_mini_package_step_by_step(n_kv: int) -> None:
    """Same partition and update as adam-mini 1.1.1 on a model with the names it expects."""
    torch.manual_seed(0)
    ours = Llama(n_kv=n_kv).double()
    theirs = copy.deepcopy(ours)
    hp = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdamMini(adam_mini_param_groups(ours, n_heads=4, dim=24, n_kv_heads=n_kv), **hp)
    ref = Adam_mini(theirs.named_parameters(), **hp, dim=24, n_heads=4, n_kv_heads=n_kv, verbose=False)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    start = {n: p.clone() for n, p in ours.named_parameters()}
    for _ in range(30):
        random_grads(ours, gen_a)
        random_grads(theirs, gen_b)
        opt.step()
        ref.step()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            moved = q - start[name]
            assert torch.linalg.norm(p - q) <= 1e-10 * torch.linalg.norm(moved), name
    # The package keeps one v per head for q/k, per row for the rest, per tensor for RMSNorm.
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert opt.state[p]["exp_avg_sq"].numel() == ref.state[q].get("vmean", ref.state[q].get("v")).numel(), name


# --------------------------------------------------------------------------- float64 reference


def ref_block_mean_sq(g: np.ndarray, block: str, d: int, head_dim: int, qkv_heads: tuple[int, int]) -> np.ndarray:
    """mean(g^2) over each block, broadcast back to g's shape (straight from the §6 partition)."""
    sq = g * g
    if block == "element":
        return sq
    if block == "tensor":
        return np.full_like(sq, sq.mean())
    rows = np.moveaxis(sq, d, 0).reshape(g.shape[d], -1)  # one line per fan-out index
    if block == "row":
        per_row = rows.mean(axis=1)
    else:
        parts = [(rows, head_dim)] if block == "head" else []
        if block == "qkv":
            n_q, n_kv = qkv_heads
            unit = rows.shape[0] // (n_q + 2 * n_kv)
            q, k = n_q * unit, n_kv * unit
            parts = [(rows[:q], head_dim), (rows[q : q + k], head_dim), (rows[q + k :], 1)]
        per_row = np.concatenate([
            np.repeat(r.reshape(-1, size * r.shape[1]).mean(axis=1), size) for r, size in parts
        ])  # fmt: skip
    shape = [1] * g.ndim
    shape[d] = g.shape[d]
    return np.broadcast_to(per_row.reshape(shape), g.shape)


CASES = [  # (shape, block keys, weight decay)
    ((37, 19), dict(block="row", fan_out_dim=0), 0.1),
    ((19, 37), dict(block="row", fan_out_dim=1), 0.1),  # Conv1D-like layout
    ((45, 29), dict(block="head", fan_out_dim=0, head_dim=5), 0.1),
    ((29, 45), dict(block="head", fan_out_dim=1, head_dim=5), 0.0),
    ((63, 17), dict(block="qkv", fan_out_dim=0, head_dim=7, qkv_heads=(1, 1)), 0.1),
    ((40, 17), dict(block="qkv", fan_out_dim=0, head_dim=5, qkv_heads=(4, 2)), 0.1),  # GQA
    ((5, 3, 3, 3), dict(block="row", fan_out_dim=0), 0.1),  # conv: per output channel
    ((53,), dict(block="tensor"), 0.0),
    ((53,), dict(block="element"), 0.0),
    ((7,), dict(block="row"), 0.0),  # a vector's rows are its entries
]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_matches_float64_reference_for_every_block_kind(backend, request) -> None:
    dtype, fused, tol = use_backend(backend, request)
    lr, b1, b2, eps = 1e-2, 0.9, 0.95, 1e-8
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape, _, _ in CASES]
    groups = [{"params": [p], "weight_decay": wd, **keys} for p, (_, keys, wd) in zip(params, CASES)]
    opt = AdamMini(groups, lr=lr, betas=(b1, b2), eps=eps, fused=fused)
    W = [p.detach().double().numpy().copy() for p in params]
    W0 = [w.copy() for w in W]
    m = [np.zeros_like(w) for w in W]
    v = [np.zeros_like(w) for w in W]
    for t in range(1, 121):
        for i, (p, (shape, keys, wd)) in enumerate(zip(params, CASES)):
            g = (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + 4 * (i % 3))).to(dtype).double().numpy()
            p.grad = torch.from_numpy(g.copy()).to(dtype)
            k = dict(fan_out_dim=0, head_dim=0, qkv_heads=(1, 1)) | keys
            g2 = ref_block_mean_sq(g, k["block"], k["fan_out_dim"], k["head_dim"], k["qkv_heads"])
            v[i] = b2 * v[i] + (1 - b2) * g2
            W[i] = W[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            W[i] = W[i] - lr * (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
        opt.step()
        for i, p in enumerate(params):
            got, want = p.detach().double().numpy() - W0[i], W[i] - W0[i]
            assert np.linalg.norm(got - want) < tol * np.linalg.norm(want), (t, CASES[i])


# --------------------------------------------------------------------------- partition


def test_fused_qkv_trains_like_separate_q_k_v_in_either_layout() -> None:
    """A fused c_attn (Linear (3d, d) or HF Conv1D (d, 3d)) is cut into q, k, v along its fan-out dim."""
    torch.manual_seed(0)
    split = GPT(layout="split").double()
    fused, conv = GPT(layout="fused").double(), GPT(layout="conv1d").double()
    for other in (fused, conv):
        other.load_state_dict(split.state_dict(), strict=False)  # all but c_attn, set below
    with torch.no_grad():
        for bs, bf, bc in zip(split.transformer.h, fused.transformer.h, conv.transformer.h):
            w = torch.cat([bs.attn.q_proj.weight, bs.attn.k_proj.weight, bs.attn.v_proj.weight])
            b = torch.cat([bs.attn.q_proj.bias, bs.attn.k_proj.bias, bs.attn.v_proj.bias])
            bf.attn.c_attn.weight.copy_(w), bf.attn.c_attn.bias.copy_(b)
            bc.attn.c_attn.weight.copy_(w.T), bc.attn.c_attn.bias.copy_(b)
    opts = [AdamMini(adam_mini_param_groups(m, n_heads=4, dim=24), lr=1e-2) for m in (split, fused, conv)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(15):
        random_grads(split, gen)
        for bs, bf, bc in zip(split.transformer.h, fused.transformer.h, conv.transformer.h):
            g = torch.cat([bs.attn.q_proj.weight.grad, bs.attn.k_proj.weight.grad, bs.attn.v_proj.weight.grad])
            gb = torch.cat([bs.attn.q_proj.bias.grad, bs.attn.k_proj.bias.grad, bs.attn.v_proj.bias.grad])
            bf.attn.c_attn.weight.grad, bf.attn.c_attn.bias.grad = g.clone(), gb.clone()
            bc.attn.c_attn.weight.grad, bc.attn.c_attn.bias.grad = g.T.clone(), gb.clone()
        for other in (fused, conv):
            for (name, p) in other.named_parameters():
                if "c_attn" not in name:
                    p.grad = split.get_parameter(name).grad.clone()
        for opt in opts:
            opt.step()
    for bs, bf, bc in zip(split.transformer.h, fused.transformer.h, conv.transformer.h):
        w = torch.cat([bs.attn.q_proj.weight, bs.attn.k_proj.weight, bs.attn.v_proj.weight])
        torch.testing.assert_close(bf.attn.c_attn.weight, w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bc.attn.c_attn.weight, w.T, rtol=1e-12, atol=1e-12)
    # q and k: one v per head (4 + 4); v: one per row (24)
    assert opts[1].state[fused.transformer.h[0].attn.c_attn.weight]["exp_avg_sq"].shape == (4 + 4 + 24,)


def test_param_groups_by_role_on_nanogpt() -> None:
    model = GPT()
    groups = adam_mini_param_groups(model, n_heads=4, dim=24)
    block = {name: g["block"] for g in groups for name, _ in g["params"]}
    decay = {name: g.get("weight_decay", "default") for g in groups for name, _ in g["params"]}
    assert block["transformer.wte.weight"] == "row"  # per token; the tied lm_head is the same tensor
    assert block["transformer.wpe.weight"] == "row"  # per position
    assert block["transformer.h.0.attn.c_attn.weight"] == "qkv"
    assert block["transformer.h.0.attn.c_proj.weight"] == "row"
    assert block["transformer.h.0.mlp.c_fc.weight"] == block["transformer.h.1.mlp.c_proj.weight"] == "row"
    assert block["transformer.h.0.ln_1.weight"] == block["transformer.ln_f.weight"] == "tensor"
    assert block["transformer.h.0.ln_1.bias"] == block["transformer.h.0.attn.c_attn.bias"] == "element"
    assert "lm_head.weight" not in block and len(block) == len(list(model.parameters()))
    assert decay["transformer.wpe.weight"] == decay["transformer.h.0.ln_1.weight"] == 0.0
    assert decay["transformer.wte.weight"] == decay["transformer.h.0.mlp.c_fc.weight"] == "default"
    assert groups[0]["params"][0][0] == "transformer.wte.weight"  # groups keep the model's order


def test_heads_are_required_for_query_and_key_blocks() -> None:
    with pytest.raises(ValueError, match=r"states no head count: give your LowMemModule an attention_shape\(\)"):
        adam_mini_param_groups(GPT())
    with pytest.raises(ValueError, match="divisible"):
        adam_mini_param_groups(GPT(), n_heads=5, dim=24)
    with pytest.raises(ValueError, match="whole number of heads"):
        AdamMini([{"params": [torch.zeros(10, 3, requires_grad=True)], "block": "head", "head_dim": 4}])
    with pytest.raises(ValueError, match="invalid block"):
        AdamMini([{"params": [torch.zeros(10, 3, requires_grad=True)], "block": "rows"}])


def test_state_bytes_is_the_analytic_adam_mini_formula() -> None:
    """m is param-sized; v has one value per block; plus one 4-byte step per parameter tensor."""
    vocab, ctx, d, layers, heads = 37, 11, 24, 2, 4
    model = GPT(vocab, ctx, d, layers)
    opt = AdamMini(adam_mini_param_groups(model, n_heads=heads, dim=d))
    random_grads(model, torch.Generator().manual_seed(0))
    opt.step()
    per_layer = (
        1 + d + 1 + d  # ln_1, ln_2: one v per weight, one per bias entry
        + (heads + heads + d) + 3 * d  # c_attn: q, k per head, v per row; bias per entry
        + d + d  # attn c_proj: per row; bias
        + 4 * d + 4 * d  # c_fc: per row; bias
        + d + d  # mlp c_proj: per row; bias
    )  # fmt: skip
    v_floats = vocab + ctx + layers * per_layer + 1 + d  # wte per token, wpe per position, ln_f
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    assert state_bytes(opt)["state"] == 4 * (n_params + v_floats) + 4 * n_tensors
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    ratio = state_bytes(opt)["state"] / state_bytes(adamw)["state"]
    assert ratio == pytest.approx((n_params + v_floats + n_tensors) / (2 * n_params + n_tensors))


def test_bf16_params_keep_fp32_state_through_a_checkpoint() -> None:
    model = Llama().to(torch.bfloat16)
    opt = AdamMini(adam_mini_param_groups(model, n_heads=4, dim=24, n_kv_heads=2))
    random_grads(model, torch.Generator().manual_seed(0))
    opt.step()
    clone = copy.deepcopy(model)
    opt2 = AdamMini(adam_mini_param_groups(clone, n_heads=4, dim=24, n_kv_heads=2))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in clone.parameters():
        assert opt2.state[p]["exp_avg"].dtype == opt2.state[p]["exp_avg_sq"].dtype == torch.float32
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("layout", ["fused", "split", "conv1d"])
def test_native_fast_path_matches_for_loop(layout: str, threads: int, native_kernels) -> None:
    """fused=True (native row kernel on views of whole-row blocks: per head, per row, per tensor;
    element blocks through the AdamW kernel; HF Conv1D, fan-out dim 1, stays on the for-loop)
    against the for-loop, with every block kind of a GQA model."""
    torch.set_num_threads(threads)  # conftest restores it
    torch.manual_seed(0)
    models = [GPT(layout=layout) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [AdamMini(adam_mini_param_groups(m, n_heads=4, dim=24, n_kv_heads=2), lr=1e-2, fused=fused)
            for m, fused in zip(models, (True, False))]  # fmt: skip
    for step in range(8):
        random_grads(models[0], torch.Generator().manual_seed(step))
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opts[0].state[p][key], opts[1].state[q][key], rtol=1e-5, atol=1e-7, msg=name)
    assert native_kernels["lowmem_slim_rows_f32"] > 0 and native_kernels["lowmem_adamw_f32"] > 0
