"""Behaviour that IO-Adam's cheaper hooks and staging must keep (no timings here): a retained
graph's second backward stages every call again, the first call's sums are staged uncopied but
never written to, staged sums reach the step in the state dtype."""

from __future__ import annotations

import torch
from torch import nn

from lowmem.optim import IOAdam
from lowmem.optim._io_stats import power_sum


class Twice(nn.Module):
    """One Linear called twice (its staged pair becomes a sum) and one called once."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


def _staged(opt: IOAdam, w: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone() for t in opt._staged_sums(opt._staged, w)]


def test_retained_graph_second_backward_stages_every_call_again():
    """Two backwards of one graph stage each call's pair twice: the first call's sums, kept
    uncopied, are never written to (its in_sum is handed again by the second backward)."""
    torch.manual_seed(0)
    net = Twice()
    opt = IOAdam(net, fused=False)
    x = torch.randn(3, 4, 6)
    loss = net(x).square().mean()
    loss.backward(retain_graph=True)
    once = {w: _staged(opt, w) for w in (net.a.weight, net.b.weight)}
    loss.backward()
    for w, (out_sum, in_sum) in once.items():
        twice = opt._staged_sums(opt._staged, w)
        torch.testing.assert_close(twice[0], 2 * out_sum, rtol=1e-6, atol=0)
        torch.testing.assert_close(twice[1], 2 * in_sum, rtol=1e-6, atol=0)
    h = torch.tanh(net.a(x)).detach()  # the pairs themselves: sum_tokens |X|^2 of both calls of a
    torch.testing.assert_close(once[net.a.weight][1], power_sum(x, 2.0) + power_sum(h, 2.0), rtol=1e-6, atol=0)


def test_staged_sums_are_in_the_state_dtype_and_zero_grad_discards_them():
    torch.manual_seed(0)
    net = Twice().to(torch.bfloat16)
    opt = IOAdam(net, fused=False)  # fp32 state for bf16 weights
    net(torch.randn(5, 6, dtype=torch.bfloat16)).float().sum().backward()
    assert all(t.dtype == torch.float32 for w in (net.a.weight, net.b.weight) for t in opt._staged_sums(opt._staged, w))
    opt.zero_grad()
    assert opt._staged_sums(opt._staged, net.b.weight) is None
