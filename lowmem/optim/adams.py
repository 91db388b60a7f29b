"""AdamS: Adam with the momentum itself as the normalizer (docs/algorithms.md §2).

Zhang, Wang, Chen, "Momentum itself can be a normalizer" (arXiv 2505.16363); the update follows
the official code (``pku-huzhang/AdamS``, ``new_optimizers.py``) exactly. Per parameter, with one
state tensor ``m`` (``exp_avg``) and ``t`` the step count after increment::

    bc1 = 1 - b1^t
    W = W (1 - lr wd)                                        # decoupled decay, first
    denom = sqrt(b2 (m_{t-1}/bc1)^2 + (1-b2) g^2) + eps      # OLD momentum over the NEW bc1
    m = b1 m + (1-b1) g
    W = W - lr (m/bc1) / denom

The state is ``m`` only: exactly half of AdamW's two moments, the memory of SGD with momentum.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lowmem.optim._base import Capabilities, LowMemOptimizer, check_grad, check_hparams, state_dtype_for, step_groups
from lowmem.optim._dispatch import check_fused, use_fast_path
from lowmem.optim._fast import FusedForeach

__all__ = ["AdamS", "adams"]


class AdamS(LowMemOptimizer):
    r"""AdamS: Adam whose second moment is rebuilt from the momentum, so it keeps only ``m``.

    Update rule (docs/algorithms.md §2, as the official code; ``t`` counts steps from 1)::

        W <- W (1 - lr wd)
        denom = sqrt(b2 (m_{t-1} / (1-b1^t))^2 + (1-b2) g_t^2) + eps
        m_t = b1 m_{t-1} + (1-b1) g_t
        W <- W - lr (m_t / (1-b1^t)) / denom

    ``m_{t-1}`` in the denominator is the momentum *before* this step's update, divided by the
    *current* bias correction ``1-b1^t`` (this is what the official code does).

    Warm-up matters: with ``m_0 = 0`` the first step is ``sign(g) / sqrt(1-b2)`` per coordinate,
    about 4.5 lr for ``b2 = 0.95`` (Adam's first step is about 1 lr). Use the learning-rate
    warm-up you would use for AdamW, or longer.

    State per parameter: ``exp_avg`` (same shape as the parameter) and ``step`` (a 0-d float32
    tensor). In bytes that is half of AdamW's moments: 4 B/param for fp32 state.

    Args:
        params: parameters or param groups (groups may carry ``(name, param)`` pairs).
        lr: learning rate (default 1e-3).
        betas: ``(b1, b2)``: momentum EMA factor and the weight of the old momentum in the
            normalizer (default ``(0.9, 0.95)``; the paper finds ``b2 > 0.99`` unstable).
        eps: added to the square root, outside it (default 1e-8).
        weight_decay: decoupled weight decay, applied to every parameter of the group (default
            0.1; use :func:`lowmem.optim.weight_decay_param_groups` to spare norms and biases).
            Unlike the official code, the constructor value is kept in ``defaults``.
        fused: ``True`` runs the fast path, one fused kernel over all tensors, on the backends of
            :mod:`lowmem.optim._dispatch` (native C for float32 CPU tensors, else
            ``torch.compile``'d, else foreach); ``False`` the for-loop reference; ``None`` (the
            default) the fast path when the optimizer holds at least 2**20 elements.
        state_in_param_dtype: keep ``exp_avg`` in the dtype of bf16/fp16 parameters instead of
            fp32 (halves the state again, at the cost of precision).
    """

    capabilities = Capabilities(supports_dtensor=True)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        fused: bool | None = None,
        state_in_param_dtype: bool = False,
    ) -> None:
        check_hparams("AdamS", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_fused("AdamS", fused)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            fused=fused,
            state_in_param_dtype=state_in_param_dtype,
        )
        super().__init__(params, defaults)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad("AdamS", p)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                dtype = state_dtype_for(p, group["state_in_param_dtype"])
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        total_numel = sum(p.numel() for g in self.param_groups for p in g["params"])
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, steps)
            beta1, beta2 = group["betas"]
            adams(
                params,
                grads,
                exp_avgs,
                steps,
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                fused=use_fast_path(group["fused"], total_numel),
            )
        return loss


def adams(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: bool = False,
) -> None:
    """Functional AdamS step over lists of tensors (see :class:`AdamS` for the maths).

    Increments each ``state_steps`` entry and updates ``params`` and ``exp_avgs`` in place;
    ``fused=True`` runs the fast path (:mod:`lowmem.optim._dispatch`), ``False`` the for-loop reference.
    """
    impl = _fused_adams if fused else _single_tensor_adams
    impl(params, grads, exp_avgs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


def _single_tensor_adams(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The readable reference: one tensor at a time, the maths in the state dtype."""
    for p, grad, m, step_t in zip(params, grads, exp_avgs, state_steps):
        step_t += 1
        bc1 = 1.0 - beta1 ** step_t.item()
        # Low-precision params with fp32 state: do the maths on an fp32 copy, round once at the end.
        w = p if p.dtype == m.dtype else p.to(m.dtype)
        g = grad.to(m.dtype)
        w.mul_(1.0 - lr * weight_decay)
        denom = (m * m).mul_(beta2 / bc1**2).addcmul_(g, g, value=1.0 - beta2).sqrt_().add_(eps)
        m.lerp_(g, 1.0 - beta1)
        w.addcdiv_(m, denom, value=-lr / bc1)
        if w is not p:
            p.copy_(w)


def _adams_kernel(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    param_decay: Tensor,
    old_m_weight: Tensor,
    one_minus_beta2: Tensor,
    one_minus_beta1: Tensor,
    step_size: Tensor,
    eps: Tensor,
) -> None:
    """The same step for one tensor, written for Inductor: reads W, g, m once, writes W, m once.

    ``old_m_weight = b2 / (1-b1^t)^2`` and ``step_size = lr / (1-b1^t)`` come precomputed in
    float64 on the host.
    """
    compute = step_size.dtype  # fp32, or fp64 for fp64 tensors (the _fast scalar contract)
    g = grad.to(compute)
    m = exp_avg.to(compute)
    denom = (old_m_weight * m * m + one_minus_beta2 * g * g).sqrt() + eps  # with the OLD m
    m = m + one_minus_beta1 * (g - m)
    exp_avg.copy_(m)
    param.copy_(param.to(compute) * param_decay - step_size * m / denom)


_ADAMS_FAST = FusedForeach(_adams_kernel, native="lowmem_adams_f32", name="adams")


def _fused_adams(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    if not params:  # a group whose parameters all have no gradient
        return
    for step, indices in step_groups(state_steps).items():
        bc1 = 1.0 - beta1**step
        scalars = {
            "param_decay": 1.0 - lr * weight_decay,
            "old_m_weight": beta2 / bc1**2,
            "one_minus_beta2": 1.0 - beta2,
            "one_minus_beta1": 1.0 - beta1,
            "step_size": lr / bc1,
            "eps": eps,
        }
        _ADAMS_FAST([[t[i] for i in indices] for t in (params, grads, exp_avgs)], scalars)
