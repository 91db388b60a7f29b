"""SlimAdamW: AdamW with the second moment averaged over high-SNR dims (ALGORITHMS.md §3).

Kalra, Kirchenbauer, Barkeshli, Goldstein, "When Can You Get Away with Low Memory Adam?"
(arXiv 2503.01843); maths as the official ``dayal-kalra/low-memory-adam`` ``utils/slimadam.py``.
Per parameter, with ``K`` the group's ``compress_dims``::

    m = b1 m + (1-b1) g
    v = b2 v + (1-b2) mean_K(g^2)          # v has the dims in K reduced to size 1 (keepdim)
    if W.dim() >= 2: W = W (1 - lr wd)
    W = W - lr (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)

``K = None`` is exactly AdamW. Which ``K`` each parameter gets is decided by
:func:`lowmem.optim.slimadam_param_groups` (the role table or an SNR-derived rules file).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lowmem.optim._base import Capabilities, LowMemOptimizer, check_grad, check_hparams, state_dtype_for
from lowmem.optim.adams import _restore_saved_state_dtypes

__all__ = ["SlimAdamW", "slimadamw"]


def _normalize_dims(compress_dims: Any) -> tuple[int, ...] | None:
    """``compress_dims`` as a tuple of ints (or None); JSON lists and a bare int are accepted."""
    if compress_dims is None:
        return None
    if isinstance(compress_dims, int) and not isinstance(compress_dims, bool):
        return (compress_dims,)
    if isinstance(compress_dims, (tuple, list)) and all(isinstance(d, int) and not isinstance(d, bool) for d in compress_dims):
        if not compress_dims:
            raise ValueError("SlimAdamW: compress_dims=() is empty; use None for uncompressed (AdamW) second moments")
        return tuple(compress_dims)
    raise ValueError(f"SlimAdamW: invalid compress_dims={compress_dims!r}; expected None or a tuple of tensor dims")


def reduced_shape(shape: Sequence[int], compress_dims: tuple[int, ...] | None) -> tuple[int, ...]:
    """Shape of ``v`` for a parameter of ``shape``: the dims in ``compress_dims`` set to 1."""
    if compress_dims is None:
        return tuple(shape)
    dims = {d % len(shape) for d in compress_dims}
    return tuple(1 if i in dims else n for i, n in enumerate(shape))


def _check_dims(name: str, shape: Sequence[int], compress_dims: tuple[int, ...] | None) -> None:
    if compress_dims is None:
        return
    ndim = len(shape)
    bad = [d for d in compress_dims if not -ndim <= d < ndim]
    if bad or len({d % max(ndim, 1) for d in compress_dims}) != len(compress_dims):
        raise ValueError(
            f"SlimAdamW: compress_dims={compress_dims} does not fit {name} of shape {tuple(shape)} "
            f"(dims must be distinct and in [-{ndim}, {ndim - 1}]); put parameters with different "
            "shapes in separate param groups, or build the groups with lowmem.optim.slimadam_param_groups"
        )


class SlimAdamW(LowMemOptimizer):
    r"""SlimAdamW: AdamW whose ``exp_avg_sq`` is averaged over the dims of ``compress_dims``.

    Update rule (ALGORITHMS.md §3; ``K`` = the group's ``compress_dims``, ``t`` from 1)::

        m <- b1 m + (1-b1) g
        v <- b2 v + (1-b2) mean_K(g^2)       # mean over K with keepdim, then the EMA
        W <- W (1 - lr wd)                   # only for parameters with W.dim() >= 2
        W <- W - lr (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)

    Param-group key ``compress_dims``: a tuple of tensor dims to reduce ``v`` over, or ``None``
    (the default) for full AdamW. Every parameter of a group must have those dims; build the
    groups by role with :func:`lowmem.optim.slimadam_param_groups`, which states the rules in
    fan-in/fan-out terms (a Linear weight is (out, in): ``(1,)`` = one ``v`` per output row).

    State per parameter: ``exp_avg`` (full shape), ``exp_avg_sq`` (reduced shape) and ``step``
    (0-d float32). With the role table, ``v`` is about 1-2% of the parameter count, so the
    state is about half of AdamW's.

    Args:
        params: parameters or param groups (use named groups, see ``needs_param_names``).
        lr, betas, eps: as AdamW (defaults 1e-3, ``(0.9, 0.95)``, 1e-8); the paper uses
            AdamW's learning rate unchanged.
        weight_decay: decoupled weight decay (default 0.1), never applied to 1-D parameters.
        fused: run the step as one compiled function over all tensors (``lowmem.optim._fast``);
            ``None`` picks it automatically for large models when ``torch.compile`` works.
        state_in_param_dtype: keep the state of bf16/fp16 parameters in their dtype, not fp32.
    """

    capabilities = Capabilities(needs_param_names=True, needs_full_shapes=True, supports_dtensor=False)

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
        check_hparams("SlimAdamW", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            compress_dims=None,
            fused=fused,
            state_in_param_dtype=state_in_param_dtype,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, checking its ``compress_dims`` against every parameter's shape."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["compress_dims"] = _normalize_dims(group["compress_dims"])
        names = group.get("param_names", [f"parameter {i}" for i in range(len(group["params"]))])
        for name, p in zip(names, group["params"]):
            _check_dims(name, p.shape, group["compress_dims"])

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        dims = group["compress_dims"]
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad("SlimAdamW", p)
            state = self.state[p]
            v_shape = reduced_shape(p.shape, dims)
            if len(state) == 0:
                dtype = state_dtype_for(p, group["state_in_param_dtype"])
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros(v_shape, dtype=dtype, device=p.device)
            elif tuple(state["exp_avg_sq"].shape) != v_shape:
                raise RuntimeError(
                    f"SlimAdamW: exp_avg_sq has shape {tuple(state['exp_avg_sq'].shape)} but compress_dims={dims} "
                    f"needs {v_shape} for a parameter of shape {tuple(p.shape)}; the state was created with other "
                    "compress_dims (changed rules or a checkpoint from another configuration): keep the rules "
                    "the state was saved with"
                )
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            beta1, beta2 = group["betas"]
            slimadamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                compress_dims=group["compress_dims"],
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                fused=group["fused"],
            )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; fp32 state of low-precision parameters stays fp32 (torch would cast it)."""
        super().load_state_dict(state_dict)
        _restore_saved_state_dtypes(self, state_dict)


def slimadamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    compress_dims: tuple[int, ...] | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: bool | None = None,
) -> None:
    """Functional SlimAdamW step over lists of tensors (see :class:`SlimAdamW` for the maths)."""
    _single_tensor_slimadamw(
        params, grads, exp_avgs, exp_avg_sqs, state_steps,
        compress_dims=compress_dims, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
    )  # fmt: skip


def _single_tensor_slimadamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    compress_dims: tuple[int, ...] | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The readable reference: one tensor at a time, the maths in the state dtype."""
    for p, grad, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        step_t += 1
        step = step_t.item()
        bc1 = 1.0 - beta1**step
        bc2_sqrt = (1.0 - beta2**step) ** 0.5
        w = p if p.dtype == m.dtype else p.to(m.dtype)  # fp32 maths for low-precision params
        g = grad.to(m.dtype)
        if p.dim() >= 2:
            w.mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        if compress_dims is None:
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        else:
            # contiguous(): the sum order of a reduction follows the memory layout; this makes a
            # transposed or channels-last parameter give exactly the result of a contiguous one.
            g2_mean = (g * g).contiguous().mean(dim=compress_dims, keepdim=True)
            v.mul_(beta2).add_(g2_mean, alpha=1.0 - beta2)
        # sqrt(v)/sqrt(bc2) as torch.optim.AdamW writes it, so compress_dims=None matches it closely.
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        w.addcdiv_(m, denom, value=-lr / bc1)
        if w is not p:
            p.copy_(w)
