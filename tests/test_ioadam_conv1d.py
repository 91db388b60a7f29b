"""IO-Adam owns Hugging Face ``Conv1D`` weights (``X W + b``, ``W`` stored (n_in, n_out)) as it owns
``nn.Linear``: a Conv1D network steps exactly as the same network of Linear layers holding the
transposed weights, in state and in parameters, with hooks and fused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowmem.optim import IOAdam
from lowmem.optim._io_stats import io_weights, is_hf_conv1d


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, written out (same class name, attributes and maths)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


SIZES = [(6, 9), (9, 9), (9, 4)]  # (n_in, n_out); the square one would hide a layout mix-up from shapes


class ConvNet(nn.Module):
    def __init__(self, make=Conv1D) -> None:
        super().__init__()
        self.layers = nn.ModuleList([make(n_out, n_in) for n_in, n_out in SIZES])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.relu_(x) if i == 0 else torch.tanh(x)  # an in-place op on a Conv1D output (a view)
        return x


class LinearNet(nn.Module):
    def __init__(self, conv: ConvNet) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for layer in conv.layers:
            lin = nn.Linear(layer.nx, layer.nf, dtype=layer.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(layer.weight.t())
                lin.bias.copy_(layer.bias)
            self.layers.append(lin)

    forward = ConvNet.forward


def _train(model: nn.Module, opt: IOAdam, steps: int = 6) -> None:
    gen = torch.Generator().manual_seed(3)
    for t in range(steps):
        x = torch.randn(2, 5, SIZES[0][0], generator=gen, dtype=torch.float64) * (0.5 + t % 3)
        y = torch.randn(2, 5, SIZES[-1][1], generator=gen, dtype=torch.float64)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("mode", ["paper", "per_slot"])
@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_conv1d_steps_exactly_as_linear_with_transposed_weights(fused, mode):
    torch.manual_seed(0)
    conv = ConvNet().double()
    lin = LinearNet(conv)
    kw = dict(lr=1e-2, buffer_size=3, p=3.0 if mode == "per_slot" else 2.0, buffer_mode=mode, fused_linear=fused)
    opt_c, opt_l = IOAdam(conv, **kw), IOAdam(lin, **kw)
    assert all(is_hf_conv1d(m) for m in conv.layers)
    owned = {id(w) for g in opt_c.param_groups if g["io"] for w in g["params"]}
    assert owned == {id(m.weight) for m in conv.layers}  # every Conv1D weight is IO-Adam's; biases AdamW
    _train(conv, opt_c)
    _train(lin, opt_l)
    for c, l in zip(conv.layers, lin.layers):
        assert torch.allclose(c.weight.t(), l.weight, rtol=0, atol=1e-12)
        assert torch.allclose(c.bias, l.bias, rtol=0, atol=1e-12)
        sc, sl = opt_c.state[c.weight], opt_l.state[l.weight]
        assert sc["exp_avg"].shape == c.weight.shape
        assert torch.allclose(sc["exp_avg"].t(), sl["exp_avg"], rtol=0, atol=1e-12)
        assert torch.allclose(sc["out_stats"], sl["out_stats"], rtol=1e-12, atol=0)  # R: n_out x b in both
        assert torch.allclose(sc["in_stats"], sl["in_stats"], rtol=1e-12, atol=0)  # C: n_in x b in both
    assert (conv.layers[0].weight.t() - LinearNet(ConvNet().double()).layers[0].weight).abs().max() > 1e-3


def test_conv1d_without_its_layout_would_step_differently():
    """The negative control: treating the (n_in, n_out) weight as (n_out, n_in) (its square layer
    keeps the shapes valid) gives another trajectory, so the equality above is a real check."""
    torch.manual_seed(0)
    conv = ConvNet().double()
    lin = LinearNet(conv)
    opt_c, opt_l = IOAdam(conv, lr=1e-2, buffer_size=3), IOAdam(lin, lr=1e-2, buffer_size=3)
    _train(lin, opt_l)
    square = conv.layers[1].weight
    opt_c._transposed = {w for w in opt_c._transposed if w is not square}  # forget the square one's layout
    _train(conv, opt_c)
    assert (conv.layers[1].weight.t() - lin.layers[1].weight).abs().max() > 1e-4


def test_conv1d_lookalikes_are_not_owned():
    class Conv1DSub(Conv1D):  # another class name: its forward may differ
        pass

    class NotConv1D(nn.Module):  # a Conv1D by name, but without nf
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 4))

        def forward(self, x):
            return x @ self.weight

    NotConv1D.__name__ = "Conv1D"
    model = nn.Sequential(Conv1DSub(4, 3), NotConv1D())
    assert io_weights(model) == ({}, {})
    tied = nn.ModuleDict({"emb": nn.Embedding(3, 4), "proj": Conv1D(4, 3)})
    tied["proj"].weight = tied["emb"].weight  # the vocabulary on a Conv1D's input side: left to AdamW
    assert io_weights(tied) == ({}, {})


def test_state_dict_round_trip_keeps_the_conv1d_layout():
    torch.manual_seed(0)
    conv = ConvNet().double()
    opt = IOAdam(conv, lr=1e-2, buffer_size=3)
    _train(conv, opt, steps=2)
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors (step counts included)
    other = ConvNet().double()
    other.load_state_dict(conv.state_dict())
    opt2 = IOAdam(other, lr=1e-2, buffer_size=3)
    opt2.load_state_dict(saved)
    _train(conv, opt, steps=2)
    _train(other, opt2, steps=2)
    for a, b in zip(conv.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_real_transformers_conv1d_and_gpt2_ownership():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D as HFConv1D

    torch.manual_seed(0)
    ours = ConvNet().double()
    real = ConvNet(make=HFConv1D).double()
    real.load_state_dict(ours.state_dict())
    opt_o, opt_r = IOAdam(ours, lr=1e-2, buffer_size=3), IOAdam(real, lr=1e-2, buffer_size=3)
    _train(ours, opt_o)
    _train(real, opt_r)
    for a, b in zip(ours.parameters(), real.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=8,
                                      bos_token_id=0, eos_token_id=0))  # fmt: skip
    opt = IOAdam(gpt2, lr=1e-2, buffer_size=2)
    names = {n for g in opt.param_groups if g["io"] for n in g["param_names"]}
    expected = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # fmt: skip
    assert names == expected | {"transformer.wte.weight"}  # and the embedding tied to the Linear LM head
    ids = torch.randint(0, 50, (2, 8))
    for _ in range(2):
        opt.zero_grad()
        gpt2(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert opt.state[gpt2.transformer.h[0].attn.c_attn.weight]["in_stats"].shape == (16, 2)
    assert opt.state[gpt2.transformer.h[0].attn.c_attn.weight]["out_stats"].shape == (48, 2)
