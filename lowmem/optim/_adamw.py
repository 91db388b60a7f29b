"""AdamW's update, written once, for the tensors lowmem optimizers step as plain AdamW.

SlimAdamW's uncompressed tensors, Adam-mini's ``element`` blocks and IO-Adam's parameters outside
its Linear layers take AdamW's step (``torch.optim.AdamW`` semantics; ``t`` counts from 1)::

    W = W (1 - lr wd)                                   # decoupled weight decay
    m = b1 m + (1 - b1) g
    v = b2 v + (1 - b2) g^2
    W = W - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Two forms: :func:`single_tensor_adamw`, the for-loop reference (torch's own order of operations,
the maths in the state dtype), and :data:`ADAMW_STEP`, the fast path (the native kernel
``lowmem_adamw_f32``, else :func:`adamw_kernel` compiled, else as foreach ops). :func:`adam_update`
is the element-wise tail shared with SlimAdamW's compressed kernel, where ``g_sq`` is a mean.
"""

from __future__ import annotations

import math

from torch import Tensor

from lowmem.optim._base import adam_scalars, step_groups
from lowmem.optim._fast import FusedForeach

__all__ = ["ADAMW_STEP", "adam_update", "adamw", "adamw_kernel", "single_tensor_adamw"]


def single_tensor_adamw(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float, *, lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float,
) -> None:  # fmt: skip
    """One tensor's AdamW step ``step`` (already counted), in the state dtype: a bf16 parameter
    with fp32 state is updated in an fp32 copy and rounded once."""
    w = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
    g = grad.to(exp_avg.dtype)
    w.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**step))
    if w is not param:
        param.copy_(w)


def adam_update(
    param: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, g_sq: Tensor, param_decay: Tensor,
    one_minus_beta1: Tensor, beta2: Tensor, one_minus_beta2: Tensor, step_size: Tensor,
    bias_correction2_sqrt: Tensor, eps: Tensor,
) -> None:  # fmt: skip
    """The element-wise tail of a decoupled Adam step on one tensor: EMAs of ``g`` and of ``g_sq``
    (``g^2``, or its mean over compressed dims, broadcast), then the decayed, bias-corrected update
    of ``param``; scalars as 0-d tensors precomputed in float64 on the host (:func:`adam_scalars`)."""
    compute = step_size.dtype
    v = beta2 * exp_avg_sq.to(compute) + one_minus_beta2 * g_sq
    m = exp_avg.to(compute)
    m = m + one_minus_beta1 * (g - m)
    exp_avg_sq.copy_(v)
    exp_avg.copy_(m)
    param.copy_(param.to(compute) * param_decay - step_size * m / (v.sqrt() / bias_correction2_sqrt + eps))


def adamw_kernel(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, param_decay: Tensor,
    one_minus_beta1: Tensor, beta2: Tensor, one_minus_beta2: Tensor, step_size: Tensor,
    bias_correction2_sqrt: Tensor, eps: Tensor,
) -> None:  # fmt: skip
    """AdamW on one tensor for the fast path (the maths of ``lowmem_adamw_f32``)."""
    g = grad.to(step_size.dtype)
    adam_update(param, g, exp_avg, exp_avg_sq, g * g, param_decay, one_minus_beta1, beta2, one_minus_beta2,
                step_size, bias_correction2_sqrt, eps)  # fmt: skip


ADAMW_STEP = FusedForeach(adamw_kernel, native="lowmem_adamw_f32", name="adamw")


def adamw(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    fused: bool,
) -> None:  # fmt: skip
    """AdamW over lists of tensors: increments each ``state_steps`` entry, updates the rest in
    place; ``fused`` picks the fast path over the for-loop."""
    if not fused:
        for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
            step_t += 1
            single_tensor_adamw(p, g, m, v, step_t.item(), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                weight_decay=weight_decay)  # fmt: skip
        return
    if not params:
        return
    for step, indices in step_groups(state_steps).items():
        lists = [[t[i] for i in indices] for t in (params, grads, exp_avgs, exp_avg_sqs)]
        ADAMW_STEP(lists, adam_scalars(lr, beta1, beta2, eps, weight_decay, step))
