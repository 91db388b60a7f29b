"""lowmem's Adafactor is torch's on plain tensors: same steps to the bit, same state, same checkpoints.

Its own code runs only on FSDP2 shards; ``tests/test_fsdp2.py`` checks that path against this one
(2 ranks against one process) and ``tests/test_cli_ddp.py`` through ``lowmem fit``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowmem import optim


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5), nn.LayerNorm(5), nn.Linear(5, 1))


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: int = 8) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(4, 2, 4, 4, generator=gen)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_plain_tensors_step_exactly_as_torch_adafactor(foreach):
    ours, theirs = model(), model()
    opt = optim.Adafactor(ours.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    ref = torch.optim.Adafactor(theirs.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    train(ours, opt), train(theirs, ref)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["state"].keys() == ref.state_dict()["state"].keys()
    for key, state in opt.state_dict()["state"].items():
        ref_state = ref.state_dict()["state"][key]
        assert state.keys() == ref_state.keys()
        assert all(torch.equal(state[k], ref_state[k]) for k in state)
    assert opt.comm_bytes_per_step == 0


def test_a_torch_adafactor_checkpoint_resumes_in_lowmem_adafactor():
    first, second = model(), model()
    ref = torch.optim.Adafactor(first.parameters(), lr=1e-2)
    train(first, ref, steps=4)
    second.load_state_dict(first.state_dict())
    opt = optim.Adafactor(second.parameters(), lr=1e-2)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # a checkpoint, not shared tensors
    train(first, ref, steps=4), train(second, opt, steps=4)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_it_declares_fsdp2_support_and_the_strategy_builds_it():
    from lowmem import strategies
    from lowmem.strategies.checks import capabilities_of

    assert capabilities_of(optim.Adafactor).supports_dtensor
    assert not capabilities_of(torch.optim.Adafactor).supports_dtensor  # torch's fails on DTensors
    built = strategies.Adafactor(lr=1e-2).build(model())
    assert type(built) is optim.Adafactor and built.defaults["lr"] == 1e-2
