"""Shared plumbing for lowmem optimizers: hyperparameter validation, capabilities, grad checks.

Every lowmem optimizer subclasses :class:`LowMemOptimizer`. The maths lives in each optimizer's
functional core; this module only holds what would otherwise be repeated in every file.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import math
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

__all__ = [
    "Capabilities", "LowMemOptimizer", "adam_scalars", "check_hparams", "check_grad", "check_non_negative",
    "restore_state_dtypes", "state_dtype_for", "step_groups",
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


def _finite_number(x: Any) -> bool:
    """A real number (a Python int or float, or a one-element tensor) that is neither NaN nor inf."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_complex() and bool(torch.isfinite(x).all())
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(name: str, key: str, value: Any, valid: str, in_range: Callable[[float], bool]) -> None:
    """Raise a one-line ``ValueError`` naming ``key``, ``value`` and the valid range ``valid`` unless
    ``value`` is a finite number for which ``in_range`` holds."""
    if not _finite_number(value) or not in_range(float(value)):
        raise ValueError(f"{name}: invalid {key}={value!r}; it must be {valid}")


def check_hparams(
    name: str, *, lr: Any, betas: Any = None, eps: Any = None, weight_decay: Any = None, **positive: Any
) -> None:
    """Raise ``ValueError`` naming the argument, its value and the valid range if a standard
    hyperparameter is out of range.

    ``lr >= 0``; each beta in ``[0, 1)``; ``eps >= 0``; ``weight_decay >= 0``; every extra keyword
    must be ``> 0`` (e.g. ``buffer_size=16``). Every value must be finite: no update is defined for
    NaN or inf (a NaN lr or an infinite weight decay makes every weight NaN or inf at the first
    step, an infinite eps zeroes every update), and a comparison with NaN is always false, so
    range checks alone let NaN through.
    """
    check_non_negative(name, lr=lr)
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: invalid betas={betas!r}; expected a pair (beta1, beta2)")
        for i, b in enumerate(betas):
            _check(name, f"beta{i + 1}", b, "in [0, 1) (betas = (beta1, beta2))", lambda x: 0.0 <= x < 1.0)
    if eps is not None:
        check_non_negative(name, eps=eps)
    if weight_decay is not None:
        check_non_negative(name, weight_decay=weight_decay)
    for key, value in positive.items():
        _check(name, key, value, "a finite number > 0", lambda x: x > 0.0)


def check_non_negative(name: str, **values: Any) -> None:
    """Raise ``ValueError`` naming the key unless every value is a finite number ``>= 0`` (a
    learning rate such as IOAdam's ``adamw_lr``, an eps, a weight decay)."""
    for key, value in values.items():
        _check(name, key, value, "a finite number >= 0", lambda x: x >= 0.0)


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
    """Base class: a ``torch.optim.Optimizer`` that declares its :class:`Capabilities`.

    Subclasses that save more than ``optimizer.state`` (or load it differently) extend
    :meth:`_extend_state_dict` and :meth:`_load_state`, never ``state_dict``/``load_state_dict``:
    these two run torch's hooks around them, at the points torch's contract puts them.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    def loop_refusal(self, *, world_size: int, grad_scaler: bool, sharded: bool) -> str | None:
        """Why this optimizer *as configured* (an option of its groups, which the class-level
        :class:`Capabilities` cannot say) cannot run with ``world_size`` processes, an fp16
        GradScaler or sharded (FSDP2) parameters; None when it can. Checked at fit start by
        :func:`lowmem.strategies.checks.check_trainer`; here: always None."""
        return None

    def configure_for_loop(self, *, world_size: int, grad_scaler: bool, sharded: bool) -> None:
        """Adapt the options that depend on the loop (``world_size`` processes, an fp16 GradScaler,
        sharded (FSDP2) parameters) to it, e.g. resolve HMAdamW's ``variance_correction="auto"``.
        Called at fit start by :func:`lowmem.strategies.checks.check_trainer`, before
        :meth:`loop_refusal`; here: nothing to adapt."""

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
        _steps_as_tensors(self)

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict`` plus the subclass's entries (:meth:`_extend_state_dict`), added
        before the ``state_dict`` post-hooks run: they see, and may replace, the final dict."""
        with _hooks_held_back(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            state_dict = super().state_dict()  # runs the pre-hooks
        state_dict = self._extend_state_dict(state_dict)
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict`` with torch's hook semantics, done by :meth:`_load_state`.

        The pre-hooks run first and what they return is what gets loaded; the post-hooks run
        last, on the fully loaded optimizer (torch's own load would run both around its part
        only, before the subclass's).
        """
        state_dict = state_dict.copy()  # shallow, as torch: a hook may edit it in place
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        with (
            _hooks_held_back(self, "_optimizer_load_state_dict_pre_hooks"),
            _hooks_held_back(self, "_optimizer_load_state_dict_post_hooks") as post_hooks,
        ):
            self._load_state(state_dict)
        for hook in post_hooks.values():
            hook(self)

    def _extend_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The state dict with the subclass's extra entries; here: none."""
        return state_dict

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict`` (the pre-hooks have run), keeping every state tensor in the dtype it
        was saved in.

        torch casts floating state (except ``step``) to the parameter's dtype on load, which would
        round the fp32 moments of bf16 parameters (and fp32 factors) to bf16.
        """
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)


@contextmanager
def _hooks_held_back(optimizer: Optimizer, kind: str) -> Iterator[OrderedDict]:
    """Empty the optimizer's hook dict ``kind`` (e.g. ``"_optimizer_state_dict_post_hooks"``) for the
    body and yield the hooks, for the caller to run where torch's contract puts them."""
    hooks = getattr(optimizer, kind)
    setattr(optimizer, kind, OrderedDict())
    try:
        yield hooks
    finally:
        setattr(optimizer, kind, hooks)


def _steps_as_tensors(optimizer: Optimizer) -> None:
    """Turn every per-parameter ``step`` saved as a Python number (older checkpoints; torch's own
    optimizers accept them) into the 0-d float32 CPU tensor lowmem optimizers count in place."""
    for state in optimizer.state.values():
        step = state.get("step") if isinstance(state, dict) else None
        if step is not None and not torch.is_tensor(step):
            state["step"] = torch.tensor(float(step), dtype=torch.float32)


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
