"""AdamMini: the Adam-mini baseline, one second moment per block (docs/algorithms.md §6).

Paper: Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More" (arXiv 2406.16793).
Reference: the ``adam-mini`` package 1.1.1 (zyushun/Adam-mini ``adam_mini/adam_mini.py``); the
update is the same, the partition comes from lowmem's role classifier instead of name substrings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import increment_version

from lowmem.optim import _dispatch, _native
from lowmem.optim._base import (
    Capabilities, LowMemOptimizer, adam_scalars, check_grad, check_hparams, state_dtype_for, step_groups,
)  # fmt: skip
from lowmem.optim._adamw import ADAMW_STEP
from lowmem.optim._dispatch import check_fused, use_fast_path
from lowmem.optim._fast import local_tensor
from lowmem.optim._sharded_blocks import block_comm_bytes, block_v_state, sharded_block_mean_sq, sharded_expand
from lowmem.optim._sharding import check_fsdp_layout, is_sharded
from lowmem.optim.blocks import (
    BLOCK_DEFAULTS, block_keys, block_mean_sq, block_segments, check_block, expand_blocks, group_params, head_config,
)  # fmt: skip
from lowmem.optim.roles import Role, classify_parameters

__all__ = ["AdamMini", "adam_mini", "adam_mini_param_groups"]


class AdamMini(LowMemOptimizer):
    r"""Adam with one second-moment value per block of entries (Adam-mini, package version 1.1.1).

    For every parameter W with gradient g, at step t (decoupled weight decay first, as AdamW)::

        v = b2 v + (1-b2) mean_block(g^2)        # one value per block, broadcast over the block
        W = W (1 - lr wd)
        m = b1 m + (1-b1) g
        W = W - lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)

    State: ``exp_avg`` (param-sized), ``exp_avg_sq`` (one value per block, see
    :mod:`lowmem.optim.blocks`), ``step``: about 50% of AdamW's state.

    The blocks come from the param-group keys ``block``, ``fan_out_dim``, ``head_dim`` and
    ``qkv_heads``, which :func:`adam_mini_param_groups` sets by role: per head for query/key, per row
    (per output neuron; per token for embeddings and LM head) for value, attention output, MLP,
    embeddings and LM head, one value per norm weight, plain Adam for biases (norm biases included,
    as the package; docs/algorithms.md §6 says "one scalar per norm tensor"). A plain parameter list
    gets ``block="row"``: one v per output row of each matrix (dim 0), per entry of each vector.

    Deliberate differences from the ``adam-mini`` package (which partitions by name substrings):

    - fused q/k/v projections (nanoGPT ``c_attn``) are cut into q, k, v: per head for q, k and per
      row for v (the package gives one scalar to the whole tensor, or per head to all three if
      ``c_attn`` is added to ``wqk_names``);
    - nanoGPT's ``attn.c_proj`` is an attention output (per row); the package only matches
      ``o_proj``/``wo``/``attn.proj`` and gives anything unmatched one scalar per tensor;
    - position embeddings are per position, convs per output channel, classifiers per class (the
      package: one scalar per tensor unless the name matches);
    - rows are taken along the *fan-out* dim, so a Hugging Face ``Conv1D`` (stored (in, out)) gets
      one value per output neuron (the package takes stored rows, i.e. per input);
    - weight decay skips norms, biases, position embeddings and 1-D params by role (the package by
      the substrings ``norm``, ``ln``, ``bias``);
    - state is fp32 for bf16/fp16 params (the package keeps the param dtype).

    FSDP2 (parameters ``fully_shard`` split along dim 0): each rank steps its shard with the for-loop.
    Entries and rows of dim 0 need no communication; a norm tensor's mean and rows of another
    fan-out dim all-reduce their partial sums; head and q/k/v blocks, which may straddle two ranks,
    all-gather one mean per row. ``comm_bytes_per_step`` counts the bytes of the last step.

    Args:
        params: parameters or param groups, best from :func:`adam_mini_param_groups`.
        lr: learning rate (use AdamW's).
        betas: ``(b1, b2)``.
        eps: added to the bias-corrected ``sqrt(v)``.
        weight_decay: decoupled weight decay coefficient (per unit of lr).
        fused: ``True`` runs the fast path: ``element`` blocks as AdamW on every backend of
            :mod:`lowmem.optim._dispatch`, float32 contiguous CPU tensors of other blocks with the
            hand-written row kernel (a block is a run of whole rows of the fan-out dim), the rest
            with the for-loop; ``False`` is the for-loop reference; ``None`` (default) the fast
            path for optimizers holding at least 2**20 elements.
        state_in_param_dtype: keep ``m``/``v`` in the param dtype for bf16/fp16 params.
    """

    capabilities = Capabilities(needs_param_names=True, needs_full_shapes=True, supports_dtensor=True)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        fused: bool | None = None,
        state_in_param_dtype: bool = False,
    ) -> None:
        check_hparams("AdamMini", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_fused("AdamMini", fused)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused,
            state_in_param_dtype=state_in_param_dtype, **BLOCK_DEFAULTS,
        )  # fmt: skip
        super().__init__(params, defaults)
        self.comm_bytes_per_step = 0  # bytes the last step sent between FSDP2 ranks (see comm_bytes)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            check_block(p, group, "AdamMini")

    def _init_group(self, group: dict, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list):
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad("AdamMini", p)
            state = self.state[p]
            if not state:
                dtype = state_dtype_for(p, group["state_in_param_dtype"])
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = block_v_state(p, group, dtype)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        total_numel = sum(p.numel() for g in self.param_groups for p in g["params"])
        self.comm_bytes_per_step = 0
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            self.comm_bytes_per_step += sum(block_comm_bytes(p, group, v) for p, v in zip(params, exp_avg_sqs))
            beta1, beta2 = group["betas"]
            adam_mini(
                params, grads, exp_avgs, exp_avg_sqs, steps,
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                blocks={k: group[k] for k in BLOCK_DEFAULTS}, fused=use_fast_path(group["fused"], total_numel),
            )  # fmt: skip
        return loss


def adam_mini(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    blocks: Mapping[str, Any],
    fused: bool = False,
) -> None:
    """Functional Adam-mini step (see :class:`AdamMini`); ``blocks`` holds the group's block keys.
    ``fused=True`` runs the tensors the fast path takes (:func:`_fast_adam_mini`), the rest as below."""
    if fused:
        params, grads, exp_avgs, exp_avg_sqs, state_steps = _fast_adam_mini(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, blocks=blocks,
        )  # fmt: skip
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        step_t += 1
        step = step_t.item()
        shard = param if is_sharded(param) else None  # FSDP2: step the local shards
        if shard is not None:
            check_fsdp_layout(shard, "AdamMini")
            param, grad, exp_avg, exp_avg_sq = (local_tensor(t) for t in (param, grad, exp_avg, exp_avg_sq))
        g = grad.to(exp_avg.dtype)
        mean_sq = block_mean_sq(g, blocks) if shard is None else sharded_block_mean_sq(g, blocks, shard)
        exp_avg_sq.mul_(beta2).add_(mean_sq, alpha=1 - beta2)
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        v = expand_blocks(exp_avg_sq, param.shape, blocks) if shard is None else sharded_expand(exp_avg_sq, blocks, shard)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        if param.dtype == exp_avg.dtype:
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        else:  # low-precision param with fp32 state: compute the update in fp32, round once
            param.add_((exp_avg / denom).to(param.dtype), alpha=-lr / bias_correction1)


def _fast_adam_mini(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
                    blocks):  # noqa: ANN001, ANN202 - the lists of adam_mini
    """The fast path: ``element`` blocks are plain AdamW (:data:`lowmem.optim._adamw.ADAMW_STEP`,
    on every backend); float32 contiguous CPU tensors whose blocks are runs of whole rows of dim 0
    (all other kinds but a fan-out dim other than 0) go through the native row kernel. Returns the
    lists of the tensors left for the for-loop (DTensors, other blocks, no native library).

    A block of ``per`` rows of an (R, C) tensor is one row of the (R/per, per*C) view, so the
    SlimAdamW row kernel (mean of g^2 over a row, then the Adam update) is exactly Adam-mini's
    step for it. 0-d and empty tensors stay with the for-loop: the row split needs rows of at
    least one element (R = 0 would divide by zero), and the for-loop steps an empty tensor (its
    ``step`` and its ``v``) for free.
    """
    kind = blocks["block"]
    lib = None if kind == "element" else _dispatch.native_library()
    rest, elements, rows = [], [], []
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        p = tensors[0]
        if kind == "element" and not is_sharded(p):
            elements.append(i)
        elif lib is None or not _native.native_ok(*tensors) or p.ndim == 0 or p.numel() == 0:
            rest.append(i)
        elif kind == "tensor" or blocks["fan_out_dim"] % p.ndim == 0:
            rows.append(i)
        else:
            rest.append(i)
    fast = elements + rows
    if not fast:
        return params, grads, exp_avgs, exp_avg_sqs, state_steps
    threads, element_set = torch.get_num_threads(), set(elements)
    for step, positions in step_groups([state_steps[i] for i in fast]).items():
        indices = [fast[k] for k in positions]
        scalars = adam_scalars(lr, beta1, beta2, eps, weight_decay, step)
        ix = [i for i in indices if i in element_set]
        if ix:
            ADAMW_STEP([[t[i] for i in ix] for t in (params, grads, exp_avgs, exp_avg_sqs)], scalars)
        values = [scalars[k] for k in _native.ADAM_SCALARS]
        row_ix = [i for i in indices if i not in element_set]
        for i in row_ix:
            p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
            n_rows = 1 if kind == "tensor" else p.shape[0]
            width, row0, block0 = p.numel() // n_rows, 0, 0
            for seg_rows, per in [(1, 1)] if kind == "tensor" else block_segments(p.shape, blocks):
                offset = row0 * width * 4  # bytes: float32
                status = lib.lowmem_slim_rows_f32(seg_rows // per, per * width, p.data_ptr() + offset,
                                                  g.data_ptr() + offset, m.data_ptr() + offset,
                                                  v.data_ptr() + block0 * 4, *values, threads)  # fmt: skip
                _native.check_status(status, "AdamMini")
                row0, block0 = row0 + seg_rows, block0 + seg_rows // per
        increment_version([t[i] for t in (params, exp_avgs, exp_avg_sqs) for i in row_ix])
    return tuple([t[i] for i in rest] for t in (params, grads, exp_avgs, exp_avg_sqs, state_steps))


def adam_mini_param_groups(
    model: nn.Module,
    *,
    n_heads: int | None = None,
    dim: int | None = None,
    n_kv_heads: int | None = None,
    weight_decay: float | None = None,
    overrides: Mapping[str, Role | str] | None = None,
) -> list[dict]:
    """Param groups with Adam-mini's blocks, assigned by role (see :func:`lowmem.optim.blocks.block_keys`).

    Args:
        model: the (unwrapped) model.
        n_heads, dim: attention heads and model width; ``head_dim = dim // n_heads`` consecutive
            output rows of a query/key projection form one block (the ``adam-mini`` arguments).
            Required when the model has query/key projections.
        n_kv_heads: key/value heads under grouped-query attention (cuts fused q/k/v projections).
        weight_decay: for the decayed groups; ``None`` inherits the optimizer's.
        overrides: role overrides for :func:`~lowmem.optim.roles.classify_parameters`.
    """
    head_dim, qkv_heads = head_config(n_heads, dim, n_kv_heads)

    def keys_of(info: Any) -> dict[str, Any]:
        keys = block_keys(info, head_dim, qkv_heads)
        if keys["block"] is None:
            raise ValueError(
                f"Adam-mini: {info.name!r} is an attention {info.role.value} projection, which Adam-mini splits "
                "into one block per head, and the model states no head count: give your LowMemModule an "
                "attention_shape() returning (n_heads, width) or (n_heads, width, n_kv_heads), or wrap a model "
                "whose config has num_attention_heads and hidden_size; or give the parameter another role "
                "(model.init_args.optimizer.init_args.role_overrides); in Python, "
                "adam_mini_param_groups(model, n_heads=..., dim=...)"
            )
        return keys

    return group_params(model, classify_parameters(model, overrides), keys_of, weight_decay, overrides)
