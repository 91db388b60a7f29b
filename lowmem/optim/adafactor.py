"""Adafactor, the baseline: ``torch.optim.Adafactor`` on whole tensors, the same maths on FSDP2 shards.

On plain tensors :class:`Adafactor` *is* ``torch.optim.Adafactor`` (its ``step`` runs torch's code).
torch's code cannot run on FSDP2 parameters: its factored statistics and its two per-tensor
norms span dim 0, which ``fully_shard`` splits over the ranks, and DTensor refuses the in-place
ops. On shards this class runs torch's update rule on each rank's rows and sums the statistics
that span dim 0 explicitly, so that every rank takes the step one process would. Per parameter
``W`` (global sizes; ``t`` the step, ``g`` the gradient, eps1 the dtype's epsilon unless set):

    beta2_t = t ** beta2_decay ;  rho_t = min(lr, 1/sqrt(t)) ;  alpha = max(eps2, RMS(W)) rho_t
    W      *= 1 - lr wd
    2-D and more (factored over the last two dims, rows r and columns c):
        row_var = lerp(row_var, mean_c g^2, beta2_t)          # (..., r, 1)
        col_var = lerp(col_var, mean_r g^2, beta2_t)          # (..., 1, c)
        v_hat   = row_var col_var / max(mean_r row_var, eps1)
    1-D:
        v_hat   = variance = lerp(variance, g^2, beta2_t)
    u  = g / sqrt(max(v_hat, eps1^2)) ;  W -= alpha / max(1, RMS(u) / d) * u

Under ``fully_shard`` dim 0 is sharded. For a 2-D parameter dim 0 is the row dim ``r``: the
column means ``mean_r g^2`` and ``mean_r row_var`` are sums over all ranks' rows. For 3-D and
more, dim 0 is a leading (batch) dim and both factored statistics are local. ``RMS(W)`` and
``RMS(u)`` are sums of squares over the whole tensor for every rank. A step therefore sends two
all-reduces for all parameters together: ``[sum W^2, sum row_var, column sums of g^2]`` (the last
two for 2-D parameters only), then ``sum u^2``; :attr:`Adafactor.comm_bytes_per_step` counts them.
State layout and keys are torch's (``step``, ``row_var``, ``col_var``, ``variance``): ``row_var``
and ``variance`` are sharded by rows like the parameter, a 2-D ``col_var`` is replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lowmem.optim._base import Capabilities
from lowmem.optim._sharding import check_fsdp_layout, is_sharded, state_like

__all__ = ["Adafactor"]


class Adafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` (same arguments, defaults and state) that also runs on FSDP2
    parameters sharded along dim 0; see the module docstring for the sharded maths."""

    capabilities = Capabilities(needs_full_shapes=True, supports_dtensor=True)
    comm_bytes_per_step = 0  # bytes the last step all-reduced between FSDP2 ranks (set by step)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: torch's for plain tensors; the sharded rule (all-reduced statistics) for DTensors."""
        params = [p for group in self.param_groups for p in group["params"]]
        if not any(is_sharded(p) for p in params):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.comm_bytes_per_step = 0
        for group in self.param_groups:
            self._sharded_group_step(group)
        return loss

    def _sharded_group_step(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if not is_sharded(p):
                raise NotImplementedError("Adafactor: a param group mixes FSDP2 (DTensor) and plain parameters")
            check_fsdp_layout(p, "Adafactor")
            if p.grad.is_sparse or torch.is_complex(p):
                raise RuntimeError("Adafactor does not support sparse or complex gradients")
            if not self.state[p]:
                self._init_sharded_state(p)
        lr, (eps1, eps2) = float(group["lr"]), group["eps"]
        grads = [-p.grad.to_local() if group["maximize"] else p.grad.to_local() for p in params]
        states = [self.state[p] for p in params]

        # First all-reduce: sum W^2 per parameter, and for 2-D parameters sum(row_var) and the
        # column sums of g^2 (after the row statistics are updated locally).
        parts = []
        for p, g, state in zip(params, grads, states):
            state["step"] += 1
            beta2_t = state["step"].item() ** group["beta2_decay"]
            w = p.to_local()
            parts.append(w.square().sum().reshape(1).to(torch.float64))
            if g.dim() > 1:
                row_var = state["row_var"].to_local()
                row_var.lerp_(g.square().sum(-1, keepdim=True).div_(g.size(-1)), beta2_t)
                if g.dim() == 2:
                    parts.append(row_var.sum().reshape(1).to(torch.float64))
                    parts.append(g.square().sum(0).to(torch.float64))
        sums = self._all_reduce(torch.cat(parts), params[0])

        updates, sumsq = [], []
        offset = 0
        for p, g, state in zip(params, grads, states):
            step = state["step"].item()
            rho_t = min(lr, 1 / step**0.5)
            beta2_t = step ** group["beta2_decay"]
            eps1_p = torch.finfo(p.dtype).eps if eps1 is None else eps1
            alpha = max(eps2, sums[offset].item() ** 0.5 / p.numel() ** 0.5) * rho_t
            offset += 1
            if group["weight_decay"] != 0:
                p.to_local().mul_(1 - lr * group["weight_decay"])
            if g.dim() == 2:
                rows, cols = p.shape
                row_var, col_var = state["row_var"].to_local(), state["col_var"].to_local()
                row_mean_all = sums[offset].item() / rows
                col_var.lerp_((sums[offset + 1 : offset + 1 + cols] / rows).to(col_var.dtype).reshape(1, cols), beta2_t)
                offset += 1 + cols
                v_hat = (row_var @ col_var).div_(max(row_mean_all, eps1_p))
            elif g.dim() > 2:
                row_var, col_var = state["row_var"].to_local(), state["col_var"].to_local()
                col_var.lerp_(g.square().sum(-2, keepdim=True).div_(g.size(-2)), beta2_t)
                v_hat = (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1_p))
            else:
                v_hat = state["variance"].to_local().lerp_(g * g, beta2_t).clone()
            update = v_hat.clamp_(min=eps1_p * eps1_p).rsqrt_().mul_(g)
            updates.append((alpha, update))
            sumsq.append(update.square().sum().reshape(1).to(torch.float64))
        sumsq_all = self._all_reduce(torch.cat(sumsq), params[0])
        for p, (alpha, update), total in zip(params, updates, sumsq_all.tolist()):
            denom = max(1.0, total**0.5 / (p.numel() ** 0.5 * group["d"]))
            p.to_local().add_(update, alpha=-alpha / denom)

    def fsdp2_state_sharded(self, p: Tensor, key: str) -> bool | None:
        """How FSDP2 places ``key`` of ``p`` (for :func:`~lowmem.optim.sharded_state_bytes`): the
        column statistics of a matrix are whole on every rank, the rest follows the rows rule."""
        return False if key == "col_var" and p.dim() == 2 else None

    def _all_reduce(self, t: Tensor, p: Tensor) -> Tensor:
        """``t`` summed over ``p``'s mesh, in place (float64: a sum of squares over millions of
        elements keeps the precision of torch's single-tensor norms)."""
        torch.distributed.all_reduce(t, group=p.device_mesh.get_group())
        self.comm_bytes_per_step += t.numel() * t.element_size()
        return t

    def _init_sharded_state(self, p: Tensor) -> None:
        """torch's state for ``p``, as DTensors: ``row_var`` / ``variance`` sharded by rows like ``p``;
        ``col_var`` of a 2-D ``p`` replicated (one value per column, which every rank needs)."""
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        dtype, shape = p.grad.dtype, tuple(p.shape)
        if p.dim() > 1:
            state["row_var"] = state_like(p, (*shape[:-1], 1), dtype, sharded_rows=True)
            state["col_var"] = state_like(p, (*shape[:-2], 1, shape[-1]), dtype, sharded_rows=p.dim() > 2)
        else:
            state["variance"] = state_like(p, shape, dtype, sharded_rows=True)
