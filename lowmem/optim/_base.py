"""Shared plumbing for lowmem optimizers: hyperparameter validation, capabilities, grad checks.

Every lowmem optimizer subclasses :class:`LowMemOptimizer`. The maths lives in each optimizer's
functional core; this module only holds what would otherwise be repeated in every file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
import math
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

__all__ = [
    "Capabilities", "LowMemOptimizer", "adam_scalars", "check_hparams", "check_grad", "restore_state_dtypes",
    "state_dtype_for", "step_groups",
]  # fmt: skip


@dataclass(frozen=True)
class Capabilities:
    """What an optimizer needs from, and tolerates in, the training loop around it.

    Strategies (``lowmem.strategies``) check these against the Lightning strategy and precision
    at setup and refuse unsupported combinations with a clear message.
    """

    folds_momentum_into_grad: bool = False  # .grad is optimizer state: never zero or free it
    needs_param_names: bool = False  # param groups must be built from named parameters
    needs_full_shapes: bool = False  # shape-aware maths: refuses flattened shards (FSDP1, ZeRO)
    supports_grad_scaler: bool = True  # safe with an fp16 GradScaler that unscales .grad in place
    supports_dtensor: bool = False  # runs on FSDP2 DTensor parameters
    needs_model: bool = False  # built from the model itself (hooks), not from parameters


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.numel() == 1)


def check_hparams(
    name: str, *, lr: Any, betas: Any = None, eps: Any = None, weight_decay: Any = None, **positive: Any
) -> None:
    """Raise ``ValueError`` naming the bad value if a standard hyperparameter is out of range.

    ``lr >= 0``; each beta in ``[0, 1)``; ``eps >= 0``; ``weight_decay >= 0``; every extra keyword
    must be a number ``> 0`` (e.g. ``buffer_size=16``).
    """
    if not _is_number(lr) or float(lr) < 0.0:
        raise ValueError(f"{name}: invalid learning rate lr={lr!r}; it must be a number >= 0")
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: invalid betas={betas!r}; expected a pair (beta1, beta2)")
        for i, b in enumerate(betas):
            if not _is_number(b) or not 0.0 <= float(b) < 1.0:
                raise ValueError(f"{name}: invalid beta{i + 1}={b!r} in betas; each beta must be in [0, 1)")
    if eps is not None and (not _is_number(eps) or float(eps) < 0.0):
        raise ValueError(f"{name}: invalid eps={eps!r}; it must be a number >= 0")
    if weight_decay is not None and (not _is_number(weight_decay) or float(weight_decay) < 0.0):
        raise ValueError(f"{name}: invalid weight_decay={weight_decay!r}; it must be a number >= 0")
    for key, value in positive.items():
        if not _is_number(value) or float(value) <= 0.0:
            raise ValueError(f"{name}: invalid {key}={value!r}; it must be a number > 0")


def check_grad(optimizer_name: str, p: torch.Tensor) -> None:
    """Reject gradients the maths is not defined for, with the fix in the message."""
    grad = p.grad
    if grad is None:
        return
    if grad.is_sparse:
        raise RuntimeError(
            f"{optimizer_name} does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
            "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
        )
    if torch.is_complex(p):
        raise RuntimeError(
            f"{optimizer_name} does not support complex parameters (shape {tuple(p.shape)}); "
            "optimize torch.view_as_real(param) instead"
        )


def state_dtype_for(p: torch.Tensor, state_in_param_dtype: bool) -> torch.dtype:
    """fp32 state for fp32 and low-precision params, unless the user asked for param-dtype state."""
    if state_in_param_dtype or p.dtype == torch.float64:
        return p.dtype
    return torch.float32


class LowMemOptimizer(Optimizer):
    """Base class: a ``torch.optim.Optimizer`` that declares its :class:`Capabilities`."""

    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Backfill defaults added in later versions so old checkpoints still load; torch's own
        # __setstate__ adds "differentiable" to the defaults, which is not ours to add to groups.
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:
            self.defaults.pop("differentiable", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, keeping every state tensor in the dtype it was saved in.

        torch casts floating state (except ``step``) to the parameter's dtype on load, which would
        round the fp32 moments of bf16 parameters (and fp32 factors) to bf16.
        """
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)


def restore_state_dtypes(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """Put back the saved dtypes of state tensors after ``Optimizer.load_state_dict`` cast them."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        state = optimizer.state.get(p, {})
        for key, value in state_dict["state"].get(pid, {}).items():
            current = state.get(key)
            if torch.is_tensor(value) and torch.is_tensor(current) and value.dtype != current.dtype:
                state[key] = value.to(device=current.device, copy=True)


def step_groups(state_steps: list[torch.Tensor]) -> dict[float, list[int]]:
    """Increment every step count (one foreach op) and group the indices by their new value:
    bias corrections differ per step count, so each group is one kernel call."""
    torch._foreach_add_(state_steps, 1.0)
    groups: dict[float, list[int]] = {}
    for i, step in enumerate(torch.stack(state_steps).tolist()):
        groups.setdefault(step, []).append(i)
    return groups


def adam_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float) -> dict:
    """The scalars of a decoupled-decay Adam update at ``step`` (from 1), combined in float64 on the
    host, for the kernels of SlimAdamW and Adam-mini::

        W = W * param_decay - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
    """
    return {
        "param_decay": 1.0 - lr * weight_decay,
        "one_minus_beta1": 1.0 - beta1,
        "beta2": beta2,
        "one_minus_beta2": 1.0 - beta2,
        "step_size": lr / (1.0 - beta1**step),
        "bias_correction2_sqrt": math.sqrt(1.0 - beta2**step),
        "eps": eps,
    }
